"""A virtual CPS3 card on pcscd's vpcd driver: `python -m cps.virtual_card --pki DIR --rpps N`.

The vpcd protocol (vsmartcard's virtual reader driver), written here from its description: every
message is a 2-byte big-endian length then the payload. A 1-byte payload from vpcd is a control:
0 = power off, 1 = power on, 2 = reset, 4 = "send the ATR" (answered with length + ATR). Any
longer payload is a C-APDU, answered with length + R-APDU.

vpcd listens and the card connects to it. vpcd's listening socket is bound to every interface
(vsmartcard 3.3 has no option for an address, and its "reversed" mode, where the card would
listen, aborts pcscd as soon as a slot has no card). So pcscd is started in a network namespace
of its own that holds only a loopback interface (`unshare --net`, see cps/devstack.py), and the
card joins that namespace (`nsenter --net`). Clients still reach pcscd
through its Unix socket in the filesystem, which namespaces do not separate. The card itself
only ever connects to 127.0.0.1.

Removing the card closes the connection (vpcd sees the card gone); inserting it connects again.

Control on stdin, one command a line (tests and operators): `remove`, `insert`, `latency SECONDS`,
`truncate` (the next R-APDU is cut to its first byte, as by a card that fails mid-answer), `quit`. Each is
answered on stdout with `ok <command>`. EOF on stdin is ignored (background use).
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from cps.virtual_os import CardFiles, VirtualCpsOs

log = logging.getLogger(__name__)

DEFAULT_PORT = 0x9C40


class VirtualCardLink:
    """Connects to vpcd on 127.0.0.1:`port` and serves one `VirtualCpsOs` while inserted."""

    def __init__(self, card: VirtualCpsOs, *, port: int = DEFAULT_PORT) -> None:
        self.card = card
        self.port = port
        self._lock = threading.Lock()
        self._inserted = threading.Event()
        self._stop = threading.Event()
        self._conn: socket.socket | None = None
        self.truncate_next = False
        self._thread = threading.Thread(target=self._run, name="virtual-card", daemon=True)
        self.apdus = 0

    def start(self) -> None:
        self._inserted.set()
        self._thread.start()

    def insert(self) -> None:
        self._inserted.set()

    def remove(self) -> None:
        """Pull the card: drop vpcd's connection; the card loses its PIN state, keeps its counters."""
        with self._lock:
            self._inserted.clear()
            if self._conn is not None:
                try:
                    self._conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.card.power_off()

    def stop(self) -> None:
        self._stop.set()
        self.remove()
        self._inserted.set()
        self._thread.join(timeout=5)

    def _connect(self) -> socket.socket | None:
        try:
            conn = socket.create_connection(("127.0.0.1", self.port), timeout=1.0)
        except OSError:
            self._stop.wait(0.1)
            return None
        conn.settimeout(None)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _run(self) -> None:
        while not self._stop.is_set():
            self._inserted.wait()
            if self._stop.is_set():
                return
            conn = self._connect()
            if conn is None:
                continue
            with self._lock:
                if not self._inserted.is_set():
                    conn.close()
                    continue
                self._conn = conn
            try:
                self._serve(conn)
            except OSError as exc:
                log.debug("vpcd connection ended: %s", exc)
            finally:
                with self._lock:
                    self._conn = None
                conn.close()
                self.card.power_off()

    def _serve(self, conn: socket.socket) -> None:
        while True:
            header = _recv_exact(conn, 2)
            if header is None:
                return
            payload = _recv_exact(conn, int.from_bytes(header, "big"))
            if payload is None:
                return
            reply = self._handle(payload)
            if reply is not None:
                conn.sendall(len(reply).to_bytes(2, "big") + reply)

    def _handle(self, payload: bytes) -> bytes | None:
        if len(payload) == 1:
            control = payload[0]
            if control in (0, 2):
                self.card.power_off()
            if control == 4:
                return self.card.atr
            return None
        self.apdus += 1
        reply = self.card.process(payload)
        if self.truncate_next:
            self.truncate_next = False
            return reply[:1]
        return reply


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def load_practitioner(pki: Path, rpps: str) -> CardFiles:
    """Keys and certificates of DIR/practitioners/<rpps>/{sign,auth}.{crt,key} (the dev PKI layout)."""
    base = pki / "practitioners" / rpps

    def key(name: str) -> rsa.RSAPrivateKey:
        loaded = serialization.load_pem_private_key((base / f"{name}.key").read_bytes(), password=None)
        if not isinstance(loaded, rsa.RSAPrivateKey):
            raise SystemExit(f"{base / name}.key: a CPS3 card holds RSA keys only")
        return loaded

    def cert(name: str) -> bytes:
        return x509.load_pem_x509_certificate((base / f"{name}.crt").read_bytes()).public_bytes(Encoding.DER)

    return CardFiles(sign_key=key("sign"), auth_key=key("auth"), sign_cert_der=cert("sign"),
                     auth_cert_der=cert("auth"))


def _control(server: VirtualCardLink) -> None:
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "remove":
            server.remove()
        elif words[0] == "insert":
            server.insert()
        elif words[0] == "latency" and len(words) == 2:
            server.card.latency = float(words[1])
        elif words[0] == "truncate":
            server.truncate_next = True
        elif words[0] == "quit":
            print("ok quit", flush=True)
            return
        else:
            print(f"error unknown command {words[0]}", flush=True)
            continue
        print(f"ok {' '.join(words)}", flush=True)
    threading.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cps.virtual_card", description=__doc__.splitlines()[0])
    parser.add_argument("--pki", type=Path, required=True, help="dev PKI directory (practitioners/<rpps>/...)")
    parser.add_argument("--rpps", required=True, help="RPPS number of the practitioner whose card this is")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="vpcd channel port (default 0x9C40)")
    parser.add_argument("--pin-file", type=Path, help="file holding the card's PIN (default 1234)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to VERIFY and key use")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    pin = args.pin_file.read_text().strip() if args.pin_file else "1234"
    card = VirtualCpsOs(load_practitioner(args.pki, args.rpps), pin=pin, latency=args.latency)
    server = VirtualCardLink(card, port=args.port)
    server.start()
    print(f"ready 127.0.0.1:{args.port}", flush=True)
    try:
        _control(server)
    except KeyboardInterrupt:
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
