"""Relay sessions reused between messages (gateway.relay_sessions), against a real aiosmtpd peer over STARTTLS
with client certificates: several messages per authenticated session, the per-destination limit still holding,
a session the peer dropped replaced without loss, a failure in a reused session still answered per recipient."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.devpki import DevPki
from gateway.nexthop import Hop, NextHopResolver
from gateway.relay import OutboundRelay, RelayLimiter, client_tls_context, relay
from gateway.relay_sessions import SessionCache
from tests.unit.gateway.relay_support import DnsZone, PeerBehaviour, PeerHandler, dns_server, peer_tls_context

SENDER = "alice@a.mssante.test"
BOB = "bob@b.mssante.test"
CAROL = "carol@b.mssante.test"


def message(i: int) -> bytes:
    return f"From: {SENDER}\r\nTo: {BOB}\r\nSubject: message {i}\r\n\r\nbody {i}\r\n".encode()


@pytest.fixture(scope="module")
def client_ctx(dev_pki: DevPki) -> ssl.SSLContext:
    return client_tls_context(dev_pki.tls_server_chain, dev_pki.tls_server_key, dev_pki.ca_bundle)


@pytest.fixture(scope="module")
def peer_ctx(dev_pki: DevPki) -> ssl.SSLContext:
    return peer_tls_context(dev_pki.tls_server_chain, dev_pki.tls_server_key, dev_pki.ca_bundle)


class ClosingHandler(PeerHandler):
    """The test peer, which may answer `421` to the MAIL of a session's second transaction (it is closing)."""

    def __init__(self, behaviour: PeerBehaviour) -> None:
        super().__init__(behaviour)
        self.refuse_second_mail = False

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        count = getattr(session, "mails", 0) + 1
        session.mails = count  # type: ignore[attr-defined]
        if self.refuse_second_mail and count > 1:
            return "421 4.4.2 peer.test closing the session"
        return await super().handle_MAIL(server, session, envelope, address, mail_options)


@dataclass
class CountingPeer:
    port: int
    handler: ClosingHandler
    connections: list[SMTP] = field(default_factory=list)

    def drop_all(self) -> None:
        """The peer closes every session it holds (its idle timeout, a restart)."""
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.close()


@contextlib.asynccontextmanager
async def peer(tls: ssl.SSLContext, behaviour: PeerBehaviour | None = None) -> AsyncIterator[CountingPeer]:
    handler = ClosingHandler(behaviour or PeerBehaviour())
    loop = asyncio.get_running_loop()
    counting = CountingPeer(0, handler)

    def factory() -> SMTP:
        conn = SMTP(handler, hostname="peer.test", tls_context=tls, require_starttls=True, decode_data=False)
        counting.connections.append(conn)
        return conn

    server = await loop.create_server(factory, "127.0.0.1", 0)
    counting.port = server.sockets[0].getsockname()[1]
    try:
        yield counting
    finally:
        server.close()
        await server.wait_closed()


def hop(dev_pki: DevPki, port: int) -> Hop:
    return Hop(dev_pki.gateway_hostname, port, "127.0.0.1")


async def test_one_authenticated_session_carries_several_messages(
        dev_pki: DevPki, client_ctx: ssl.SSLContext, peer_ctx: ssl.SSLContext) -> None:
    cache = SessionCache(idle=30)
    async with peer(peer_ctx) as p:
        for i in range(5):
            answers = await relay(message(i), SENDER, [BOB], [hop(dev_pki, p.port)], tls=client_ctx,
                                  helo="gw.a.test", sessions=cache)
            assert answers == {BOB: (250, "2.0.0 Ok: queued")}
        assert len(p.connections) == 1 and cache.reused == 4
        assert [r.content for r in p.handler.received] == [message(i) for i in range(5)]
        assert all(r.client_cert_der for r in p.handler.received)  # every one over the authenticated session
        await cache.aclose()
    assert cache.idle_sessions(hop(dev_pki, p.port)) == 0


async def test_without_a_cache_every_message_has_its_own_session(
        dev_pki: DevPki, client_ctx: ssl.SSLContext, peer_ctx: ssl.SSLContext) -> None:
    cache = SessionCache(idle=0)
    async with peer(peer_ctx) as p:
        for i in range(3):
            await relay(message(i), SENDER, [BOB], [hop(dev_pki, p.port)], tls=client_ctx, helo="gw.a.test",
                        sessions=cache)
        assert len(p.connections) == 3 and cache.reused == 0


async def test_concurrent_messages_share_at_most_the_destination_limit_of_sessions(
        dev_pki: DevPki, client_ctx: ssl.SSLContext, peer_ctx: ssl.SSLContext) -> None:
    gate = asyncio.Event()
    async with peer(peer_ctx, PeerBehaviour(gate=gate)) as p:
        outbound = OutboundRelay(NextHopResolver({"b.mssante.test": f"[127.0.0.1]:{p.port}"}), RelayLimiter(2),
                                 client_ctx, "gw.a.test", sessions=SessionCache(idle=30, per_hop=2))
        tasks = [asyncio.create_task(outbound.send(message(i), SENDER, [BOB])) for i in range(12)]
        while p.handler.in_data < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert p.handler.in_data == 2  # the limit holds with cached sessions too
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        await outbound.close()
    assert all(r == {BOB: (250, "2.0.0 Ok: queued")} for r in results)
    assert p.handler.max_in_data == 2 and len(p.connections) == 2
    assert sorted(r.content for r in p.handler.received) == sorted(message(i) for i in range(12))


async def test_a_session_the_peer_closed_is_replaced_without_loss(
        dev_pki: DevPki, client_ctx: ssl.SSLContext, peer_ctx: ssl.SSLContext) -> None:
    cache = SessionCache(idle=30)
    async with peer(peer_ctx) as p:
        target = [hop(dev_pki, p.port)]
        assert (await relay(message(0), SENDER, [BOB], target, tls=client_ctx, helo="gw.a.test",
                            sessions=cache))[BOB][0] == 250
        p.drop_all()
        await asyncio.sleep(0.2)
        assert (await relay(message(1), SENDER, [BOB], target, tls=client_ctx, helo="gw.a.test",
                            sessions=cache))[BOB][0] == 250
        # A peer that says it is closing (421, RFC 5321 §3.8) at the reused session's MAIL: a new session.
        p.handler.refuse_second_mail = True
        assert (await relay(message(2), SENDER, [BOB], target, tls=client_ctx, helo="gw.a.test",
                            sessions=cache))[BOB][0] == 250
        await cache.aclose()
    assert len(p.connections) == 3
    assert [r.content for r in p.handler.received] == [message(i) for i in range(3)]


async def test_a_failure_in_a_reused_session_is_answered_per_recipient_and_the_session_dropped(
        dev_pki: DevPki, client_ctx: ssl.SSLContext, peer_ctx: ssl.SSLContext) -> None:
    behaviour = PeerBehaviour(rcpt_replies={"nobody@b.mssante.test": "550 5.1.1 no such user"})
    cache = SessionCache(idle=30)
    async with peer(peer_ctx, behaviour) as p:
        target = [hop(dev_pki, p.port)]
        # Every recipient refused: RSET (RFC 5321 §4.1.1.5), and the session carries the next message.
        refused = await relay(message(0), SENDER, ["nobody@b.mssante.test"], target, tls=client_ctx,
                              helo="gw.a.test", sessions=cache)
        assert refused == {"nobody@b.mssante.test": (550, "5.1.1 no such user")}
        assert (await relay(message(1), SENDER, [BOB], target, tls=client_ctx, helo="gw.a.test",
                            sessions=cache))[BOB][0] == 250
        assert len(p.connections) == 1
        behaviour.drop_in_data = True
        lost = await relay(message(2), SENDER, [BOB, CAROL], target, tls=client_ctx, helo="gw.a.test",
                           sessions=cache)
        assert {r: reply[1][:5] for r, reply in lost.items()} == {BOB: "4.4.2", CAROL: "4.4.2"}
        assert all(reply[0] == 451 for reply in lost.values())  # transient: retried later, never lost
        behaviour.drop_in_data = False
        assert (await relay(message(3), SENDER, [BOB], target, tls=client_ctx, helo="gw.a.test",
                            sessions=cache))[BOB][0] == 250
        await cache.aclose()
    assert len(p.connections) == 2  # the broken session was not reused
    assert [r.content for r in p.handler.received] == [message(1), message(3)]


async def test_idle_sessions_end_after_the_idle_time_and_after_max_messages(
        dev_pki: DevPki, client_ctx: ssl.SSLContext, peer_ctx: ssl.SSLContext) -> None:
    cache = SessionCache(idle=0.3, max_messages=2)
    async with peer(peer_ctx) as p:
        target = [hop(dev_pki, p.port)]
        for i in range(3):
            await relay(message(i), SENDER, [BOB], target, tls=client_ctx, helo="gw.a.test", sessions=cache)
        assert len(p.connections) == 2  # two messages on the first session, then a new one
        assert cache.idle_sessions(target[0]) == 1
        await asyncio.sleep(1.0)
        assert cache.idle_sessions(target[0]) == 0
        assert all(conn.transport is None or conn.transport.is_closing() for conn in p.connections)


async def test_a_burst_to_one_domain_asks_dns_once() -> None:
    """The resolver keeps answers for their TTL: no MX and address lookups per message."""
    zone = DnsZone()
    zone.add("b.mssante.test", "MX", "10 mx.b.mssante.test.")
    zone.add("mx.b.mssante.test", "A", "127.0.0.1")
    async with dns_server(zone) as ns:
        resolver = NextHopResolver({}, [ns], timeout=5)
        for _ in range(5):
            assert await resolver.resolve("b.mssante.test") == [Hop("mx.b.mssante.test", 25, "127.0.0.1")]
    assert sorted(zone.queries) == [("b.mssante.test.", "MX"), ("mx.b.mssante.test.", "A"),
                                    ("mx.b.mssante.test.", "AAAA")]
