"""Hostile IMAP clients against the embedded Dovecot as the gateway configures it, through the gateway's IMAP relay.

Every client here speaks raw IMAP over a real socket from its own loopback address (127.0.0.0/8 is all local), so
that what Dovecot does per client address (the authentication penalty) and what the relay counts per address can be
told apart. Each test is the proof of one entry of docs/SECURITY.md (IMAP).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import logging
import os
import re
import secrets
import shutil
import socket
import ssl
import string
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import lmtp
from gateway.dovecot_config import DovecotConfigError, render_config

pytestmark = pytest.mark.dovecot

DOMAIN = "dev.mssante.test"
ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
RunningDovecot = Any  # tests/integration/conftest.py:RunningDovecot (test modules do not import conftest)

# The instance of this module: small limits, so that reaching them is quick.
MAX_CONNECTIONS = 10
MAX_PER_IP = 3
AUTH_ADDRESS_FAILURES = 3
_addresses = itertools.count(1)


def fresh_address() -> str:
    """A loopback address no other test of this module uses (Dovecot and the relay keep state per address)."""
    n = next(_addresses)
    return f"127.{os.getpid() % 200 + 20}.{n // 250}.{n % 250 + 1}"


class Imap:
    """A raw IMAP client bound to one source address: sends exactly the bytes given, reads lines."""

    def __init__(self, dv: RunningDovecot, source: str, *, tls: bool = True, timeout: float = 60) -> None:
        self.dv = dv
        self.sock: socket.socket = socket.create_connection(dv.imap, timeout=timeout, source_address=(source, 0))
        self.file = self.sock.makefile("rb")
        self.greeting = self.file.readline()
        if tls:
            assert self.command(b"s STARTTLS")[-1].startswith(b"s OK")
            self.start_tls()

    def start_tls(self) -> None:
        ctx = ssl.create_default_context(cafile=str(self.dv.cfg.tls.ca))
        ctx.check_hostname = False  # the dev certificate names gw.dev.mssante.test, we connect to 127.0.0.1
        self.sock = ctx.wrap_socket(self.sock)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        """Send, tolerating a server that hangs up first (its answer is still there to read)."""
        try:
            self.sock.sendall(data)
        except (ConnectionError, ssl.SSLError):
            pass

    def line(self) -> bytes:
        try:
            return self.file.readline()
        except (ConnectionError, ssl.SSLError):
            return b""

    def until(self, tag: bytes) -> list[bytes]:
        """Lines up to the tagged reply of `tag`, or to the end of the connection (then the last one is b"")."""
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if not line or line.startswith(tag + b" "):
                return lines

    def command(self, line: bytes) -> list[bytes]:
        self.send(line + b"\r\n")
        return self.until(line.split(b" ", 1)[0])

    def login(self, user: str, password: str) -> bytes:
        return self.command(f'a LOGIN "{user}" "{password}"'.encode())[-1]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()  # the socket's descriptor stays open while a file made from it is
        with contextlib.suppress(OSError):
            self.sock.close()


def tagged(lines: list[bytes]) -> bytes:
    return lines[-1]


def vm_rss() -> int:
    """Resident memory of this process, in bytes: the relay runs here, on the fixture's loop thread."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def doveconf(dv: RunningDovecot, *args: str) -> str:
    conf = dv.cfg.mailboxes.base_dir / "mssgw-dovecot.conf"
    return subprocess.run(["doveconf", "-c", str(conf), *args], capture_output=True, text=True, check=True).stdout


def penalties(dv: RunningDovecot) -> dict[str, int]:
    """Dovecot's authentication penalty per client address, as its anvil process holds it (`doveadm penalty`)."""
    conf = dv.cfg.mailboxes.base_dir / "mssgw-dovecot.conf"
    out = subprocess.run(["doveadm", "-c", str(conf), "penalty"], capture_output=True, text=True, check=True).stdout
    return {fields[0]: int(fields[1]) for fields in (line.split() for line in out.splitlines()[1:]) if fields}


def deliver(dv: RunningDovecot, recipient: str, subject: str) -> None:
    message = f"From: <x@{DOMAIN}>\r\nSubject: {subject}\r\n\r\nprivate\r\n".encode()
    replies = asyncio.run(lmtp.deliver(dv.lmtp, f"x@{DOMAIN}", [recipient], message, timeout=30))
    assert replies[recipient].code == 250


def assert_still_serving(dv: RunningDovecot, master_pid: int) -> None:
    """Dovecot was not restarted and the relay serves a new client, who logs in and reads their INBOX."""
    assert dv.supervisor.pid == master_pid and dv.supervisor.restarts == 0
    client = Imap(dv, fresh_address())
    try:
        assert tagged([client.login(ALICE, dv.accounts[ALICE])]).startswith(b"a OK")
        assert tagged(client.command(b"b SELECT INBOX")).startswith(b"b OK")
    finally:
        client.close()


class LogLines(logging.Handler):
    """Dovecot's log lines as the supervisor carries them into the gateway.dovecot logger."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self._lock_lines = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_lines:
            self.lines.append(record.getMessage())

    def matching(self, pattern: str) -> list[str]:
        with self._lock_lines:
            return [line for line in self.lines if re.search(pattern, line)]


@pytest.fixture(scope="module")
def hostile(dovecot_kit: Any) -> Iterator[RunningDovecot]:
    """An embedded Dovecot of its own, with small connection and failed-login limits."""
    root = dovecot_kit.new_root()
    cfg = dovecot_kit.config(root, dovecot_kit.sqlite_accounts(root / "gateway.db"))
    imap_limits = dataclasses.replace(cfg.mailboxes.limits, max_connections=MAX_CONNECTIONS,
                                      max_connections_per_ip=MAX_PER_IP, auth_failure_delay=1)
    cfg = dataclasses.replace(
        cfg, mailboxes=dataclasses.replace(cfg.mailboxes, limits=imap_limits),
        limits=dataclasses.replace(cfg.limits, auth_address_failures=AUTH_ADDRESS_FAILURES, auth_address_lockout=900))
    dv = dovecot_kit.start(cfg, root, dovecot_kit.ACCOUNTS)
    yield dv
    dovecot_kit.stop(dv)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def dovecot_log() -> Iterator[LogLines]:
    logger = logging.getLogger("gateway.dovecot")
    handler = LogLines()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


# 1. Brute force ---------------------------------------------------------------------------------------------------


def test_failed_logins_are_slowed_per_address_then_refused(hostile: RunningDovecot, dovecot_log: LogLines) -> None:
    attacker, colleague = fresh_address(), fresh_address()
    client = Imap(hostile, attacker)
    try:
        # A client may claim another address in ID; no network is trusted, so Dovecot keeps the real one.
        assert tagged(client.command(b'i ID ("name" "x" "x-originating-ip" "10.66.0.1")')).startswith(b"i OK")
        durations = []
        for n in range(AUTH_ADDRESS_FAILURES):
            started = time.monotonic()
            assert b"AUTHENTICATIONFAILED" in client.login(ALICE, f"guess-{n}")
            durations.append(time.monotonic() - started)
    finally:
        client.close()
    penalty = penalties(hostile)
    assert penalty.get(attacker, 0) >= AUTH_ADDRESS_FAILURES - 1, penalty  # counted for the real client address
    assert "10.66.0.1" not in penalty and "127.0.0.1" not in penalty and colleague not in penalty
    # auth_failure_delay (1 s) and, from the second failure on, the penalty (2 s, then 4 s...): a lower bound only.
    assert durations[-1] >= 3, durations
    assert dovecot_log.matching(rf"sql\({re.escape(ALICE)},{re.escape(attacker)},<[^>]*>\): Password mismatch")

    # Past auth_address_failures, the relay refuses the address before Dovecot sees it (the log may lag a little).
    deadline = time.monotonic() + 30
    while True:
        refused = Imap(hostile, attacker, tls=False)
        greeting = refused.greeting
        refused.close()
        if greeting.startswith(b"* BYE") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert greeting.startswith(b"* BYE [LIMIT] Too many failed logins"), greeting

    # The right password from another address is neither slowed by the attacker's penalty nor refused.
    other = Imap(hostile, colleague)
    try:
        assert other.greeting.startswith(b"* OK")
        assert other.login(ALICE, hostile.accounts[ALICE]).startswith(b"a OK")
    finally:
        other.close()
    assert colleague not in penalties(hostile)
    assert dovecot_log.matching(rf"Login: user=<{re.escape(ALICE)}>.* rip={re.escape(colleague)},")


def wait_for_no_connections(dv: RunningDovecot) -> None:
    deadline = time.monotonic() + 30
    while dv.supervisor.connections and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dv.supervisor.connections == 0


def test_connections_are_limited_per_address_and_in_all(hostile: RunningDovecot) -> None:
    wait_for_no_connections(hostile)  # those of earlier tests, ending
    crowd = fresh_address()
    held = [Imap(hostile, crowd, tls=False) for _ in range(MAX_PER_IP)]
    try:
        assert all(c.greeting.startswith(b"* OK") for c in held)
        extra = Imap(hostile, crowd, tls=False)
        assert extra.greeting.startswith(b"* BYE [LIMIT] Too many connections from your address"), extra.greeting
        assert extra.line() == b""  # and the relay hung up
        extra.close()
        while len(held) < MAX_CONNECTIONS:
            held.append(Imap(hostile, fresh_address(), tls=False))
            assert held[-1].greeting.startswith(b"* OK")
        full = Imap(hostile, fresh_address(), tls=False)
        assert full.greeting.startswith(b"* BYE [LIMIT] Too many connections"), full.greeting
        full.close()
    finally:
        for c in held:
            c.close()
    # Closed connections are given back: the same address is served again.
    wait_for_no_connections(hostile)
    again = Imap(hostile, crowd)
    try:
        assert again.login(BOB, hostile.accounts[BOB]).startswith(b"a OK")
    finally:
        again.close()


# 2. Another user's mailbox ----------------------------------------------------------------------------------------

# Names that would reach bob's mailbox, or a path outside alice's Maildir, if Dovecot took them as paths or as
# namespaces (other users "~bob", shared "#shared/..." or "shared/user"), in mUTF-7 and in UTF-8 (a look-alike dot).
OTHER_MAILBOX_NAMES = [
    "../bob", "../bob/Maildir", "../../dev.mssante.test/bob/Maildir", "~bob", f"~{BOB}", "~bob/INBOX", "~/../bob",
    "#shared/bob", f"shared/{BOB}", f"#user/{BOB}", "/", f"/{DOMAIN}/bob/Maildir", "/etc", "..", ".bob", "INBOX..bob",
    "INBOX/../../bob", "Maildir/../../bob", "&AC4-&AC4-&AC8-bob", "\u2024\u2024/bob", BOB, "%", "*",
]


def own_folder_name(name: str) -> bool:
    """A name that can only be a folder of alice's own: no path, no namespace prefix, no empty level."""
    return "/" not in name and ".." not in name and not name.startswith((".", "~", "#")) and not name.endswith(".")


def drop_own_folder(client: Imap, name: str) -> None:
    """Remove a folder of alice's own made by a test, with the levels its dots made (separator ".")."""
    client.command(b'x UNSUBSCRIBE "' + name.encode() + b'"')
    levels = name.split(".")
    for n in range(len(levels), 0, -1):
        client.command(b'x DELETE "' + ".".join(levels[:n]).encode() + b'"')


def test_no_other_mailbox_by_name_path_or_namespace(hostile: RunningDovecot) -> None:
    subject = f"for bob only {secrets.token_hex(4)}"
    deliver(hostile, BOB, subject)
    mail_dir = hostile.cfg.mailboxes.mail_dir
    bob_maildir = mail_dir / DOMAIN / "bob" / "Maildir"
    before = sorted(str(p.relative_to(bob_maildir)) for p in bob_maildir.rglob("*") if "dovecot" not in p.name)
    client = Imap(hostile, fresh_address())
    try:
        assert client.login(ALICE, hostile.accounts[ALICE]).startswith(b"a OK")
        namespace = client.command(b"n NAMESPACE")
        assert namespace[0] == b'* NAMESPACE (("" ".")) NIL NIL\r\n'  # personal only: no other users, no shared
        deliver(hostile, ALICE, "alice's own")
        assert tagged(client.command(b"m CREATE mine")).startswith(b"m OK")
        for utf8 in (False, True):  # mailbox names as modified UTF-7, then as UTF-8 (RFC 6855)
            if utf8:
                assert tagged(client.command(b"u ENABLE UTF8=ACCEPT")).startswith(b"u OK")
            for name in OTHER_MAILBOX_NAMES:
                try_other_mailbox(client, name)
        listing = client.command(b'l LIST "" "*" RETURN (STATUS (MESSAGES))')
        assert not any(b"bob" in line.lower() for line in listing), listing
        assert tagged(client.command(b"s SELECT INBOX")).startswith(b"s OK")
        search = client.command(f'f SEARCH SUBJECT "{subject}"'.encode())
        assert search[0] == b"* SEARCH\r\n" and tagged(search).startswith(b"f OK")
        # Access control and metadata commands do not exist here (no acl plugin, imap_metadata = no, no URLAUTH).
        for command in (b"GETACL INBOX", f"SETACL INBOX {BOB} lrswipkxtecda".encode(), b"MYRIGHTS INBOX",
                        f"LISTRIGHTS INBOX {BOB}".encode(), f"DELETEACL INBOX {BOB}".encode(),
                        b'SETMETADATA INBOX (/shared/vendor/x "y")', b'GETMETADATA "" /shared/comment',
                        b"GETQUOTAROOT INBOX", f'GENURLAUTH "imap://{BOB}@x/INBOX;uid=1" INTERNAL'.encode(),
                        f'URLFETCH "imap://{BOB}@{DOMAIN}/INBOX/;uid=1"'.encode()):
            reply = tagged(client.command(b"c " + command))
            assert reply.startswith((b"c NO", b"c BAD")), (command, reply)
    finally:
        client.close()
    after = sorted(str(p.relative_to(bob_maildir)) for p in bob_maildir.rglob("*") if "dovecot" not in p.name)
    assert after == before  # nothing created, moved nor deleted in bob's mailbox
    assert {p.name for p in mail_dir.iterdir()} == {DOMAIN}  # nothing escaped the users' Maildirs
    assert {p.name for p in (mail_dir / DOMAIN).iterdir()} <= {"alice", "bob"}
    assert {p.name for p in (mail_dir / DOMAIN / "alice").iterdir()} == {"Maildir"}


def try_other_mailbox(client: Imap, name: str) -> None:
    """Every command that takes a mailbox name, with `name`: refused, or (a plain name) a folder of alice's own."""
    quoted = b'"' + name.encode() + b'"'
    assert tagged(client.command(b"s SELECT INBOX")).startswith(b"s OK")
    for command in (b"SELECT", b"EXAMINE", b"STATUS", b"DELETE", b"COPY 1", b"MOVE 1", b"UID COPY 1:*",
                    b"CREATE", b"SUBSCRIBE", b"RENAME mine"):
        tail = b" (MESSAGES UNSEEN)" if command == b"STATUS" else b""
        reply = tagged(client.command(b"x " + command + b" " + quoted + tail))
        if reply.startswith(b"x OK") and command in (b"CREATE", b"SUBSCRIBE", b"RENAME mine"):
            assert own_folder_name(name), (command, name, reply)
            if command == b"RENAME mine":
                assert tagged(client.command(b"x RENAME " + quoted + b" mine")).startswith(b"x OK")
            drop_own_folder(client, name)
            continue
        assert not reply.startswith(b"x OK"), (command, name, reply)
        if command in (b"SELECT", b"EXAMINE"):
            assert tagged(client.command(b"s SELECT INBOX")).startswith(b"s OK")
    for reference, pattern in (("", name), (name, "*"), (name, "%")):
        listing = client.command(f'l LIST "{reference}" "{pattern}"'.encode())
        assert not any(b"bob" in line.lower() for line in listing[:-1]), (reference, pattern, listing)
    append = client.command(b"p APPEND " + quoted + b" {5+}\r\nhello")
    assert not tagged(append).startswith(b"p OK"), (name, append)


def test_an_account_name_cannot_lead_to_another_home(hostile: RunningDovecot, dovecot_kit: Any) -> None:
    """The home is mail_dir/<domain>/<local part>: a "/" in a local part (RFC 5322 atext allows it) could name
    another user's home ("/alice" is "alice"); "." levels cannot (dot-atom). Dovecot refuses such names at login and
    at delivery (auth_username_chars), even when an operator put one in the accounts table by hand."""
    tricks = {f"/alice@{DOMAIN}": "slash-password-1", f"alice/@{DOMAIN}": "slash-password-2",
              f"x/../alice@{DOMAIN}": "slash-password-3"}
    dovecot_kit.sqlite_accounts(hostile.root / "gateway.db", tricks)
    for address, password in tricks.items():
        message = b"Subject: x\r\n\r\nx\r\n"
        replies = asyncio.run(lmtp.deliver(hostile.lmtp, f"x@{DOMAIN}", [address], message, timeout=30))
        assert replies[address].code == 550, (address, replies)
        client = Imap(hostile, fresh_address())
        try:
            assert b"AUTHENTICATIONFAILED" in client.login(address, password), address
        finally:
            client.close()
    chars = doveconf(hostile, "-h", "auth_username_chars").strip()
    assert "/" not in chars and set(chars) == set(string.ascii_letters + string.digits + ".-_@")


def test_rendered_dovecot_has_one_private_namespace_and_no_privileges(hostile: RunningDovecot) -> None:
    settings = {}
    for line in doveconf(hostile, "-a").splitlines():
        if not line.startswith((" ", "#", "}")):
            name, _, value = line.partition(" =")
            settings[name] = value.strip()
    assert settings["mail_full_filesystem_access"] == "no"
    assert settings["mail_privileged_group"] == "" and settings["mail_access_groups"] == ""
    assert settings["login_trusted_networks"] == "" and settings["haproxy_trusted_networks"] == "127.0.0.1"
    assert settings["imap_metadata"] == "no" and settings["imap_urlauth_host"] == ""
    assert settings["mail_attribute_dict"] == "" and settings["mail_chroot"] == ""
    assert settings["disable_plaintext_auth"] == "yes" and settings["ssl"] == "required"
    assert "acl" not in doveconf(hostile, "-h", "-f", "protocol=imap", "mail_plugins").split()
    namespaces = re.findall(r"^namespace (\S+) \{\n(.*?)^\}", doveconf(hostile, "-n"), re.MULTILINE | re.DOTALL)
    assert [name for name, _ in namespaces] == ["inbox"]
    assert re.search(r"^\s*type = private$", namespaces[0][1], re.MULTILINE)


# 3. Oversized literals, deep nesting, long lines, pipelining -----------------------------------------------------


def test_oversized_literals_are_refused_and_memory_stays_bounded(hostile: RunningDovecot) -> None:
    master = hostile.supervisor.pid
    for tls in (False, True):  # before login, on the clear connection and inside TLS
        client = Imap(hostile, fresh_address(), tls=tls)
        assert client.command(b"a LOGIN {100000000}")[:2] == [b"* BYE Literal size too large\r\n", b""]
        client.close()
    client = Imap(hostile, fresh_address())
    try:
        assert client.login(ALICE, hostile.accounts[ALICE]).startswith(b"a OK")
        reply = tagged(client.command(b"b APPEND INBOX {100000000}"))  # synchronising: refused before any data
        assert reply.startswith(b"b NO [LIMIT]"), reply
        # LITERAL+ (RFC 7888): the client sends without waiting; the bytes go through the relay and are dropped.
        size = hostile.cfg.limits.max_message_size + 5 * 1024 * 1024
        before = vm_rss()
        client.send(b"c APPEND INBOX {%d+}\r\n" % size)
        chunk = b"x" * 1024 * 1024 + b"\r\n"
        sent = 0
        peak = before
        while sent < size:
            piece = chunk[: size - sent]
            client.send(piece)
            sent += len(piece)
            peak = max(peak, vm_rss())
        client.send(b"\r\n")
        assert tagged(client.until(b"c")).startswith(b"c NO [LIMIT]")
        assert tagged(client.command(b"d NOOP")).startswith(b"d OK")
        assert peak - before < 16 * 1024 * 1024, (before, peak)  # the relay copies in 64 KB chunks
    finally:
        client.close()
    assert_still_serving(hostile, master)


def test_a_client_that_does_not_read_costs_the_relay_bounded_memory(hostile: RunningDovecot) -> None:
    master = hostile.supervisor.pid
    big = 2 * 1024 * 1024
    message = f"From: <x@{DOMAIN}>\r\nSubject: big\r\n\r\n".encode() + (b"y" * 998 + b"\r\n") * (big // 1000)
    replies = asyncio.run(lmtp.deliver(hostile.lmtp, f"x@{DOMAIN}", [BOB], message, timeout=60))
    assert replies[BOB].code == 250
    client = Imap(hostile, fresh_address())
    try:
        assert client.login(BOB, hostile.accounts[BOB]).startswith(b"a OK")
        assert tagged(client.command(b"s SELECT INBOX")).startswith(b"s OK")
        before = vm_rss()
        # 200 copies of a 2 MB message asked for, none read: Dovecot writes until the relay stops reading from it.
        client.send(b"".join(b"f%d FETCH 1:* (BODY.PEEK[])\r\n" % i for i in range(200)))
        peak = before
        for _ in range(30):
            time.sleep(0.1)
            peak = max(peak, vm_rss())
        assert peak - before < 16 * 1024 * 1024, (before, peak)  # the relay waits for the client (drain)
    finally:
        client.close()
    assert_still_serving(hostile, master)


def test_deep_nesting_long_lines_and_pipelining_are_answered(hostile: RunningDovecot) -> None:
    master = hostile.supervisor.pid
    limit = hostile.cfg.mailboxes.limits.max_line_length
    client = Imap(hostile, fresh_address(), tls=False)
    # Dovecot answers BYE and hangs up; the client may see only the reset, its BYE discarded with unread data.
    reply = client.command(b"a CAPABILITY " + b"a" * (20 * 1024 * 1024))
    assert reply in ([b"* BYE Input buffer full, aborting\r\n", b""], [b""]), reply
    client.close()
    client = Imap(hostile, fresh_address(), tls=False)
    client.send(b"j1 FOO\r\nj2 BAR\r\nj3 BAZ\r\nj4 QUX\r\nj5 LOGOUT\r\n")  # pre-login: bad commands, then out
    junk = client.until(b"none")  # to the end of the connection
    assert any(line.startswith(b"* BYE Too many invalid") for line in junk), junk
    client.close()
    client = Imap(hostile, fresh_address())
    try:
        assert client.login(ALICE, hostile.accounts[ALICE]).startswith(b"a OK")
        deliver(hostile, ALICE, "nesting")
        assert tagged(client.command(b"s SELECT INBOX")).startswith(b"s OK")
        depth = (limit - 64) // 2
        for query in (b"(" * depth + b"ALL" + b")" * depth, b"NOT " * ((limit - 64) // 4) + b"ALL",
                      b"OR ALL " * ((limit - 64) // 7) + b"ALL", b"(" * 100_000 + b"ALL" + b")" * 100_000):
            answer = tagged(client.command(b"q SEARCH " + query))
            assert answer.startswith((b"q OK", b"q BAD")), answer[:200]
        long_line = tagged(client.command(b"t SEARCH TEXT " + b"a" * (limit * 4))).lower()
        assert long_line.startswith(b"t bad") and (b"too long" in long_line or b"too large" in long_line), long_line
        count = 20_000
        client.send(b"".join(b"p%d NOOP\r\n" % i for i in range(count)))
        answered = [line for line in client.until(b"p%d" % (count - 1)) if line.startswith(b"p")]
        assert len(answered) == count and all(b" OK " in line for line in answered)
        client.send(b"".join(b"f%d FETCH 1:* (FLAGS BODY.PEEK[HEADER])\r\n" % i for i in range(2000)))
        assert tagged(client.until(b"f1999")).startswith(b"f1999 OK")
    finally:
        client.close()
    assert_still_serving(hostile, master)


# 4. Nothing before TLS --------------------------------------------------------------------------------------------


def test_no_authentication_of_any_kind_before_starttls(hostile: RunningDovecot) -> None:
    client = Imap(hostile, fresh_address(), tls=False)
    try:
        assert b"LOGINDISABLED" in client.greeting and b"STARTTLS" in client.greeting
        assert b"AUTH=" not in client.greeting
        initial = base64.b64encode(f"\0{ALICE}\0{hostile.accounts[ALICE]}".encode())
        attempts = [b"AUTHENTICATE PLAIN " + initial, b"AUTHENTICATE PLAIN", b"AUTHENTICATE LOGIN",
                    b'ID ("name" "x" "x-originating-ip" "10.66.0.2")',
                    f'LOGIN {ALICE} {{{len(hostile.accounts[ALICE])}+}}\r\n{hostile.accounts[ALICE]}'.encode(),
                    f"LOGIN {ALICE} {hostile.accounts[ALICE]}".encode(), b"SELECT INBOX", b"CAPABILITY"]
        for n, attempt in enumerate(attempts):
            reply = client.command(b"t%d " % n + attempt)
            if attempt.startswith((b"ID", b"CAPABILITY")):  # allowed, and changes nothing
                assert tagged(reply).startswith(b"t%d OK" % n)
                if attempt == b"CAPABILITY":
                    assert b"LOGINDISABLED" in reply[0] and b"AUTH=" not in reply[0], reply
            else:
                assert tagged(reply).startswith((b"t%d NO" % n, b"t%d BAD" % n)), (attempt, reply)
                assert b"PRIVACYREQUIRED" in tagged(reply) or attempt == b"SELECT INBOX", reply
    finally:
        client.close()


def test_bytes_sent_with_starttls_are_discarded(hostile: RunningDovecot, dovecot_log: LogLines) -> None:
    source = fresh_address()
    password = hostile.accounts[ALICE]
    client = Imap(hostile, source, tls=False)
    try:
        # One segment: STARTTLS and commands a man in the middle would want run once the session is encrypted.
        client.send(f"s STARTTLS\r\nz1 LOGIN {ALICE} {password}\r\nz2 SELECT INBOX\r\n".encode())
        assert client.line().startswith(b"s OK")
        client.start_tls()  # the relay dropped the injected bytes: the handshake is clean
        answers = client.command(b"y CAPABILITY")
        assert not any(line.startswith((b"z1", b"z2")) for line in answers), answers
        assert b"AUTH=PLAIN" in answers[0] and tagged(answers).startswith(b"y OK")  # still not logged in
        assert client.login(BOB, hostile.accounts[BOB]).startswith(b"a OK")  # the client's own login works
    finally:
        client.close()
    time.sleep(1)  # Dovecot logs a login when it happens; give a late line the time to arrive
    logins = dovecot_log.matching(rf"Login: user=<[^>]*>.* rip={re.escape(source)},")
    assert len(logins) == 1 and f"user=<{BOB}>" in logins[0], logins


def test_limits_dovecot_cannot_honour_are_named(hostile: RunningDovecot) -> None:
    cfg = hostile.cfg
    for change, key in (({"max_line_length": 1000}, "mailboxes.limits.max_line_length"),
                        ({"max_connections_per_ip": 0}, "mailboxes.limits"),
                        ({"max_userip_connections": 0}, "mailboxes.limits.max_userip_connections")):
        limits = dataclasses.replace(cfg.mailboxes.limits, **change)
        bad = dataclasses.replace(cfg, mailboxes=dataclasses.replace(cfg.mailboxes, limits=limits))
        with pytest.raises(DovecotConfigError) as info:
            render_config(bad, backend_port=1)
        assert info.value.key == key
