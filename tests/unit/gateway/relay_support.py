"""Real servers for the relay tests: a tiny authoritative DNS server on UDP and an aiosmtpd peer with STARTTLS.

Both listen on 127.0.0.1, ephemeral ports, in the test's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.devpki import ca_name, issue_certificate, new_rsa_key, structure_name

# --- DNS -------------------------------------------------------------------------------------------------------------

@dataclass
class DnsZone:
    """What the server answers. Names are absolute or relative to the root; records as zone-file rdata text.

    `records[(name, "MX")] = ["10 mx1.b.test."]`; a name in `nxdomain` answers NXDOMAIN, in `servfail` SERVFAIL,
    in `silent` nothing at all (the client times out). Any other name with no record of the type is NODATA.
    """

    records: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    nxdomain: set[str] = field(default_factory=set)
    servfail: set[str] = field(default_factory=set)
    silent: set[str] = field(default_factory=set)
    queries: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, rdtype: str, *rdata: str) -> None:
        self.records.setdefault((_norm(name), rdtype.upper()), []).extend(rdata)


def _norm(name: str) -> str:
    return name.lower().rstrip(".") + "."


class _DnsProtocol(asyncio.DatagramProtocol):
    def __init__(self, zone: DnsZone) -> None:
        self.zone = zone
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:  # a real server ignores garbage
            return
        if not query.question:
            return
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.zone.queries.append((name, rdtype))
        if name in self.zone.silent:
            return
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if name in self.zone.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif name in self.zone.nxdomain:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            rdata = self.zone.records.get((name, rdtype))
            if rdata:
                response.answer.append(dns.rrset.from_text_list(question.name, 300, dns.rdataclass.IN,
                                                                question.rdtype, rdata))
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


@contextlib.asynccontextmanager
async def dns_server(zone: DnsZone) -> AsyncIterator[tuple[str, int]]:
    """Serve `zone` on 127.0.0.1 UDP; yields the (address, port) to give the resolver."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: _DnsProtocol(zone), local_addr=("127.0.0.1", 0))
    try:
        yield transport.get_extra_info("sockname")[:2]
    finally:
        transport.close()


# --- the SMTP peer ---------------------------------------------------------------------------------------------------

@dataclass
class Received:
    sender: str
    recipients: list[str]
    content: bytes
    client_cert_der: bytes | None
    tls_version: str | None
    cipher: str | None


@dataclass
class PeerBehaviour:
    """How the peer answers: per-recipient RCPT replies (default 250), the reply to the final dot, whether to
    drop the connection after reading the data (or at the RCPT of some addresses), and an optional gate that holds every DATA until it is set."""

    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str = "250 2.0.0 Ok: queued"
    drop_in_data: bool = False
    drop_at_rcpt: set[str] = field(default_factory=set)
    gate: asyncio.Event | None = None


class PeerHandler:
    def __init__(self, behaviour: PeerBehaviour) -> None:
        self.behaviour = behaviour
        self.received: list[Received] = []
        self.in_data = 0
        self.max_in_data = 0
        self.sessions_in_data = 0
        self.data_seen = asyncio.Event()
        self.dropped = 0
        self.mail_commands = 0

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        self.mail_commands += 1
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address in self.behaviour.drop_at_rcpt:
            self.dropped += 1
            cast(asyncio.Transport, server.transport).abort()
            await asyncio.Event().wait()
        reply = self.behaviour.rcpt_replies.get(address, "250 2.1.5 Ok")
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.in_data += 1
        self.sessions_in_data += 1
        self.max_in_data = max(self.max_in_data, self.in_data)
        self.data_seen.set()
        try:
            if self.behaviour.gate is not None:
                await self.behaviour.gate.wait()
            if self.behaviour.drop_in_data:
                self.dropped += 1
                cast(asyncio.Transport, server.transport).abort()
                await asyncio.Event().wait()  # aiosmtpd cancels us on connection_lost
            ssl_object = server.transport.get_extra_info("ssl_object") if server.transport else None
            assert envelope.original_content is not None and envelope.mail_from is not None
            self.received.append(Received(
                sender=envelope.mail_from, recipients=list(envelope.rcpt_tos), content=envelope.original_content,
                client_cert_der=ssl_object.getpeercert(binary_form=True) if ssl_object else None,
                tls_version=ssl_object.version() if ssl_object else None,
                cipher=ssl_object.cipher()[0] if ssl_object and ssl_object.cipher() else None))
            return self.behaviour.data_reply
        finally:
            self.in_data -= 1


def peer_tls_context(chain: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """The peer's server context: its certificate, and a client certificate from `client_ca` required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(chain, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(client_ca))
    return ctx


@dataclass
class Peer:
    port: int
    handler: PeerHandler


@contextlib.asynccontextmanager
async def smtp_peer(tls_context: ssl.SSLContext | None, behaviour: PeerBehaviour | None = None,
                    ) -> AsyncIterator[Peer]:
    """An aiosmtpd server on 127.0.0.1; with `tls_context` None it does not offer STARTTLS at all."""
    handler = PeerHandler(behaviour or PeerBehaviour())
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return SMTP(handler, hostname="peer.test", tls_context=tls_context, require_starttls=tls_context is not None,
                    decode_data=False)

    server = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        yield Peer(server.sockets[0].getsockname()[1], handler)
    finally:
        server.close()
        await server.wait_closed()


async def closed_port() -> int:
    """A loopback port with nothing listening (bound then released)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return port


def untrusted_tls_server(directory: Path, hostname: str) -> tuple[Path, Path]:
    """A server certificate for `hostname`/127.0.0.1 from a CA outside the trust anchors: (chain, key)."""
    root_key = new_rsa_key()
    root = issue_certificate(None, root_key, ca_name("ROGUE ROOT CA"), root_key.public_key(), profile="root")
    return tls_server_from(directory, "rogue", root, root_key, hostname)


def tls_server_from(directory: Path, label: str, ca: x509.Certificate, ca_key: rsa.RSAPrivateKey, hostname: str,
                    **issue: Any) -> tuple[Path, Path]:
    """A server certificate for `hostname`/127.0.0.1 issued by `ca` (extra `issue_certificate` arguments for the
    variants: EKU, validity...), written as (chain, key) under `directory`."""
    key = new_rsa_key()
    sans: list[x509.GeneralName] = [x509.DNSName(hostname), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
    leaf = issue_certificate(ca, ca_key, structure_name(hostname, "00000000000000", label.upper()), key.public_key(),
                             profile="tls-server", sans=sans, **issue)
    directory.mkdir(parents=True, exist_ok=True)
    chain = directory / f"{label}-chain.pem"
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM))
    key_path = directory / f"{label}.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return chain, key_path
