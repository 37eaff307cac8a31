"""APDU encoding, response chaining (61xx), Le correction (6Cxx), command chaining, typed status words."""

from __future__ import annotations

from typing import Any

import pytest

from cps.apdu import ApduChannel, Command, Response, raise_for_status
from cps.errors import (
    ApduError,
    ConditionsNotSatisfied,
    FileNotFound,
    MalformedResponse,
    PinBlocked,
    PinIncorrect,
    SecurityStatusNotSatisfied,
)


@pytest.mark.parametrize(("command", "encoded"), [
    (Command(0x00, 0xA4, 0x04, 0x0C, bytes.fromhex("E828")), "00A4040C02E828"),
    (Command(0x00, 0xB0, 0x00, 0x10, le=0xE7), "00B00010E7"),
    (Command(0x00, 0x2A, 0x9E, 0x9A, le=256), "002A9E9A00"),
    (Command(0x00, 0x88, 0x00, 0x00, b"\x01\x02", le=256), "00880000020102" + "00"),
    (Command(0x00, 0x20, 0x00, 0x01), "00200001"),
])
def test_encode_cases(command: Command, encoded: str) -> None:
    assert command.encode() == bytes.fromhex(encoded)


@pytest.mark.parametrize("kwargs", [{"data": b"x" * 256}, {"le": 0}, {"le": 257}, {"p1": 256}])
def test_command_validation(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"cla": 0, "ins": 0xB0, "p1": 0, "p2": 0}
    base.update(kwargs)
    with pytest.raises(ValueError):
        Command(**base)  # type: ignore[arg-type]


def test_response_chaining_with_get_response(scripted: Any) -> None:
    transport = scripted([
        ("002A9E9A00", "AA" * 0xE7 + "6119"),
        ("00C0000019", "BB" * 0x19 + "9000"),
    ])
    channel = ApduChannel(transport)
    assert channel.send(Command(0x00, 0x2A, 0x9E, 0x9A, le=256)) == b"\xaa" * 0xE7 + b"\xbb" * 0x19
    assert channel.round_trips == 2
    assert transport.done()


def test_wrong_le_is_corrected_once(scripted: Any) -> None:
    transport = scripted([("00B0000000", "6C0C"), ("00B000000C", "00" * 12 + "9000")])
    assert ApduChannel(transport).send(Command(0x00, 0xB0, 0, 0, le=256)) == b"\x00" * 12
    assert transport.done()


def test_command_chaining_sets_cla_bit_on_all_but_last(scripted: Any) -> None:
    data = bytes(range(256)) + b"\x01"
    transport = scripted([
        ("102A8086FF" + data[:255].hex(), "9000"),
        ("002A808602" + data[255:].hex() + "00", "0102039000"),
    ])
    assert ApduChannel(transport).send_chained(0x00, 0x2A, 0x80, 0x86, data, le=256) == b"\x01\x02\x03"
    assert transport.done()


def test_error_in_chain_stops_it(scripted: Any) -> None:
    transport = scripted([("102A808602AAAA", "6884")])
    with pytest.raises(ApduError) as info:
        ApduChannel(transport, max_data=2).send_chained(0x00, 0x2A, 0x80, 0x86, b"\xaa" * 4)
    assert info.value.sw == 0x6884
    assert transport.done()


@pytest.mark.parametrize(("sw", "error", "attr", "value"), [
    (0x63C2, PinIncorrect, "tries_left", 2),
    (0x63C0, PinIncorrect, "tries_left", 0),
    (0x6983, PinBlocked, "sw", 0x6983),
    (0x6982, SecurityStatusNotSatisfied, "sw", 0x6982),
    (0x6A82, FileNotFound, "sw", 0x6A82),
    (0x6985, ConditionsNotSatisfied, "sw", 0x6985),
    (0x6D00, ApduError, "sw", 0x6D00),
])
def test_status_words_become_typed_errors(sw: int, error: type[Exception], attr: str, value: int) -> None:
    with pytest.raises(error) as info:
        raise_for_status(sw, 0x20)
    assert getattr(info.value, attr) == value


def test_blocked_and_security_errors_ask_for_hold() -> None:
    assert PinBlocked().hold
    assert SecurityStatusNotSatisfied(0x6982, 0x2A).hold
    assert not FileNotFound(0x6A82, 0xA4).hold


def test_short_response_is_malformed() -> None:
    with pytest.raises(MalformedResponse):
        Response.decode(b"\x90")


class _Endless:
    def transmit(self, apdu: bytes) -> bytes:
        return b"\x00" * 255 + b"\x61\x00"


def test_endless_response_chaining_is_cut() -> None:
    with pytest.raises(MalformedResponse, match="chaining"):
        ApduChannel(_Endless()).send(Command(0x00, 0xB0, 0, 0, le=256))
