"""The vpcd socket protocol of the virtual card, against a stand-in vpcd on a loopback socket."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from cps.virtual_card import VirtualCardLink
from cps.virtual_os import CPS3_ATR, CardFiles, VirtualCpsOs


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _exchange(conn: socket.socket, payload: bytes) -> bytes:
    conn.sendall(len(payload).to_bytes(2, "big"))  # vpcd writes length and payload separately
    conn.sendall(payload)
    size = int.from_bytes(_recv_exact(conn, 2), "big")
    return _recv_exact(conn, size)


@pytest.fixture()
def vpcd() -> Iterator[socket.socket]:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(10)
    yield server
    server.close()


def test_atr_apdu_power_and_removal(vpcd: socket.socket, card_files: CardFiles) -> None:
    card = VirtualCpsOs(card_files)
    link = VirtualCardLink(card, port=vpcd.getsockname()[1])
    link.start()
    try:
        conn, _ = vpcd.accept()
        conn.settimeout(10)
        assert _exchange(conn, b"\x04") == CPS3_ATR
        conn.sendall(b"\x00\x01\x01")  # power on: no answer expected
        assert _exchange(conn, bytes.fromhex("0020000108" + b"1234".hex() + "FFFFFFFF")) == b"\x90\x00"
        assert _exchange(conn, bytes.fromhex("00200001")) == b"\x90\x00"  # verified
        conn.sendall(b"\x00\x01\x02")  # reset: the PIN state is gone
        assert _exchange(conn, bytes.fromhex("00200001")) == b"\x63\xc3"
        link.remove()
        assert conn.recv(1) == b""  # vpcd sees the card gone
        conn.close()
        link.insert()
        again, _ = vpcd.accept()
        again.settimeout(10)
        assert _exchange(again, b"\x04") == CPS3_ATR
        assert link.apdus == 3
        again.close()
    finally:
        link.stop()
