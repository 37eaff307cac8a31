"""Fuzz targets of the SMTP command handling: envelope addresses (gateway.addresses) and whole submission
sessions over a real socket (gateway.submission, aiosmtpd beneath it).

A session sends generated command lines (every verb, in any order, with generated arguments and
parameters, invalid UTF-8, overlong lines, DATA with any body) before or after STARTTLS and AUTH, and reads
each reply. The server must answer every line with a well-formed reply that is not the internal-error reply
(`451 4.3.0`, what an exception in the server becomes) and keep serving: the session ends with a NOOP that
gets `250`, or, when the server closed it (421), a new connection gets its greeting.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import re
import socket
import ssl
import threading
from dataclasses import dataclass

from hypothesis import example, given
from hypothesis import strategies as st

from gateway.accounts import AccountStore
from gateway.addresses import AddressError, parse_mailbox
from gateway.db import create_tables, make_engine
from gateway.spool import GroupCommitter, Spool
from gateway.submission import SubmissionHandler, start_submission
from gateway.tls import server_context
from tests.fuzz.support import fuzz_settings, pki, work_dir
from tests.unit.gateway.smtp_support import DOMAIN, make_config

ALICE = f"alice@{DOMAIN}"
PASSWORD = "alice's long password"

# ---------------------------------------------------------------- addresses

_atext = st.sampled_from(list("abcXYZ019!#$%&'*+/=?^_`{|}~-") + [".", "@", "\"", "\\", " ", "[", "]", ":",
                                                                  ",", "<", ">", "é", "\x00", "\udcff", "\n", "\r"])
_piece = st.one_of(st.text(alphabet=_atext, max_size=12), st.sampled_from([
    "alice", "@a,@b:u", "u%v", "u!v", '"q p"', "[127.0.0.1]", "[IPv6:::1]", "xn--mdecin-bva", "dev.mssante.test",
    "a" * 64, "a" * 65, "b" * 63, "b" * 64, "-x", "x-", "ex.ample", "localhost", "",
]))
addresses = st.lists(_piece, min_size=1, max_size=5).map("".join)


@fuzz_settings()
@given(address=addresses)
@example(address="@relay.example,@other.example:user@dev.mssante.test")
@example(address="user%other.example@dev.mssante.test")
@example(address='"user@other.example"@dev.mssante.test')
@example(address="user@[127.0.0.1]")
@example(address="alice\n@dev.mssante.test")  # `$` matched before a final LF (seen once LF joined the alphabet)
@example(address="alice@dev\n.mssante.test")
def test_envelope_address(address: str) -> None:
    """Only dot-atom@domain gets through (RFC 5321 §4.1.2); every open-relay form is an AddressError."""
    try:
        mailbox = parse_mailbox(address)
    except AddressError:
        return
    text = str(mailbox)
    assert text.count("@") == 1 and len(text) <= 254 and len(mailbox.local) <= 64
    assert not any(c in text for c in '%!"[]:,<>\\ \x00\r\n') and text.isascii() and text.isprintable()
    assert re.fullmatch(r"[A-Za-z0-9#$&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9#$&'*+/=?^_`{|}~-]+)*", mailbox.local)
    labels = mailbox.domain.split(".")
    assert len(labels) >= 2 and all(0 < len(label) <= 63 and not label.startswith("-") and not label.endswith("-")
                                    for label in labels)
    assert mailbox.domain == mailbox.domain.lower()


# ---------------------------------------------------------------- sessions


@dataclass(frozen=True)
class _Server:
    port: int
    ca: str


@functools.cache
def _server() -> _Server:
    """The submission server on a loopback port, in its own event loop thread for the life of the process."""
    work = work_dir("smtp")
    dev = pki()
    cfg = make_config(work, dev, auth_address_failures=10**9, auth_account_failures=10**9)
    engine = make_engine(cfg.database)
    create_tables(engine)
    accounts = AccountStore(engine)
    accounts.add(ALICE, PASSWORD)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="fuzz-smtp", daemon=True).start()

    async def start() -> int:
        handler = SubmissionHandler(cfg, accounts, GroupCommitter(Spool(cfg.spool.dir, engine)), lambda m: None)
        server = await start_submission(cfg, handler, server_context(cfg.tls))
        return int(server.sockets[0].getsockname()[1])

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=60)
    return _Server(port, str(dev.ca_bundle))


class Closed(Exception):
    """The server closed the connection."""


class _Client:
    """A raw SMTP client: bytes out as generated, replies read whole (RFC 5321 §4.2, multiline with `-`)."""

    def __init__(self, srv: _Server) -> None:
        self.srv = srv
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
        self.buf = b""

    def reply(self) -> list[bytes]:
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise Closed
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return lines

    def send(self, data: bytes) -> list[bytes]:
        self.sock.sendall(data)
        return self.reply()

    def starttls(self) -> None:
        ctx = ssl.create_default_context(cafile=self.srv.ca)
        ctx.check_hostname = False
        self.sock = ctx.wrap_socket(self.sock, server_hostname="gw.dev.mssante.test")

    def close(self) -> None:
        self.sock.close()


_REPLY = re.compile(rb"^[2345]\d\d[ -]")


def _check(lines: list[bytes]) -> int:
    for line in lines:
        assert _REPLY.match(line), f"malformed reply line {line!r}"
    text = b"\n".join(lines)
    assert not text.startswith(b"451 4.3.0"), f"internal error reply: {text!r}"
    assert b"Traceback" not in text and b"Error: (" not in text, f"exception leaked: {text!r}"
    return int(lines[-1][:3])


_addr = st.one_of(st.just(ALICE), st.just(f"bob@{DOMAIN}"), addresses)
_params = st.lists(st.one_of(st.sampled_from(["SIZE=1000", "SIZE=99999999999999999999", "SIZE=-1", "SIZE=",
                                               "BODY=8BITMIME", "BODY=BINARYMIME", "BODY=7BIT", "SMTPUTF8",
                                               "RET=HDRS", "ENVID=x", "NOTIFY=NEVER", "ORCPT=rfc822;a@b", "AUTH=<>",
                                               "=", "X", "SIZE=1 SIZE=2"]),
                                 st.text(alphabet="AZ=;-0 é", max_size=8)), max_size=3).map(" ".join)


@st.composite
def command_lines(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["mail", "rcpt", "data", "simple", "auth", "random", "long", "bytes"]))
    if kind == "mail":
        path = draw(st.sampled_from(["<{}>", "{}", "<{}", " <{}>", "<<{}>>", "<>"])).format(draw(_addr))
        line = f"{draw(st.sampled_from(['MAIL FROM:', 'mail from:', 'MAIL FROM: ', 'MAIL FROM']))}{path} {draw(_params)}"
    elif kind == "rcpt":
        path = draw(st.sampled_from(["<{}>", "{}", "<{}", "<@a,@b:{}>"])).format(draw(_addr))
        line = f"{draw(st.sampled_from(['RCPT TO:', 'rcpt to:', 'RCPT TO: ', 'RCPT']))}{path} {draw(_params)}"
    elif kind == "data":
        line = draw(st.sampled_from(["DATA", "data", "DATA x", "BDAT 10", "BDAT 0 LAST", "BDAT x"]))
    elif kind == "simple":
        line = draw(st.sampled_from(["NOOP", "RSET", "HELP", "VRFY alice", f"VRFY {ALICE}", "EXPN list", "HELO x",
                                     "EHLO client.test", "EHLO", "HELO", "NOOP x", "STARTTLS", "STARTTLS x",
                                     "ETRN x", "TURN", "XCLIENT ADDR=1.2.3.4", "QUIT x"]))
    elif kind == "auth":
        blob = base64.b64encode(draw(st.binary(max_size=40))).decode()
        line = draw(st.sampled_from(["AUTH PLAIN {}", "AUTH LOGIN {}", "AUTH CRAM-MD5", "AUTH XOAUTH2 {}", "AUTH",
                                     "AUTH PLAIN {} x", "AUTH PLAIN =", "AUTH LOGIN"])).format(blob)
    elif kind == "random":
        line = draw(st.text(max_size=60))
    elif kind == "long":
        line = draw(st.sampled_from(["NOOP ", "MAIL FROM:<", "RCPT TO:<", "VRFY ", "X"])) + "a" * draw(
            st.sampled_from([500, 1000, 1100, 5000, 70_000]))
    else:
        return draw(st.binary(max_size=60)).replace(b"\r", b"").replace(b"\n", b"")
    return line.encode("utf-8", "surrogateescape").replace(b"\r", b"").replace(b"\n", b"")


@st.composite
def data_bodies(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(st.one_of(st.sampled_from([f"From: {ALICE}", f"From: <{ALICE}>, bob@{DOMAIN}",
                                                     "From: =?utf-8?q?=C3=A9?= <x@y>", "From:", "Subject: é",
                                                     "", "From: \"a@b\" <alice@dev.mssante.test>"]),
                                    st.text(max_size=40)), max_size=6))
    body = "\r\n".join(lines).encode("utf-8", "surrogateescape")
    if draw(st.booleans()):
        body += draw(st.sampled_from([b"\rbare CR", b"\nbare LF", b"\x00", b"\xff\xfe"]))
    kept = [b"." + line if line.startswith(b".") else line for line in body.split(b"\r\n")]
    return b"\r\n".join(kept) + b"\r\n.\r\n"


def _still_serving(srv: _Server) -> None:
    c = _Client(srv)
    try:
        assert _check(c.reply()) == 220
        assert _check(c.send(b"NOOP\r\n")) == 250
    finally:
        c.close()


@fuzz_settings()
@given(tls=st.booleans(), login=st.booleans(),
       lines=st.lists(st.tuples(command_lines(), data_bodies()), min_size=1, max_size=12))
@example(tls=True, login=True, lines=[(b"MAIL FROM:<alice@dev.mssante.test> SIZE=99999999999999999999", b".\r\n")])
@example(tls=True, login=True, lines=[(b"MAIL FROM:<alice@dev.mssante.test>", b".\r\n"),
                                      (b"RCPT TO:<bob@dev.mssante.test>", b".\r\n"),
                                      (b"DATA", b"From: \"a@b\" <alice@dev.mssante.test>\r\n\r\nx\r\n.\r\n")])
def test_submission_session(tls: bool, login: bool, lines: list[tuple[bytes, bytes]]) -> None:
    srv = _server()
    c = _Client(srv)
    try:
        assert _check(c.reply()) == 220
        assert _check(c.send(b"EHLO fuzz.test\r\n")) == 250
        if tls:
            assert _check(c.send(b"STARTTLS\r\n")) == 220
            c.starttls()
            assert _check(c.send(b"EHLO fuzz.test\r\n")) == 250
            if login:
                blob = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode())
                assert _check(c.send(b"AUTH PLAIN " + blob + b"\r\n")) == 235
        for line, body in lines:
            code = _check(c.send(line + b"\r\n"))
            if code == 354:
                code = _check(c.send(body))
            elif code == 334:  # an AUTH exchange: answer it with garbage, once
                code = _check(c.send(b"Kg==\r\n"))
                if code == 334:
                    code = _check(c.send(b"*\r\n"))
            if code == 220 and line.upper().startswith(b"STARTTLS"):
                assert not tls, "a second STARTTLS inside TLS must be refused (RFC 3207 section 4.2)"
                c.starttls()
                tls = True
            if code == 221:
                raise Closed
        assert _check(c.send(b"NOOP\r\n")) == 250
    except (Closed, ConnectionResetError, BrokenPipeError, ssl.SSLEOFError):
        _still_serving(srv)  # closing is allowed (421, 221, a limit); going down is not
    finally:
        c.close()
