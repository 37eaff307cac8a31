"""The port-25 policy for peer gateways, against the real server on a loopback port with smtplib as the peer.

The peer presents the development gateway certificate (serverAuth + clientAuth) as its client certificate;
an untrusted peer presents one from a CA outside the trust anchors. What the server accepted is read back
from the spool; nothing is delivered here.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from config.schema import GatewayConfig, Listener
from gateway.accounts import AccountStore
from gateway.db import create_tables, make_engine
from gateway.devpki import DevPki, issue_certificate, new_rsa_key
from gateway.inbound import InboundHandler, peer_tls_context, start_inbound
from gateway.spool import GroupCommitter, QueuedMessage, Spool, queue
from gateway.tls import TLSSetupError
from tests.unit.gateway.relay_support import untrusted_tls_server
from tests.unit.gateway.smtp_support import DOMAIN, make_config, run

PEER_DOMAIN = "peer.mssante.test"
TRUST_SPACE = {DOMAIN, PEER_DOMAIN}
UNREADABLE = "unreadable.test"  # the trust-space check fails for this one, as when its database is down
SENDER = f"alice@{PEER_DOMAIN}"
BOB, CAROL = f"bob@{DOMAIN}", f"carol@{DOMAIN}"
BODY = b"From: alice@peer.mssante.test\r\nTo: bob@dev.mssante.test\r\nSubject: t\r\n\r\nenveloped, in fact\r\n"


@dataclass
class Inbound:
    port: int
    spool: Spool
    cfg: GatewayConfig
    pki: DevPki
    queued: list[QueuedMessage] = field(default_factory=list)


async def _start(tmp: Path, pki: DevPki, **limits: float) -> tuple[asyncio.Server, Inbound]:
    cfg = make_config(tmp, pki, **limits)
    engine = make_engine(cfg.database)
    create_tables(engine)
    accounts = AccountStore(engine)
    accounts.add(BOB, "bob's long password")
    accounts.add(CAROL, "carol's long password")
    accounts.set_active(CAROL, False)
    spool = Spool(cfg.spool.dir, engine)
    info = Inbound(0, spool, cfg, pki)

    async def in_trust_space(domain: str) -> bool:
        if domain == UNREADABLE:
            raise OSError("database unavailable")
        return domain in TRUST_SPACE

    handler = InboundHandler(cfg, accounts, GroupCommitter(spool), info.queued.append, in_trust_space)
    server = await start_inbound(cfg, Listener("127.0.0.1", 0), handler, peer_tls_context(cfg.tls))
    info.port = server.sockets[0].getsockname()[1]
    return server, info


@pytest.fixture
async def srv(tmp_path: Path, dev_pki: DevPki) -> AsyncIterator[Inbound]:
    server, info = await _start(tmp_path, dev_pki)
    yield info
    server.close()
    await server.wait_closed()


def peer_context(pki: DevPki, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    """A peer gateway's client context: verifies our certificate, presents `cert` (chain, key) if given."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_bundle))
    ctx.check_hostname = False
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


def trusted(s: Inbound) -> ssl.SSLContext:
    return peer_context(s.pki, (s.pki.tls_server_chain, s.pki.tls_server_key))


def peer(s: Inbound, ctx: ssl.SSLContext | None) -> smtplib.SMTP:
    """Connected, EHLO'd, and when `ctx` is given, STARTTLS'd and EHLO'd again."""
    c = smtplib.SMTP("127.0.0.1", s.port, timeout=10)
    c.ehlo("mx.peer.mssante.test")
    if ctx is not None:
        c.starttls(context=ctx)
        c.ehlo("mx.peer.mssante.test")
    return c


async def test_trusted_peer_delivers_to_a_local_mailbox(srv: Inbound) -> None:
    def scenario() -> tuple[int, bytes]:
        c = peer(srv, None)
        assert c.has_extn("starttls") and not c.has_extn("auth")
        assert c.mail(SENDER) == (530, b"5.7.0 Must issue a STARTTLS command first")
        c.starttls(context=trusted(srv))
        c.ehlo("mx.peer.mssante.test")
        assert not c.has_extn("auth") and not c.has_extn("starttls")
        assert c.docmd("AUTH", "PLAIN AGFsaWNlAHB3")[0] == 502
        assert c.mail(SENDER) == (250, b"2.1.0 Sender OK")
        assert c.rcpt(BOB) == (250, b"2.1.5 Recipient OK")
        reply = c.data(BODY)
        c.quit()
        return reply
    code, text = await run(scenario)
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as ")
    [msg] = srv.queued
    assert text.split()[-1].decode() == msg.id
    assert (msg.direction, msg.account, msg.sender, msg.pending) == ("inbound", None, SENDER, (BOB,))
    with srv.spool._engine.connect() as conn:  # the durable row, not only what the callback was given
        row = conn.execute(select(queue.c.direction, queue.c.account).where(queue.c.id == msg.id)).one()
    assert tuple(row) == ("inbound", None)
    stored = srv.spool.read(msg.id)
    assert stored.endswith(BODY)
    trace = stored[: -len(BODY)].decode("ascii")
    assert trace.startswith("Received: from mx.peer.mssante.test ([127.0.0.1])\r\n\t(using TLSv1.")
    assert f"client certificate for {srv.pki.gateway_hostname})" in trace
    assert f"by gw.dev.mssante.test (mssgw) with ESMTPS id {msg.id};" in trace


async def test_no_client_certificate_gets_530(srv: Inbound) -> None:
    def scenario() -> tuple[int, bytes]:
        c = peer(srv, peer_context(srv.pki, None))
        reply = c.mail(SENDER)
        c.quit()
        return reply
    assert await run(scenario) == (530, b"5.7.0 A client certificate from the MSSante trust space is required")
    assert srv.queued == []


async def test_untrusted_client_certificate_is_refused(srv: Inbound, tmp_path: Path) -> None:
    rogue = untrusted_tls_server(tmp_path / "rogue", "mx.rogue.test")

    def scenario() -> int | None:
        try:
            c = peer(srv, peer_context(srv.pki, rogue))
            code = c.mail(SENDER)[0]
            if code == 250:
                code = c.rcpt(BOB)[0]
            c.close()
            return code
        except (ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError):
            return None  # the handshake failed: what OpenSSL does with a certificate that does not verify
    assert await run(scenario) in (None, 530)
    assert srv.queued == []


async def test_sender_domain_outside_the_trust_space(srv: Inbound) -> None:
    def scenario() -> None:
        c = peer(srv, trusted(srv))
        assert c.mail("mallory@elsewhere.test") == (550, b"5.7.1 elsewhere.test is not in the MSSante trust space")
        assert c.mail("not an address")[0] in (501, 553)
        assert c.mail(f"a@{UNREADABLE}") == (
            451, b"4.4.3 The MSSante trust-space list cannot be read right now, please try again later")
        assert c.mail(SENDER)[0] == 250
        c.quit()
    await run(scenario)


async def test_recipients_are_active_local_mailboxes_only(srv: Inbound) -> None:
    def scenario() -> None:
        c = peer(srv, trusted(srv))
        assert c.mail(SENDER)[0] == 250
        assert c.rcpt(f"nobody@{DOMAIN}") == (550, f"5.1.1 <nobody@{DOMAIN}>: no such mailbox here".encode())
        assert c.rcpt(CAROL)[:1] == (550,)  # disabled account
        assert c.rcpt(CAROL)[1].startswith(b"5.1.1")
        assert c.rcpt(f"someone@{PEER_DOMAIN}") == (
            550, f"5.7.1 Relaying denied: {PEER_DOMAIN} is not a domain of this gateway".encode())
        for trick in (f"@{DOMAIN}:victim@elsewhere.test", f"victim%elsewhere.test@{DOMAIN}", "victim@[127.0.0.1]"):
            assert c.rcpt(trick)[0] in (501, 553), trick
        assert c.rcpt(BOB)[0] == 250
        c.quit()
    await run(scenario)
    assert srv.queued == []


@pytest.mark.parametrize("raw", [b"Subject: x\r\n\r\nbare\nLF\r\n", b"Subject: x\r\n\r\nbare\rCR\r\n"])
async def test_bare_cr_or_lf_is_refused(srv: Inbound, raw: bytes) -> None:
    def scenario() -> tuple[int, bytes]:
        c = peer(srv, trusted(srv))
        c.mail(SENDER)
        c.rcpt(BOB)
        assert c.docmd("DATA")[0] == 354
        c.send(raw + b".\r\n")
        reply = c.getreply()
        c.close()
        return reply
    code, text = await run(scenario)
    assert code == 550 and text.startswith(b"5.5.2") and b"bare CR or LF" in text
    assert srv.queued == []


async def test_null_sender_has_one_recipient(srv: Inbound, dev_pki: DevPki) -> None:
    def scenario() -> tuple[int, bytes]:
        c = peer(srv, trusted(srv))
        assert c.mail("<>")[0] == 250
        assert c.rcpt(BOB)[0] == 250
        code, text = c.rcpt(f"postmaster@{DOMAIN}")
        assert code == 452 and text.startswith(b"4.5.3 A message with the null sender")
        reply = c.data(b"Subject: Delivery Status Notification\r\n\r\nreport\r\n")
        c.quit()
        return reply
    code, _ = await run(scenario)
    assert code == 250
    [msg] = srv.queued
    assert (msg.sender, msg.pending, msg.direction) == ("", (BOB,), "inbound")  # the null reverse-path


async def test_size_limit(tmp_path: Path, dev_pki: DevPki) -> None:
    server, s = await _start(tmp_path, dev_pki, max_message_size=2048)

    def scenario() -> tuple[int, bytes]:
        c = peer(s, trusted(s))
        c.mail(SENDER)
        c.rcpt(BOB)
        reply = c.data(b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 60)
        c.quit()
        return reply
    try:
        assert await run(scenario) == (552, b"5.3.4 Message too big: the limit is 2048 bytes")
    finally:
        server.close()
        await server.wait_closed()
    assert s.queued == []


def test_peer_context_needs_trust_anchors(tmp_path: Path, dev_pki: DevPki) -> None:
    cfg = make_config(tmp_path, dev_pki)
    with pytest.raises(TLSSetupError, match="tls.ca"):
        peer_tls_context(replace(cfg.tls, ca=None))
    ctx = peer_tls_context(cfg.tls)
    assert ctx.verify_mode == ssl.CERT_OPTIONAL and ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def _hostless_client_cert(pki: DevPki, directory: Path) -> tuple[Path, Path]:
    """A client certificate from the trust anchors' organisations CA that names no host: no SAN, no CN."""
    ca = x509.load_pem_x509_certificate(pki.organisations_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.organisations_key.read_bytes(), None)
    assert isinstance(ca_key, rsa.RSAPrivateKey)
    key = new_rsa_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "NO HOST TEST")])
    cert = issue_certificate(ca, ca_key, subject, key.public_key(), profile="tls-client")
    directory.mkdir(parents=True, exist_ok=True)
    chain, key_path = directory / "hostless-chain.pem", directory / "hostless.key"
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return chain, key_path


@pytest.mark.parametrize("which", ["no SAN nor CN", "a CPS card's certificate (CN = 8 + RPPS)"])
async def test_a_certificate_that_names_no_host_gets_530(srv: Inbound, tmp_path: Path, which: str) -> None:
    practitioner = srv.pki.practitioners[0]
    cert = (_hostless_client_cert(srv.pki, tmp_path / "hostless") if which.startswith("no SAN")
            else (practitioner.auth_cert, practitioner.auth_key))
    ctx = peer_context(srv.pki, cert)

    def scenario() -> tuple[int, bytes]:
        c = peer(srv, ctx)
        reply = c.mail(SENDER)
        c.quit()
        return reply
    code, text = await run(scenario)
    assert (code, text[:5]) == (530, b"5.7.0") and b"names no host" in text


async def test_connection_cap(tmp_path: Path, dev_pki: DevPki) -> None:
    server, s = await _start(tmp_path, dev_pki, max_connections=1)

    def scenario() -> bytes:
        first = peer(s, trusted(s))
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as second:
            greeting = second.recv(100)
        first.quit()
        return greeting
    try:
        assert (await run(scenario)).startswith(b"421 4.7.0 Too many connections")
    finally:
        server.close()
        await server.wait_closed()
