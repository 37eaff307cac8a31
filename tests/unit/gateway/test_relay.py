"""The relay client against a real aiosmtpd peer on 127.0.0.1 with STARTTLS and client certificates required."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.devpki import DevPki
from gateway.nexthop import Hop, NextHopResolver
from gateway.relay import OutboundRelay, RelayConfigError, RelayLimiter, client_tls_context, relay
from tests.unit.gateway.relay_support import (
    DnsZone,
    PeerBehaviour,
    closed_port,
    dns_server,
    peer_tls_context,
    smtp_peer,
    tls_server_from,
    untrusted_tls_server,
)

MESSAGE = (b"From: alice@a.mssante.test\r\nTo: bob@b.mssante.test\r\nSubject: relay\r\n\r\n"
           b"first line\r\n.a line starting with a dot\r\n\r\n..two dots\r\nlast line\r\n")
SENDER = "alice@a.mssante.test"
BOB = "bob@b.mssante.test"
CAROL = "carol@b.mssante.test"


@pytest.fixture(scope="module")
def client_ctx(dev_pki: DevPki) -> ssl.SSLContext:
    return client_tls_context(dev_pki.tls_server_chain, dev_pki.tls_server_key, dev_pki.ca_bundle)


@pytest.fixture(scope="module")
def peer_ctx(dev_pki: DevPki) -> ssl.SSLContext:
    return peer_tls_context(dev_pki.tls_server_chain, dev_pki.tls_server_key, dev_pki.ca_bundle)


def named(dev_pki: DevPki, port: int) -> Hop:
    """The peer by the name in its certificate, connected at 127.0.0.1."""
    return Hop(dev_pki.gateway_hostname, port, "127.0.0.1")


async def test_delivers_exact_bytes_over_tls_with_our_client_certificate(
        dev_pki: DevPki, client_ctx: ssl.SSLContext, peer_ctx: ssl.SSLContext) -> None:
    async with smtp_peer(peer_ctx) as peer:
        results = await relay(MESSAGE, SENDER, [BOB, CAROL], [named(dev_pki, peer.port)], tls=client_ctx,
                              helo="gw.a.mssante.test")
    assert results == {BOB: (250, "2.0.0 Ok: queued"), CAROL: (250, "2.0.0 Ok: queued")}
    [got] = peer.handler.received
    assert got.content == MESSAGE
    assert (got.sender, got.recipients) == (SENDER, [BOB, CAROL])
    assert got.tls_version in ("TLSv1.2", "TLSv1.3")
    ours = x509.load_pem_x509_certificate(dev_pki.tls_server_cert.read_bytes())
    assert got.client_cert_der == ours.public_bytes(serialization.Encoding.DER)


async def test_peer_without_starttls_gets_nothing(dev_pki: DevPki, client_ctx: ssl.SSLContext) -> None:
    async with smtp_peer(None) as peer:
        results = await relay(MESSAGE, SENDER, [BOB], [named(dev_pki, peer.port)], tls=client_ctx, helo="gw.a.test")
    code, text = results[BOB]
    assert code // 100 == 4 and text.startswith("4.7.0 TLS required")
    assert peer.handler.mail_commands == 0 and peer.handler.received == []


async def test_peer_certificate_outside_trust_anchors_is_refused(
        dev_pki: DevPki, client_ctx: ssl.SSLContext, tmp_path: Path) -> None:
    chain, key = untrusted_tls_server(tmp_path, dev_pki.gateway_hostname)
    rogue_ctx = peer_tls_context(chain, key, dev_pki.ca_bundle)
    async with smtp_peer(rogue_ctx) as peer:
        by_name = await relay(MESSAGE, SENDER, [BOB], [named(dev_pki, peer.port)], tls=client_ctx, helo="gw.a.test")
        by_address = await relay(MESSAGE, SENDER, [BOB], [Hop("127.0.0.1", peer.port)], tls=client_ctx,
                                 helo="gw.a.test")
    for results in (by_name, by_address):
        code, text = results[BOB]
        assert code // 100 == 4 and text.startswith("4.7.5 "), text
        assert "certificate" in text
    assert peer.handler.mail_commands == 0 and peer.handler.received == []


async def test_peer_certificate_for_another_name_is_refused(
        client_ctx: ssl.SSLContext, peer_ctx: ssl.SSLContext) -> None:
    async with smtp_peer(peer_ctx) as peer:
        results = await relay(MESSAGE, SENDER, [BOB], [Hop("mx.other.test", peer.port, "127.0.0.1")],
                              tls=client_ctx, helo="gw.a.test")
    assert results[BOB][1].startswith("4.7.5 ")
    assert peer.handler.mail_commands == 0


async def test_address_route_checks_the_chain_not_the_name(
        client_ctx: ssl.SSLContext, peer_ctx: ssl.SSLContext) -> None:
    """`[127.0.0.2]` is not in the dev certificate's SANs (only 127.0.0.1 is): the chain alone decides."""
    async with smtp_peer(peer_ctx) as peer:
        results = await relay(MESSAGE, SENDER, [BOB], [Hop("127.0.0.2", peer.port, "127.0.0.1")], tls=client_ctx,
                              helo="gw.a.test")
    assert results[BOB][0] == 250
    assert len(peer.handler.received) == 1


async def test_per_recipient_answers(dev_pki: DevPki, client_ctx: ssl.SSLContext, peer_ctx: ssl.SSLContext) -> None:
    behaviour = PeerBehaviour(rcpt_replies={CAROL: "550 5.1.1 No such user here"})
    async with smtp_peer(peer_ctx, behaviour) as peer:
        results = await relay(MESSAGE, SENDER, [BOB, CAROL], [named(dev_pki, peer.port)], tls=client_ctx,
                              helo="gw.a.test")
    assert results == {BOB: (250, "2.0.0 Ok: queued"), CAROL: (550, "5.1.1 No such user here")}
    assert [r.recipients for r in peer.handler.received] == [[BOB]]


async def test_reply_without_enhanced_code_gets_the_class_one(
        dev_pki: DevPki, client_ctx: ssl.SSLContext, peer_ctx: ssl.SSLContext) -> None:
    behaviour = PeerBehaviour(rcpt_replies={CAROL: "550 nope"}, data_reply="250 fine")
    async with smtp_peer(peer_ctx, behaviour) as peer:
        results = await relay(MESSAGE, SENDER, [BOB, CAROL], [named(dev_pki, peer.port)], tls=client_ctx,
                              helo="gw.a.test")
    assert results == {BOB: (250, "2.0.0 fine"), CAROL: (550, "5.0.0 nope")}


async def test_451_at_data_is_transient_for_every_accepted_recipient(
        dev_pki: DevPki, client_ctx: ssl.SSLContext, peer_ctx: ssl.SSLContext) -> None:
    behaviour = PeerBehaviour(data_reply="451 4.3.0 Try again later")
    async with smtp_peer(peer_ctx, behaviour) as peer:
        other = await closed_port()
        results = await relay(MESSAGE, SENDER, [BOB, CAROL],
                              [named(dev_pki, peer.port), named(dev_pki, other)], tls=client_ctx, helo="gw.a.test")
    assert results == {BOB: (451, "4.3.0 Try again later"), CAROL: (451, "4.3.0 Try again later")}


async def test_connection_lost_in_data_is_never_delivered(
        dev_pki: DevPki, client_ctx: ssl.SSLContext, peer_ctx: ssl.SSLContext) -> None:
    behaviour = PeerBehaviour(rcpt_replies={CAROL: "550 5.1.1 No such user"}, drop_in_data=True)
    async with smtp_peer(peer_ctx, behaviour) as peer:
        results = await relay(MESSAGE, SENDER, [BOB, CAROL], [named(dev_pki, peer.port)], tls=client_ctx,
                              helo="gw.a.test")
    assert peer.handler.dropped == 1
    code, text = results[BOB]
    assert code // 100 == 4 and text.startswith("4.4.2 "), text
    assert results[CAROL] == (550, "5.1.1 No such user")


async def test_connection_lost_at_rcpt_after_an_acceptance_delivers_nothing(
        dev_pki: DevPki, client_ctx: ssl.SSLContext, peer_ctx: ssl.SSLContext) -> None:
    behaviour = PeerBehaviour(drop_at_rcpt={CAROL})
    async with smtp_peer(peer_ctx, behaviour) as peer:
        results = await relay(MESSAGE, SENDER, [BOB, CAROL], [named(dev_pki, peer.port)], tls=client_ctx,
                              helo="gw.a.test")
    assert peer.handler.dropped == 1
    for code, text in results.values():
        assert code // 100 == 4 and text.startswith("4.4.2 "), text


async def test_unreachable_first_hop_then_second(
        dev_pki: DevPki, client_ctx: ssl.SSLContext, peer_ctx: ssl.SSLContext) -> None:
    dead = await closed_port()
    async with smtp_peer(peer_ctx) as peer:
        results = await relay(MESSAGE, SENDER, [BOB], [named(dev_pki, dead), named(dev_pki, peer.port)],
                              tls=client_ctx, helo="gw.a.test")
    assert results[BOB][0] == 250
    assert len(peer.handler.received) == 1


async def test_all_hops_unreachable_is_transient(dev_pki: DevPki, client_ctx: ssl.SSLContext) -> None:
    hops = [named(dev_pki, await closed_port()), named(dev_pki, await closed_port())]
    results = await relay(MESSAGE, SENDER, [BOB, CAROL], hops, tls=client_ctx, helo="gw.a.test")
    for code, text in results.values():
        assert code // 100 == 4 and text.startswith("4.4.1 "), text


async def test_temporary_refusal_of_every_recipient_tries_the_next_hop(
        dev_pki: DevPki, client_ctx: ssl.SSLContext, peer_ctx: ssl.SSLContext) -> None:
    busy = PeerBehaviour(rcpt_replies={BOB: "450 4.2.1 Mailbox busy", CAROL: "550 5.1.1 No such user"})
    async with smtp_peer(peer_ctx, busy) as first, smtp_peer(peer_ctx) as second:
        results = await relay(MESSAGE, SENDER, [BOB, CAROL], [named(dev_pki, first.port), named(dev_pki, second.port)],
                              tls=client_ctx, helo="gw.a.test")
    assert results == {BOB: (250, "2.0.0 Ok: queued"), CAROL: (550, "5.1.1 No such user")}
    assert first.handler.received == []
    assert [r.recipients for r in second.handler.received] == [[BOB]]  # the permanent refusal is not retried


async def test_non_verifying_context_is_refused(dev_pki: DevPki) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with pytest.raises(RelayConfigError):
        await relay(MESSAGE, SENDER, [BOB], [named(dev_pki, 25)], tls=ctx, helo="gw.a.test")


async def test_limiter_caps_concurrent_sessions_at_the_peer(
        dev_pki: DevPki, client_ctx: ssl.SSLContext, peer_ctx: ssl.SSLContext) -> None:
    gate = asyncio.Event()
    limiter = RelayLimiter(per_destination=2)
    other_domain_ran = asyncio.Event()

    async with smtp_peer(peer_ctx, PeerBehaviour(gate=gate)) as peer:
        async def send(i: int) -> dict[str, tuple[int, str]]:
            async with limiter.slot("b.mssante.test"):
                return await relay(MESSAGE + b"%d\r\n" % i, SENDER, [BOB], [named(dev_pki, peer.port)],
                                   tls=client_ctx, helo="gw.a.test")

        async def elsewhere() -> None:
            async with limiter.slot("c.mssante.test"):  # another destination is not held up
                other_domain_ran.set()

        tasks = [asyncio.create_task(send(i)) for i in range(5)]

        async def saturated() -> None:
            while not (peer.handler.in_data == 2 and limiter.waiting("b.mssante.test") == 3):
                await asyncio.sleep(0.01)

        await asyncio.wait_for(saturated(), 30)
        assert limiter.active("b.mssante.test") == 2
        await asyncio.wait_for(elsewhere(), 30)
        assert other_domain_ran.is_set()
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert all(r[BOB][0] == 250 for r in results)
    assert peer.handler.sessions_in_data == 5
    assert peer.handler.max_in_data == 2
    assert sorted(r.content[-3:] for r in peer.handler.received) == [b"%d\r\n" % i for i in range(5)]
    assert limiter.active("b.mssante.test") == 0 and limiter.waiting("b.mssante.test") == 0


def test_limiter_refuses_zero() -> None:
    with pytest.raises(ValueError):
        RelayLimiter(0)


async def test_limiter_cancelled_waiter_leaves_no_trace() -> None:
    limiter = RelayLimiter(per_destination=1)
    holding = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with limiter.slot("b.test"):
            holding.set()
            await release.wait()

    async def wait_for_slot() -> None:
        async with limiter.slot("B.test."):
            raise AssertionError("the slot is held")

    holder = asyncio.create_task(hold())
    await holding.wait()
    waiter = asyncio.create_task(wait_for_slot())
    while limiter.waiting("b.test") != 1:
        await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (limiter.active("b.test"), limiter.waiting("b.test")) == (1, 0)
    release.set()
    await holder
    assert (limiter.active("b.test"), limiter.waiting("b.test")) == (0, 0)
    async with limiter.slot("b.test"):  # the slot was given back
        assert limiter.active("b.test") == 1


async def test_outbound_relay_resolves_each_domain_and_answers_every_recipient(
        dev_pki: DevPki, client_ctx: ssl.SSLContext, peer_ctx: ssl.SSLContext) -> None:
    """Through MX resolution against the test DNS server: the MX host's name is the one verified by TLS."""
    zone = DnsZone(nxdomain={"nowhere.test."})
    zone.add("b.mssante.test", "MX", f"10 {dev_pki.gateway_hostname}.")
    zone.add(dev_pki.gateway_hostname, "A", "127.0.0.1")
    zone.add("nomail.test", "MX", "0 .")
    ghost, no_mail = "ghost@nowhere.test", "x@nomail.test"
    async with dns_server(zone) as ns, smtp_peer(peer_ctx) as peer:
        outbound = OutboundRelay(NextHopResolver({}, [ns], timeout=5, smtp_port=peer.port), RelayLimiter(2),
                                 client_ctx, "gw.a.mssante.test")
        results = await outbound.send(MESSAGE, SENDER, [BOB, ghost, CAROL, no_mail, "no-domain"])
    assert results == {BOB: (250, "2.0.0 Ok: queued"), CAROL: (250, "2.0.0 Ok: queued"),
                       ghost: (550, "5.1.2 Recipient domain does not exist"),
                       no_mail: (556, "5.1.10 Recipient domain does not accept mail (null MX)"),
                       "no-domain": (553, "5.1.3 Recipient address has no domain")}
    assert [r.recipients for r in peer.handler.received] == [[BOB, CAROL]]


async def test_internationalised_address_refused_when_the_peer_lacks_smtputf8(
        dev_pki: DevPki, client_ctx: ssl.SSLContext, peer_ctx: ssl.SSLContext) -> None:
    """aiosmtpd offers SMTPUTF8 only with enable_SMTPUTF8, which the test peer leaves off."""
    accented = "élodie@b.mssante.test"
    async with smtp_peer(peer_ctx) as peer:
        results = await relay(MESSAGE, SENDER, [accented, BOB], [named(dev_pki, peer.port)], tls=client_ctx,
                              helo="gw.a.test")
    assert results[BOB][0] == 250
    assert results[accented][0] == 553 and results[accented][1].startswith("5.6.7 ")
    assert [r.recipients for r in peer.handler.received] == [[BOB]]


async def test_tls12_uses_only_the_mssante_suites(dev_pki: DevPki, client_ctx: ssl.SSLContext) -> None:
    """Référentiel #2 ECO.1.1.3: a TLS 1.2 peer offering CHACHA20 (outside the list) first still gets an
    MSSanté suite, and a peer offering nothing else gets no session."""
    def tls12_peer(ciphers: str) -> ssl.SSLContext:
        ctx = peer_tls_context(dev_pki.tls_server_chain, dev_pki.tls_server_key, dev_pki.ca_bundle)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(ciphers)
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        return ctx

    async with smtp_peer(tls12_peer("ECDHE-RSA-CHACHA20-POLY1305:ECDHE-RSA-AES128-SHA256")) as peer:
        ok = await relay(MESSAGE, SENDER, [BOB], [named(dev_pki, peer.port)], tls=client_ctx, helo="gw.a.test")
    assert ok[BOB][0] == 250
    [got] = peer.handler.received
    assert (got.tls_version, got.cipher) == ("TLSv1.2", "ECDHE-RSA-AES128-SHA256")
    async with smtp_peer(tls12_peer("ECDHE-RSA-CHACHA20-POLY1305")) as peer:
        refused = await relay(MESSAGE, SENDER, [BOB], [named(dev_pki, peer.port)], tls=client_ctx, helo="gw.a.test")
    assert refused[BOB][1].startswith("4.7.5 ")
    assert peer.handler.mail_commands == 0


async def test_peer_refuses_a_client_without_certificate(
        dev_pki: DevPki, peer_ctx: ssl.SSLContext, tmp_path: Path) -> None:
    """The test peer really requires a client certificate (so the other tests' acceptance proves ours is sent)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(dev_pki.ca_bundle))
    async with smtp_peer(peer_ctx) as peer:
        results = await relay(MESSAGE, SENDER, [BOB], [named(dev_pki, peer.port)], tls=ctx, helo="gw.a.test")
    code, text = results[BOB]
    assert code // 100 == 4 and text.startswith("4.7.5 "), text
    assert peer.handler.mail_commands == 0


@pytest.mark.parametrize("variant", ["client-auth-only", "expired"])
async def test_trust_space_certificate_unfit_for_a_server_is_refused(
        dev_pki: DevPki, client_ctx: ssl.SSLContext, tmp_path: Path, variant: str) -> None:
    """Issued by the dev ORGANISATIONS CA (a trust anchor), but without serverAuth, or expired: refused."""
    org_ca = x509.load_pem_x509_certificate(dev_pki.organisations_cert.read_bytes())
    org_key = serialization.load_pem_private_key(dev_pki.organisations_key.read_bytes(), None)
    assert isinstance(org_key, rsa.RSAPrivateKey)
    now = dt.datetime.now(dt.UTC)
    issue: dict[str, Any] = (
        {"extended_key_usage": [ExtendedKeyUsageOID.CLIENT_AUTH]} if variant == "client-auth-only"
        else {"not_before": now - dt.timedelta(days=30), "not_after": now - dt.timedelta(days=1)})
    chain, key = tls_server_from(tmp_path, variant, org_ca, org_key, dev_pki.gateway_hostname, **issue)
    async with smtp_peer(peer_tls_context(chain, key, dev_pki.ca_bundle)) as peer:
        results = await relay(MESSAGE, SENDER, [BOB], [named(dev_pki, peer.port)], tls=client_ctx, helo="gw.a.test")
    code, text = results[BOB]
    assert code // 100 == 4 and text.startswith("4.7.5 ") and "certificate" in text, text
    assert peer.handler.mail_commands == 0
