"""Hostile SMTP clients against the gateway as a real process (`mssgw run`), over real sockets (issue 7, item 2).

Each test names the attack, sends it as raw bytes where smtplib would not, and checks the documented reply
(gateway/submission.py, GatewaySMTP) and that the gateway lives on. The memory tests read the gateway
process's peak RSS (VmHWM in /proc) while 200 MB go by. Limits are lowered in the gateway's [limits] table
so that each one is reached quickly; the brute-force test binds its clients to other loopback addresses
(127.0.0.x) so that its per-address locks touch no other test.
"""

from __future__ import annotations

import base64
import imaplib
import select
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.gateway_support import ALICE, BOB, DOMAIN, PASSWORDS, GatewayProcess, short_tmpdir

CAROL = f"carol@{DOMAIN}"
MANY = [f"r{i}@{DOMAIN}" for i in range(1, 7)]
ACCOUNTS = {**PASSWORDS, CAROL: "carol-long-password", **{r: "recipient-password" for r in MANY}}
MAX_SIZE = 1024 * 1024

LIMITS = f"""[limits]
max_message_size = {MAX_SIZE}
max_recipients = 5
max_errors = 8
greeting_delay = 0.3
idle_timeout = 4
data_timeout = 2
max_data_duration = 6
max_auth_failures = 2
auth_failure_delay = 0.05
auth_address_failures = 4
auth_address_lockout = 120
auth_account_failures = 3
auth_account_lockout = 5
max_buffered_data = 1572864
max_connections_per_address = 6
[inbound]
listen = {{ host = "127.0.0.1", port = INBOUND_PORT }}
"""


def _stop(gw: GatewayProcess) -> None:
    if gw.proc is not None and gw.proc.poll() is None:
        gw.interrupt()
    pidfile = gw.root / "dc" / "master.pid"
    if pidfile.exists():
        subprocess.run(["pkill", "-F", str(pidfile), "-f", "mssgw-dovecot.conf"], check=False)
    shutil.rmtree(gw.root, ignore_errors=True)


@pytest.fixture(scope="module")
def gw(dovecot_binary: Path, dev_pki_dir: Path) -> Iterator[GatewayProcess]:
    g = GatewayProcess(short_tmpdir(), dev_pki_dir, accounts=ACCOUNTS, extra=LIMITS, log_level="INFO")
    g.start()
    yield g
    log = g.log.read_text(errors="replace")
    _stop(g)
    assert "Traceback" not in log, log[-4000:]


@pytest.fixture(scope="module")
def roomy(dovecot_binary: Path, dev_pki_dir: Path) -> Iterator[GatewayProcess]:
    """A gateway with the default timeouts and a 1 MB size limit, for the 200 MB sends."""
    g = GatewayProcess(short_tmpdir(), dev_pki_dir, accounts=ACCOUNTS, extra=f"[limits]\nmax_message_size = {MAX_SIZE}\n",
                       log_level="INFO")
    g.start()
    yield g
    log = g.log.read_text(errors="replace")
    _stop(g)
    assert "Traceback" not in log, log[-4000:]


def tls_context(gw: GatewayProcess) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=gw.ca)
    ctx.check_hostname = False
    return ctx


class Raw:
    """A line-level SMTP client over a socket, for what smtplib refuses to send."""

    def __init__(self, gw: GatewayProcess, source: str = "127.0.0.1", greet: bool = True,
                 port: int | None = None) -> None:
        self.gw = gw
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port or gw.smtp_port), timeout=30,
                                                            source_address=(source, 0))
        self.buf = b""
        if greet:
            assert self.reply().startswith(b"220 ")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """One whole reply (the last line of a multi-line one), or b"" when the server closed."""
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return b""
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                return line

    def cmd(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def starttls(self) -> None:
        assert self.cmd(b"EHLO hostile.test").startswith(b"250 ")
        assert self.cmd(b"STARTTLS").startswith(b"220 ")
        self.sock = tls_context(self.gw).wrap_socket(self.sock)
        assert self.cmd(b"EHLO hostile.test").startswith(b"250 ")

    def login(self, user: str = ALICE) -> None:
        self.starttls()
        blob = base64.b64encode(f"\0{user}\0{ACCOUNTS[user]}".encode())
        assert self.cmd(b"AUTH PLAIN " + blob).startswith(b"235 ")

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.sock.close()


def smtp(gw: GatewayProcess, user: str = ALICE, source: str = "127.0.0.1") -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=30, source_address=(source, 0))
    c.starttls(context=tls_context(gw))
    c.login(user, ACCOUNTS[user])
    return c


def message(subject: str, extra: bytes = b"") -> bytes:
    return (f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: {subject}\r\n".encode() + extra
            + b"\r\nCompte rendu.\r\n")


def bob_subjects(gw: GatewayProcess) -> list[bytes]:
    c = imaplib.IMAP4("127.0.0.1", gw.imap_port, timeout=15)
    c.starttls(ssl_context=tls_context(gw))
    c.login(BOB, ACCOUNTS[BOB])
    c.select("INBOX")
    _, data = c.search(None, "ALL")
    out = []
    for num in data[0].split():
        _, parts = c.fetch(num, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        out.append(bytes(parts[0][1]).strip())
    c.logout()
    return out


def delivered(gw: GatewayProcess, subject: str, timeout: float = 30) -> list[bytes]:
    """Bob's subjects once `subject` is among them."""
    deadline = time.monotonic() + timeout
    while True:
        subjects = bob_subjects(gw)
        if f"Subject: {subject}".encode() in subjects or time.monotonic() > deadline:
            return subjects
        time.sleep(0.2)


def peak_rss(gw: GatewayProcess) -> int:
    """The gateway process's peak resident memory so far, in bytes (VmHWM)."""
    assert gw.proc is not None
    for line in Path(f"/proc/{gw.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


# --- Bare CR and LF (SMTP smuggling, RFC 5321 §2.3.8)


@pytest.mark.parametrize("end", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r"])
def test_smuggled_end_of_data_is_never_taken_for_one(gw: GatewayProcess, end: bytes) -> None:
    """A bare LF or CR around a dot does not end DATA: the smuggled second message stays inside the first,
    which is refused whole (550 5.5.2); nothing of it is delivered."""
    tag = end.hex()
    c = Raw(gw)
    c.login()
    assert c.cmd(f"MAIL FROM:<{ALICE}>".encode()).startswith(b"250 ")
    assert c.cmd(f"RCPT TO:<{BOB}>".encode()).startswith(b"250 ")
    assert c.cmd(b"DATA").startswith(b"354 ")
    c.send(message(f"outer {tag}") + end + f"MAIL FROM:<{ALICE}>\r\nRCPT TO:<{BOB}>\r\nDATA\r\n".encode()
           + message(f"smuggled {tag}") + b".\r\n")
    assert c.reply().startswith(b"550 5.5.2 Message refused: bare CR or LF")
    assert c.cmd(b"NOOP").startswith(b"250 ")  # the session goes on, in step
    c.close()
    with smtp(gw) as s:
        s.sendmail(ALICE, [BOB], message(f"marker {tag}"))
    subjects = delivered(gw, f"marker {tag}")
    assert f"Subject: marker {tag}".encode() in subjects
    assert not [s for s in subjects if tag.encode() in s and b"marker" not in s]


def listener_port(gw: GatewayProcess, listener: str) -> int:
    return gw.smtp_port if listener == "submission" else gw.inbound_port


LISTENERS = ["submission", "inbound"]


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("line", [b"NOOP\n", b"EHLO x\n", b"NOOP\rRSET\r\n", b"EHLO a\rb\r\n"])
def test_bare_cr_or_lf_in_a_command_is_refused(gw: GatewayProcess, line: bytes, listener: str) -> None:
    c = Raw(gw, port=listener_port(gw, listener))
    c.send(line)
    assert c.reply() == (b"500 5.5.2 Syntax error: a command line ends with CRLF and holds no other CR or LF"
                         b" (RFC 5321 section 2.3.8)")
    assert c.cmd(b"NOOP") == b"250 2.0.0 OK"
    c.close()


def test_bare_lf_after_auth_cannot_inject_commands(gw: GatewayProcess) -> None:
    c = Raw(gw)
    c.login()
    c.send(f"MAIL FROM:<{ALICE}>\nRCPT TO:<{BOB}>\r\n".encode())
    assert c.reply().startswith(b"500 5.5.2")
    assert c.cmd(b"DATA").startswith(b"503 ")  # neither MAIL nor RCPT was taken
    c.close()


# --- Overlong lines and commands


@pytest.mark.parametrize("listener", LISTENERS)
def test_overlong_commands_are_refused_and_the_session_goes_on(gw: GatewayProcess, listener: str) -> None:
    c = Raw(gw, port=listener_port(gw, listener))
    assert c.cmd(b"NOOP " + b"x" * 600) == b"500 5.5.2 Command line too long"  # RFC 5321 §4.5.3.1.4: 512
    assert c.cmd(b"EHLO " + b"a" * 100_000) == b"500 5.5.2 Command line too long"
    assert c.cmd(b"EHLO ok.test") == b"250 HELP"
    c.close()


def test_an_overlong_data_line_is_refused(gw: GatewayProcess) -> None:
    with smtp(gw) as s:
        s.mail(ALICE)
        s.rcpt(BOB)
        code, text = s.data(message("long line") + b"z" * 5000 + b"\r\n")
        assert (code, text) == (500, b"5.5.2 Line too long (RFC 5321 section 4.5.3.1.6)")
        assert s.noop()[0] == 250


# --- Pipelining abuse


@pytest.mark.parametrize("listener", LISTENERS)
def test_talking_before_the_greeting_is_refused(gw: GatewayProcess, listener: str) -> None:
    c = Raw(gw, greet=False, port=listener_port(gw, listener))
    c.send(b"EHLO eager.test\r\nMAIL FROM:<a@b.test>\r\n")
    assert c.reply() == b"554 5.5.0 Protocol error: commands sent before the greeting (RFC 5321 section 3.1)"
    assert c.reply() == b""  # closed, nothing else answered
    c.close()


@pytest.mark.parametrize("listener", LISTENERS)
def test_commands_pipelined_after_starttls_are_refused(gw: GatewayProcess, listener: str) -> None:
    """CVE-2011-0411: plaintext commands in the same write as STARTTLS must not run after TLS starts."""
    c = Raw(gw, port=listener_port(gw, listener))
    assert c.cmd(b"EHLO hostile.test").startswith(b"250 ")
    c.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<" + ALICE.encode() + b">\r\n")
    assert c.reply() == b"554 5.5.0 Commands sent after STARTTLS in plaintext are refused (RFC 3207 section 4.2)"
    assert c.reply() == b""
    c.close()


def test_plaintext_after_the_starttls_reply_breaks_the_handshake(gw: GatewayProcess) -> None:
    """Plaintext sent after `220` but before the handshake is not a command: TLS fails and the connection ends."""
    c = Raw(gw)
    assert c.cmd(b"EHLO hostile.test").startswith(b"250 ")
    assert c.cmd(b"STARTTLS").startswith(b"220 ")
    c.send(b"MAIL FROM:<" + ALICE.encode() + b">\r\n")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_context(gw).wrap_socket(c.sock)
    c.close()
    with smtp(gw) as s:  # and the gateway serves the next client
        assert s.noop()[0] == 250


def test_a_second_starttls_inside_tls_is_refused(gw: GatewayProcess) -> None:
    """RFC 3207 §4.2: no TLS layer inside TLS (aiosmtpd alone answers 220 and hangs on a nested handshake)."""
    with smtp(gw) as s:
        code, text = s.docmd("STARTTLS")
        assert (code, text) == (554, b"5.5.1 TLS already active")
        assert s.noop()[0] == 250  # the session goes on over the first TLS layer


# --- Too many recipients, too many errors


def test_too_many_recipients(gw: GatewayProcess) -> None:
    with smtp(gw) as s:
        s.mail(ALICE)
        for r in MANY[:5]:
            assert s.rcpt(r)[0] == 250
        assert s.rcpt(MANY[5]) == (452, b"4.5.3 Too many recipients (at most 5 per message)")
        assert s.data(message("five recipients"))[0] == 250


def test_too_many_errors_disconnect(gw: GatewayProcess) -> None:
    c = Raw(gw)
    c.login()
    replies = [c.cmd(f"RCPT TO:<{BOB}>".encode()) for _ in range(7)]
    assert all(r.startswith(b"503 ") for r in replies)
    assert c.cmd(b"DATA").startswith(b"503 ")
    assert c.reply() == b"421 4.7.0 Too many errors on this connection, closing it"
    assert c.closed()


def test_connections_per_client_address(gw: GatewayProcess) -> None:
    """One address may hold max_connections_per_address (6) connections; others still get in."""
    held = [Raw(gw, source="127.0.0.7") for _ in range(6)]
    extra = Raw(gw, source="127.0.0.7", greet=False)
    assert extra.reply() == b"421 4.7.0 Too many connections from your address, please try again later"
    assert extra.reply() == b""
    other = Raw(gw, source="127.0.0.8")  # greeted
    for c in [*held, extra, other]:
        c.close()


def test_the_listener_memory_budget(gw: GatewayProcess) -> None:
    """Two DATAs at once may not hold more than max_buffered_data (1.5 MB) together: the second gets 452 4.3.1,
    and succeeds once the first is done."""
    body = (b"b" * 998 + b"\r\n") * 900
    second = smtp(gw)
    second.mail(ALICE)
    second.rcpt(BOB)
    with smtp(gw) as first:
        first.mail(ALICE)
        first.rcpt(BOB)
        assert first.docmd("DATA")[0] == 354
        first.sock.sendall(message("first of two") + body)  # held by the server, no final dot yet
        time.sleep(0.3)
        assert second.data(message("second of two") + body) == (
            452, b"4.3.1 The gateway is receiving too much mail right now, please try again later")
        first.sock.sendall(b".\r\n")
        assert first.getreply()[0] == 250
    second.mail(ALICE)
    second.rcpt(BOB)
    assert second.data(message("second of two") + body)[0] == 250
    second.quit()


# --- Slow clients


def drip(c: Raw, pieces: list[bytes], interval: float) -> float:
    """Send `pieces` one by one, `interval` apart, until the server says something; the seconds it took."""
    start = time.monotonic()
    for piece in pieces:
        c.send(piece)
        readable, _, _ = select.select([c.sock], [], [], interval)
        if readable:
            break
    return time.monotonic() - start


def test_silent_client_gets_421_after_the_idle_timeout(gw: GatewayProcess) -> None:
    c = Raw(gw)
    start = time.monotonic()
    assert c.reply() == b"421 4.4.2 Timeout waiting for the client, closing the connection"
    assert 3 < time.monotonic() - start < 30
    assert c.closed()


def test_a_command_dribbled_slowly_times_out(gw: GatewayProcess) -> None:
    """The idle timer is reset by whole commands, not by bytes: a command sent byte by byte runs out of time."""
    c = Raw(gw)
    took = drip(c, [bytes([b]) for b in b"NOOP NOOP NOOP NOOP NOOP NOOP NOOP"], 0.5)
    assert c.reply() == b"421 4.4.2 Timeout waiting for the client, closing the connection"
    assert 3 < took < 30  # idle_timeout = 4


def test_a_stalled_tls_handshake_times_out(gw: GatewayProcess) -> None:
    c = Raw(gw)
    assert c.cmd(b"EHLO hostile.test").startswith(b"250 ")
    assert c.cmd(b"STARTTLS").startswith(b"220 ")
    start = time.monotonic()
    c.send(client_hello_start())  # the first bytes of a ClientHello, then nothing
    assert c.sock.recv(100) == b""
    assert 3 < time.monotonic() - start < 30  # idle_timeout = 4
    with smtp(gw) as s:
        assert s.noop()[0] == 250


def client_hello_start() -> bytes:
    return b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def test_data_stalls_time_out(gw: GatewayProcess) -> None:
    c = Raw(gw)
    c.login()
    c.cmd(f"MAIL FROM:<{ALICE}>".encode())
    c.cmd(f"RCPT TO:<{BOB}>".encode())
    assert c.cmd(b"DATA").startswith(b"354")
    c.send(message("stalled"))
    start = time.monotonic()
    assert c.reply() == b"421 4.4.2 Timeout waiting for the client, closing the connection"
    assert 1.5 < time.monotonic() - start < 30  # data_timeout = 2


def test_a_dripping_data_is_cut_at_max_data_duration(gw: GatewayProcess) -> None:
    """Each line comes before data_timeout (2 s), but the whole DATA may not last over max_data_duration (6 s)."""
    c = Raw(gw)
    c.login()
    c.cmd(f"MAIL FROM:<{ALICE}>".encode())
    c.cmd(f"RCPT TO:<{BOB}>".encode())
    assert c.cmd(b"DATA").startswith(b"354")
    took = drip(c, [b"drip\r\n"] * 40, 1.0)
    assert c.reply() == b"421 4.4.2 Timeout waiting for the client, closing the connection"
    assert 5 < took < 20


# --- Far over the size limit, with memory that does not grow


def _send_huge(gw: GatewayProcess, chunk: bytes, total: int, end: bytes) -> tuple[int, bytes, int]:
    """DATA of `total` bytes made of `chunk`; the reply and the growth of the gateway's peak RSS."""
    with smtp(gw) as s:
        s.mail(ALICE)
        s.rcpt(BOB)
        assert s.docmd("DATA")[0] == 354
        before = peak_rss(gw)
        sent = 0
        while sent < total:
            s.sock.sendall(chunk)
            sent += len(chunk)
        s.sock.sendall(end)
        code, text = s.getreply()
        grown = peak_rss(gw) - before
        print(f"{total} bytes sent: the gateway's peak RSS grew by {grown} bytes")
        assert s.noop()[0] == 250
    return code, text, grown


@pytest.mark.timeout(600)
def test_200_mb_data_is_refused_and_memory_does_not_grow(roomy: GatewayProcess) -> None:
    lines = (b"x" * 998 + b"\r\n") * 1024
    code, text, grown = _send_huge(roomy, lines, 200 * 1024 * 1024, b".\r\n")
    assert (code, text) == (552, f"5.3.4 Message too big: the limit is {MAX_SIZE} bytes".encode())
    assert grown < 48 * 1024 * 1024, f"peak RSS grew by {grown} bytes"


@pytest.mark.timeout(600)
def test_200_mb_single_line_data_and_memory_does_not_grow(roomy: GatewayProcess) -> None:
    code, text, grown = _send_huge(roomy, b"y" * 1024 * 1024, 200 * 1024 * 1024, b"\r\n.\r\n")
    assert (code, text) == (500, b"5.5.2 Line too long (RFC 5321 section 4.5.3.1.6)")
    assert grown < 48 * 1024 * 1024, f"peak RSS grew by {grown} bytes"


@pytest.mark.timeout(600)
def test_200_mb_command_line_and_memory_does_not_grow(roomy: GatewayProcess) -> None:
    c = Raw(roomy)
    before = peak_rss(roomy)
    c.send(b"EHLO ")
    chunk = b"h" * 1024 * 1024
    for _ in range(200):
        c.send(chunk)
    assert c.cmd(b"") == b"500 5.5.2 Command line too long"
    assert c.cmd(b"NOOP") == b"250 2.0.0 OK"
    grown = peak_rss(roomy) - before
    assert grown < 48 * 1024 * 1024, f"peak RSS grew by {grown} bytes"
    c.close()


# --- Invalid UTF-8 and SMTPUTF8


def test_smtputf8_and_invalid_utf8_get_clean_replies(gw: GatewayProcess) -> None:
    c = Raw(gw)
    c.login()
    c.send(b"EHLO hostile.test\r\n")
    ehlo = b""
    while not ehlo.startswith(b"250 "):
        ehlo = c.reply()
        assert b"SMTPUTF8" not in ehlo
    assert c.cmd(f"MAIL FROM:<{ALICE}> SMTPUTF8".encode()) == (
        b"555 5.5.4 SMTPUTF8 is not offered by this server (RFC 6531)")
    assert c.cmd("MAIL FROM:<élise@dev.mssante.test>".encode()) == (
        b"500 5.6.7 Non-ASCII characters in a command are not accepted (no SMTPUTF8)")
    assert c.cmd(b"MAIL FROM:<\xff\xfe@dev.mssante.test>").startswith(b"500 5.6.7")
    assert c.cmd(b"\xff\xfeNOOP") == b"500 5.5.2 Syntax error"
    assert c.cmd(b"RSET") == b"250 2.0.0 OK"
    c.close()

    c = Raw(gw)
    c.starttls()
    bad = base64.b64encode(b"\0\xff\xfe@" + DOMAIN.encode() + b"\0\xc3\x28")
    assert c.cmd(b"AUTH PLAIN " + bad).startswith(b"535 5.7.8")
    c.close()

    with smtp(gw) as s:  # 8-bit and broken UTF-8 in the header block: judged, never a crash
        s.mail(ALICE)
        s.rcpt(BOB)
        code, _ = s.data(b"From: \xff\xfe <" + ALICE.encode() + b">\r\nSubject: \xc3\x28 broken\r\n\r\nbody\r\n")
        assert code in (250, 553)
        s.mail(ALICE)
        s.rcpt(BOB)
        code, _ = s.data(b"From: " + ALICE.encode() + b"\r\nSubject: \xe9t\xe9 \xf0\x28\x8c\x28\r\n\r\n\xff\r\n")
        assert code == 250
    log = gw.log.read_text(errors="replace")
    assert "Traceback" not in log and "451 4.3.0" not in log


# --- Open relay tricks


RELAY_TRICKS = [
    "<victim@elsewhere.test>",
    "<VICTIM@ELSEWHERE.TEST>",
    f"<@{DOMAIN}:victim@elsewhere.test>",
    f"@{DOMAIN}:victim@elsewhere.test",
    f"<@{DOMAIN},@other.test:victim@elsewhere.test>",
    f"<victim%elsewhere.test@{DOMAIN}>",
    f"<VICTIM%ELSEWHERE.TEST@{DOMAIN.upper()}>",
    f"<victim!elsewhere.test@{DOMAIN}>",
    f"<elsewhere.test!victim@{DOMAIN}>",
    f'<"victim@elsewhere.test"@{DOMAIN}>',
    f'<"victim%elsewhere.test"@{DOMAIN}>',
    f"<victim@elsewhere.test@{DOMAIN}>",
    f"<bob@{DOMAIN}@elsewhere.test>",
    "<victim@[127.0.0.1]>",
    "<bob@[127.0.0.1]>",
    "<victim@[IPv6:::1]>",
    "<victim@elsewhere.test.>",
    f"<victim@{DOMAIN}.>",
    f"<victim@{DOMAIN}.elsewhere.test>",
    "<victim@elsewhere.test > ",
    "<postmaster@elsewhere.test>",
]


def test_open_relay_tricks_are_refused(gw: GatewayProcess) -> None:
    for batch in range(0, len(RELAY_TRICKS), 5):  # max_errors = 8 per connection
        with smtp(gw) as s:
            assert s.mail(ALICE)[0] == 250
            for trick in RELAY_TRICKS[batch:batch + 5]:
                code, text = s.docmd("RCPT", f"TO:{trick}")
                assert 500 <= code < 600, (trick, code, text)
            assert s.docmd("DATA")[0] == 503  # no recipient was taken
    with smtp(gw) as s:
        assert s.mail("<>")[0] == 553  # the null sender is not for clients
        assert s.docmd("RCPT", f"TO:<{BOB}>")[0] == 503
        assert s.docmd("RCPT", "TO:<victim@elsewhere.test>")[0] == 503


# --- AUTH brute force


def _auth(gw: GatewayProcess, source: str, user: str, password: str, tries: int = 1) -> list[bytes]:
    c = Raw(gw, source=source)
    c.starttls()
    out = []
    for _ in range(tries):
        blob = base64.b64encode(f"\0{user}\0{password}".encode())
        reply = c.cmd(b"AUTH PLAIN " + blob)
        out.append(reply)
        if not reply.startswith(b"535"):
            break
    c.close()
    return out


def test_auth_brute_force_limits_per_address_and_per_account(gw: GatewayProcess) -> None:
    usual, attacker, elsewhere = "127.0.0.2", "127.0.0.3", "127.0.0.4"
    right = ACCOUNTS[CAROL]
    assert _auth(gw, usual, CAROL, right)[0].startswith(b"235")  # carol's usual desk
    # Two failures per connection, then 421; the third failure locks the login (auth_account_failures = 3).
    assert [r[:3] for r in _auth(gw, attacker, CAROL, "guess", tries=3)] == [b"535", b"421"]
    assert _auth(gw, attacker, CAROL, "guess-3") == [b"535 5.7.8 Authentication failed: wrong login or password"]
    locked = b"454 4.7.0 Too many failed logins for this account; try again later"
    assert _auth(gw, attacker, CAROL, right) == [locked]  # even the right password is not checked now
    assert _auth(gw, elsewhere, CAROL, right) == [locked]  # a new address waits for the lock to end
    assert _auth(gw, usual, CAROL, right)[0].startswith(b"235")  # the usual desk is not locked out
    # A fourth failure from the attacker's address, on another login, locks the address (auth_address_failures = 4).
    assert _auth(gw, attacker, f"dave@{DOMAIN}", "guess")[0].startswith(b"535")
    by_address = b"454 4.7.0 Too many failed logins from your address; try again later"
    assert _auth(gw, attacker, ALICE, ACCOUNTS[ALICE]) == [by_address]
    time.sleep(5.5)  # auth_account_lockout = 5: the login lock is short ...
    assert _auth(gw, elsewhere, CAROL, right)[0].startswith(b"235")
    assert _auth(gw, attacker, CAROL, right) == [by_address]  # ... the address lock is long (120 s)
