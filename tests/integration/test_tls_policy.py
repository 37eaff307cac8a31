"""The TLS policy of the client-facing ports, as `openssl s_client` sees it (issue 7, item 4).

Submission (STARTTLS), IMAP (STARTTLS, Dovecot behind the gateway's relay) and the inbound port 25 (STARTTLS)
offer TLS 1.3, and TLS 1.2 with the four MSSanté suites only (reference/mssante.md §1.2, ECO.1.1.3; gateway/tls.py);
TLS 1.0 and 1.1 and every other TLS 1.2 suite are refused by the server (the client's offer goes out; the server
answers with an alert). RC4 and 3DES cannot be offered by this OpenSSL build at all, so a ClientHello offering
only them is written by hand and sent over the same STARTTLS. The inbound port verifies client certificates:
one from an unknown CA is refused.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.tls import MSSANTE_TLS12_CIPHERS
from tests.integration.gateway_support import GatewayProcess, short_tmpdir, wait_until

MSSANTE_SUITES = MSSANTE_TLS12_CIPHERS.split(":")
WEAK_TLS12 = [
    "AES128-SHA",                     # static RSA key exchange, CBC with SHA-1
    "AES256-GCM-SHA384",              # static RSA key exchange (no forward secrecy)
    "ECDHE-RSA-AES128-SHA",           # CBC with SHA-1
    "ECDHE-RSA-CHACHA20-POLY1305",    # strong, but not one of the MSSanté suites
    "DHE-RSA-AES128-GCM-SHA256",      # finite-field DH, not one of the MSSanté suites
    "NULL-SHA256",                    # no encryption
]
# Cipher suite numbers (IANA) that this OpenSSL cannot offer any more, for the hand-written ClientHello.
RC4_AND_3DES = {"RC4-SHA": 0x0005, "RC4-MD5": 0x0004, "DES-CBC3-SHA": 0x000A, "ECDHE-RSA-DES-CBC3-SHA": 0xC012}
ECDHE_RSA_AES128_GCM_SHA256 = 0xC02F


@dataclass(frozen=True)
class Port:
    name: str
    starttls: str  # openssl's -starttls protocol
    port: int


@pytest.fixture(scope="module")
def gw(dovecot_binary: Path, dev_pki_dir: Path) -> Iterator[GatewayProcess]:
    g = GatewayProcess(short_tmpdir(), dev_pki_dir, log_level="INFO",
                       extra='[inbound]\nlisten = { host = "127.0.0.1", port = INBOUND_PORT }\n')
    g.start()
    yield g
    if g.proc is not None and g.proc.poll() is None:
        g.interrupt()
    pidfile = g.root / "dc" / "master.pid"
    if pidfile.exists():
        subprocess.run(["pkill", "-F", str(pidfile), "-f", "mssgw-dovecot.conf"], check=False)
    shutil.rmtree(g.root, ignore_errors=True)


def ports(gw: GatewayProcess) -> dict[str, Port]:
    return {"submission": Port("submission", "smtp", gw.smtp_port),
            "imap": Port("imap", "imap", gw.imap_port),
            "inbound": Port("inbound", "smtp", gw.inbound_port)}


PORT_NAMES = ["submission", "imap", "inbound"]
SUITE_PORT_NAMES = PORT_NAMES
CLIENT_SIDE_ERRORS = ("no protocols available", "no ciphers available", "no cipher match", "Connection refused")


@dataclass(frozen=True)
class Handshake:
    ok: bool
    protocol: str | None
    cipher: str | None
    output: str

    @property
    def refused_by_server(self) -> bool:
        """The offer went out and the server ended the handshake: with an alert (Dovecot) or by closing the
        connection (asyncio's TLS drops the alert OpenSSL wrote), not a client that could not make the offer."""
        return (not self.ok and not any(e in self.output for e in CLIENT_SIDE_ERRORS)
                and ("alert" in self.output or "unexpected eof" in self.output or "errno=104" in self.output))


def s_client(gw: GatewayProcess, port: Port, *args: str, stdin: bytes = b"") -> Handshake:
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port.port}", "-starttls", port.starttls,
           "-CAfile", gw.ca, "-brief", *args]
    done = subprocess.run(cmd, input=stdin, capture_output=True, timeout=60, check=False)
    out = (done.stdout + done.stderr).decode(errors="replace")
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    ok = done.returncode == 0 and "CONNECTION ESTABLISHED" in out
    return Handshake(ok, fields.get("Protocol version"), fields.get("Ciphersuite"), out)


@pytest.mark.parametrize("name", PORT_NAMES)
def test_tls13_is_offered(gw: GatewayProcess, name: str) -> None:
    hs = s_client(gw, ports(gw)[name], "-tls1_3")
    assert hs.ok and hs.protocol == "TLSv1.3", hs.output


@pytest.mark.parametrize("name", SUITE_PORT_NAMES)
def test_tls12_gives_only_the_mssante_suites(gw: GatewayProcess, name: str) -> None:
    port = ports(gw)[name]
    for suite in MSSANTE_SUITES:
        hs = s_client(gw, port, "-tls1_2", "-cipher", suite)
        assert hs.ok and (hs.protocol, hs.cipher) == ("TLSv1.2", suite), hs.output
    for suite in WEAK_TLS12:
        hs = s_client(gw, port, "-tls1_2", "-cipher", f"{suite}:@SECLEVEL=0")
        assert hs.refused_by_server, (suite, hs.output)
    hs = s_client(gw, port, "-tls1_2")  # a client offering everything gets an MSSanté suite
    assert hs.ok and hs.cipher in MSSANTE_SUITES, hs.output


@pytest.mark.parametrize("name", PORT_NAMES)
@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_tls_1_0_and_1_1_are_refused(gw: GatewayProcess, name: str, version: str) -> None:
    hs = s_client(gw, ports(gw)[name], version, "-cipher", "DEFAULT:@SECLEVEL=0")
    assert hs.refused_by_server, hs.output


# --- RC4 and 3DES, which this OpenSSL no longer offers: a ClientHello written by hand (RFC 5246 §7.4.1.2)


def client_hello(suites: list[int]) -> bytes:
    def extension(kind: int, body: bytes) -> bytes:
        return struct.pack("!HH", kind, len(body)) + body

    extensions = (extension(0x000A, struct.pack("!HHH", 4, 0x001D, 0x0017))           # groups: x25519, P-256
                  + extension(0x000B, b"\x01\x00")                                    # uncompressed points
                  + extension(0x000D, struct.pack("!HHHH", 6, 0x0804, 0x0401, 0x0201)))  # RSA-PSS, RSA SHA-256, SHA-1
    offered = b"".join(struct.pack("!H", s) for s in suites)
    body = (b"\x03\x03" + os.urandom(32) + b"\x00" + struct.pack("!H", len(offered)) + offered + b"\x01\x00"
            + struct.pack("!H", len(extensions)) + extensions)
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake


def _read_until(sock: socket.socket, end: bytes) -> bytes:
    data = b""
    while end not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"closed before {end!r}: {data!r}")
        data += chunk
    return data


def _starttls(sock: socket.socket, port: Port) -> None:
    if port.starttls == "imap":
        _read_until(sock, b"\r\n")
        sock.sendall(b"a STARTTLS\r\n")
        assert b"a OK" in _read_until(sock, b"a OK")
        return
    _read_until(sock, b"\r\n")
    sock.sendall(b"EHLO hand.test\r\n")
    _read_until(sock, b"250 ")
    sock.sendall(b"STARTTLS\r\n")
    assert _read_until(sock, b"\r\n").startswith(b"220 ")


def hello_answer(port: Port, suites: list[int]) -> tuple[str, int]:
    """("server_hello", chosen suite), ("alert", description) or ("closed", 0) for a ClientHello offering
    `suites` (the gateway's asyncio TLS closes without sending the alert; Dovecot sends it)."""
    with socket.create_connection(("127.0.0.1", port.port), timeout=30) as sock:
        _starttls(sock, port)
        sock.sendall(client_hello(suites))
        head = b""
        while len(head) < 5 + 44:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    if not head:
        return "closed", 0
    if head[:1] == b"\x15":
        return "alert", head[6]
    assert head[:1] == b"\x16" and head[5] == 2, head[:16]
    sid_len = head[5 + 4 + 2 + 32]
    at = 5 + 4 + 2 + 32 + 1 + sid_len
    return "server_hello", struct.unpack("!H", head[at:at + 2])[0]


@pytest.mark.parametrize("name", PORT_NAMES)
def test_rc4_and_3des_are_refused(gw: GatewayProcess, name: str) -> None:
    port = ports(gw)[name]
    # The same hand-written hello with an MSSanté suite is answered: the refusal below is the server's policy.
    assert hello_answer(port, [ECDHE_RSA_AES128_GCM_SHA256]) == ("server_hello", ECDHE_RSA_AES128_GCM_SHA256)
    for suite, number in RC4_AND_3DES.items():
        assert hello_answer(port, [number]) in (("alert", 40), ("closed", 0)), suite  # 40: handshake_failure


# --- The peer port checks client certificates


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A client certificate and key from a CA nobody trusts (self-signed, made by openssl)."""
    d = tmp_path_factory.mktemp("stranger")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=gw.stranger.test/O=NOT TRUSTED", "-addext", "subjectAltName=DNS:gw.stranger.test",
                    "-addext", "extendedKeyUsage=clientAuth", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_a_client_certificate_from_an_unknown_ca_is_refused(gw: GatewayProcess, stranger: tuple[Path, Path],
                                                            dev_pki_dir: Path, version: str) -> None:
    cert, key = stranger
    inbound = ports(gw)["inbound"]
    # stdin keeps the session going after the handshake: in TLS 1.3 the server judges the client certificate
    # after the client has finished, so the client only learns it at its first read (the server closes).
    def refusals() -> int:
        return gw.log.read_text(errors="replace").count("certificate verify failed")

    before = refusals()
    hs = s_client(gw, inbound, version, "-cert", str(cert), "-key", str(key), "-ign_eof",
                  stdin=b"EHLO stranger.test\r\nQUIT\r\n")
    assert not hs.ok and "221 " not in hs.output, hs.output  # the session never answered over TLS
    # The gateway logs the failed handshake on its side, possibly after the client has already given up.
    assert wait_until(lambda: refusals() > before, timeout=10)
    # The gateway's own certificate (from the trusted dev PKI, clientAuth) is accepted the same way.
    ours = s_client(gw, inbound, version, "-cert", str(dev_pki_dir / "gateway" / "tls-server.crt"),
                    "-key", str(dev_pki_dir / "gateway" / "tls-server.key"), "-ign_eof",
                    stdin=b"EHLO peer.test\r\nQUIT\r\n")
    assert ours.ok and "221 " in ours.output, ours.output


def test_submission_does_not_ask_for_a_client_certificate(gw: GatewayProcess, stranger: tuple[Path, Path]) -> None:
    """Clients authenticate with AUTH after TLS; a certificate they happen to send is not a way in or out."""
    cert, key = stranger
    hs = s_client(gw, ports(gw)["submission"], "-cert", str(cert), "-key", str(key), "-ign_eof",
                  stdin=b"EHLO client.test\r\nQUIT\r\n")
    assert hs.ok and "221" in hs.output, hs.output
