"""The submission policy, against the real server on a loopback port with smtplib as the client.

Delivery is not started here: what the server accepted is read back from the spool.
"""

from __future__ import annotations

import asyncio
import base64
import smtplib
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.accounts import AccountStore
from gateway.db import create_tables, make_engine
from gateway.devpki import DevPki
from gateway.spool import GroupCommitter, Spool
from gateway.submission import SubmissionHandler, ascii_reply, start_submission
from gateway.tls import server_context
from tests.unit.gateway.smtp_support import DOMAIN, make_config, run

ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
PW = "alice's long password"


@dataclass
class Server:
    port: int
    spool: Spool
    ca: str
    queued: list[str]


async def _start(tmp: Path, pki: DevPki, **limits: float) -> tuple[asyncio.Server, Server]:
    cfg = make_config(tmp, pki, **limits)
    engine = make_engine(cfg.database)
    create_tables(engine)
    accounts = AccountStore(engine)
    accounts.add(ALICE, PW)
    accounts.add(BOB, "bob's long password")
    spool = Spool(cfg.spool.dir, engine)
    queued: list[str] = []
    handler = SubmissionHandler(cfg, accounts, GroupCommitter(spool), lambda m: queued.append(m.id))
    server = await start_submission(cfg, handler, server_context(cfg.tls))
    port = server.sockets[0].getsockname()[1]
    return server, Server(port, spool, str(pki.ca_bundle), queued)


@pytest.fixture
async def srv(tmp_path: Path, dev_pki: DevPki) -> AsyncIterator[Server]:
    server, info = await _start(tmp_path, dev_pki)
    yield info
    server.close()
    await server.wait_closed()


def client(s: Server, *, tls: bool = True, login: bool = True) -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", s.port, timeout=10)
    c.ehlo("client.test")
    if tls:
        ctx = ssl.create_default_context(cafile=s.ca)
        ctx.check_hostname = False
        c.starttls(context=ctx)
        c.ehlo("client.test")
    if login:
        c.login(ALICE, PW)
    return c


async def test_before_starttls_no_auth_and_no_mail(srv: Server) -> None:
    def scenario() -> None:
        c = client(srv, tls=False, login=False)
        assert not c.has_extn("auth")
        assert c.has_extn("starttls")
        assert c.mail(ALICE) == (530, b"5.7.0 Must issue a STARTTLS command first")
        code, _ = c.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0{ALICE}\0{PW}".encode()).decode())
        assert code == 530
        c.close()
    await run(scenario)


async def test_auth_required_and_wrong_password(srv: Server) -> None:
    def scenario() -> None:
        c = client(srv, login=False)
        assert "PLAIN" in c.esmtp_features["auth"] and "LOGIN" in c.esmtp_features["auth"]
        assert c.mail(ALICE)[0] == 530
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            c.login(ALICE, "wrong password!")
        assert info.value.smtp_code == 535 and info.value.smtp_error.startswith(b"5.7.8")
        c.close()
    await run(scenario)


async def test_too_many_auth_failures_disconnect(srv: Server) -> None:
    def scenario() -> None:
        c = client(srv, login=False)
        blob = base64.b64encode(f"\0{ALICE}\0nope".encode()).decode()
        assert c.docmd("AUTH", f"PLAIN {blob}")[0] == 535
        assert c.docmd("AUTH", f"PLAIN {blob}")[0] == 535
        assert c.docmd("AUTH", f"PLAIN {blob}")[0] == 421
        with pytest.raises(smtplib.SMTPServerDisconnected):
            c.noop()
    await run(scenario)


async def test_auth_login_mechanism(srv: Server) -> None:
    def scenario() -> None:
        c = client(srv, login=False)
        c.user, c.password = ALICE, PW
        assert c.auth("LOGIN", c.auth_login)[0] == 235
        c.quit()
    await run(scenario)


async def test_sender_must_be_the_account_and_no_open_relay(srv: Server) -> None:
    def scenario() -> None:
        c = client(srv)
        assert c.mail(BOB) == (553, f"5.7.1 Sender address <{BOB}> does not belong to your account".encode())
        assert c.mail("<>")[0] == 553
        assert c.mail(ALICE)[0] == 250
        assert c.rcpt(f"nobody@{DOMAIN}") == (550, f"5.1.1 <nobody@{DOMAIN}>: no such mailbox here".encode())
        code, text = c.rcpt("victim@elsewhere.test")
        assert (code, text[:5]) == (550, b"5.7.1")
        for trick in (f"@{DOMAIN}:victim@elsewhere.test", f"victim%elsewhere.test@{DOMAIN}",
                      f'"victim@elsewhere.test"@{DOMAIN}', "victim@[127.0.0.1]"):
            assert c.rcpt(trick)[0] in (501, 553), trick
        assert c.rcpt(BOB)[0] == 250
        c.quit()
    await run(scenario)
    assert srv.queued == []


async def test_accepted_message_is_in_the_spool_byte_for_byte(srv: Server) -> None:
    body = (b"From: alice@dev.mssante.test\r\nTo: bob@dev.mssante.test\r\nSubject: t\r\n\r\n"
            b"line one\r\n.leading dot\r\n\xc3\xa9t\xc3\xa9\r\n")

    def scenario() -> bytes:
        c = client(srv)
        c.mail(ALICE)
        c.rcpt(BOB)
        code, text = c.data(body)
        c.quit()
        assert code == 250
        return text
    reply = await run(scenario)
    assert reply.startswith(b"2.0.0 Ok: queued as ")
    qid = reply.split()[-1].decode()
    assert srv.queued == [qid]
    stored = srv.spool.read(qid)
    assert stored.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby gw.dev.mssante.test (mssgw) with ESMTPSA"
                             b" id " + qid.encode() + b";")
    assert stored.endswith(body)


@pytest.mark.parametrize("raw", [b"Subject: x\r\n\r\nbare\nLF\r\n", b"Subject: x\r\n\r\nbare\rCR\r\n"])
async def test_bare_cr_or_lf_is_refused(srv: Server, raw: bytes) -> None:
    def scenario() -> tuple[int, bytes]:
        c = client(srv)
        c.mail(ALICE)
        c.rcpt(BOB)
        assert c.docmd("DATA")[0] == 354
        c.send(raw + b".\r\n")
        reply = c.getreply()
        c.close()
        return reply
    code, text = await run(scenario)
    assert code == 550 and b"bare CR or LF" in text
    assert srv.queued == []


async def test_size_limit(tmp_path: Path, dev_pki: DevPki) -> None:
    server, s = await _start(tmp_path, dev_pki, max_message_size=4096)

    def scenario() -> None:
        c = client(s)
        c.mail(ALICE)
        c.rcpt(BOB)
        code, text = c.data(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 0 + (b"y" * 70 + b"\r\n") * 100)
        assert (code, text) == (552, b"5.3.4 Message too big: the limit is 4096 bytes")
        assert c.mail(ALICE, ["SIZE=999999"])[0] == 552
        c.quit()
    try:
        await run(scenario)
    finally:
        server.close()
        await server.wait_closed()
    assert s.queued == []


async def test_connection_cap(tmp_path: Path, dev_pki: DevPki) -> None:
    server, s = await _start(tmp_path, dev_pki, max_connections=2)

    def scenario() -> None:
        first, second = client(s, login=False), client(s, tls=False, login=False)
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as third:
            assert third.recv(100).startswith(b"421 4.7.0 Too many connections")
        first.quit()
        second.quit()
    try:
        await run(scenario)
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_tls_below_1_2_is_refused(srv: Server) -> None:
    def scenario() -> None:
        c = smtplib.SMTP("127.0.0.1", srv.port, timeout=10)
        c.ehlo("old.client")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        try:
            ctx.set_ciphers("ALL:@SECLEVEL=0")
        except ssl.SSLError:
            pass
        with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
            c.starttls(context=ctx)
    await run(scenario)


async def test_idle_client_is_disconnected(tmp_path: Path, dev_pki: DevPki) -> None:
    server, s = await _start(tmp_path, dev_pki, idle_timeout=0.5)

    def scenario() -> bytes:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as raw:
            greeting = raw.recv(200)
            assert greeting.startswith(b"220 ")
            last = raw.recv(200)  # nothing sent: the server says why and closes after the idle timeout
            return last + raw.recv(200)
    try:
        assert await run(scenario) == b"421 4.4.2 Timeout waiting for the client, closing the connection\r\n"
    finally:
        server.close()
        await server.wait_closed()


def test_reply_text_is_folded_to_ascii() -> None:
    assert ascii_reply("550 5.7.1 x.test is not in the MSSanté trust space") == (
        "550 5.7.1 x.test is not in the MSSante trust space")
    assert ascii_reply("550 5.1.1 <例@x.test>: no such mailbox") == "550 5.1.1 <?@x.test>: no such mailbox"
    assert ascii_reply("250 2.0.0 OK") == "250 2.0.0 OK"


@pytest.mark.parametrize("header, expected", [
    (b"From: Bob <bob@dev.mssante.test>\r\n", b"553 5.7.1"),
    (b"From: alice@dev.mssante.test, bob@dev.mssante.test\r\n", b"553 5.7.1"),
    (b"From: alice@dev.mssante.test\r\nFrom: bob@dev.mssante.test\r\n", b"553 5.7.1"),
    (b"", b"550 5.6.0"),
    (b"From: =?utf-8?q?Alice_=C3=89?= <alice@DEV.mssante.test>\r\n", b"250 2.0.0"),
])
async def test_the_from_header_must_be_the_account(srv: Server, header: bytes, expected: bytes) -> None:
    def scenario() -> tuple[int, bytes]:
        c = client(srv)
        c.mail(ALICE)
        c.rcpt(BOB)
        reply = c.data(header + b"Subject: x\r\n\r\nbody\r\n")
        c.quit()
        return reply
    code, text = await run(scenario)
    assert f"{code} ".encode() + text[:5] == expected
