"""Next-hop resolution for outbound relay: a static route, else MX records, else the implicit MX (RFC 5321 §5.1).

A static route (the transport table of the configuration) names `host`, `host:port`, `[address]` or
`[address]:port`; a route to a host name looks up its addresses but never its MX (Postfix's meaning of a
transport entry). Without a route, the MX records of the domain are used in order of preference, equal
preferences shuffled (§5.1 "SHOULD ... randomize"), each MX host expanded into its addresses (A then AAAA).
A domain without MX records is its own implicit MX (§5.1, preference 0). A null MX (RFC 7505 §3, the single
record `0 .`) and a domain that does not exist are permanent failures; a DNS server that fails or does not
answer is a transient one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from gateway.errors import SmtpReplyError

log = logging.getLogger(__name__)

SMTP_PORT = 25


@dataclass(frozen=True, slots=True)
class Hop:
    """One place to try: `host` is the name the peer's certificate must carry (or an address literal);
    `address`, when known, is where to connect (so a host name resolved through the configured
    nameservers is not resolved again by the system resolver)."""

    host: str
    port: int = SMTP_PORT
    address: str | None = None

    @property
    def is_address_literal(self) -> bool:
        """A route written as an IP address: there is no name to verify in the peer's certificate."""
        return _is_ip(self.host)

    @property
    def connect_to(self) -> str:
        return self.address or self.host

    def __str__(self) -> str:
        where = self.host if self.address in (None, self.host) else f"{self.host}({self.address})"
        return f"{where}:{self.port}"


class NextHopError(SmtpReplyError):
    """Resolution failed; `code`/`enhanced` say whether to retry (4xx) or bounce (5xx), RFC 3463."""

    def __init__(self, domain: str, text: str | None = None, *, cause: str | None = None) -> None:
        self.domain = domain
        super().__init__(text, cause=cause)


class NoSuchDomain(NextHopError):
    """NXDOMAIN for the recipient's domain (RFC 3463 X.1.2: bad destination system address)."""

    code = 550
    enhanced = "5.1.2"
    text = "Recipient domain does not exist"


class NullMx(NextHopError):
    """The domain publishes a null MX: it accepts no mail (RFC 7505 §3; reply code and X.1.10 from §4.2)."""

    code = 556
    enhanced = "5.1.10"
    text = "Recipient domain does not accept mail (null MX)"


class NoRoute(NextHopError):
    """The domain exists but neither its MX hosts nor the domain itself have an address (RFC 3463 X.4.4)."""

    code = 550
    enhanced = "5.4.4"
    text = "No address found for the recipient domain's mail servers"


class DnsUnavailable(NextHopError):
    """SERVFAIL, refusal or no answer in time: try again later (RFC 3463 X.4.3: directory server failure)."""

    code = 451
    enhanced = "4.4.3"
    text = "DNS lookup of the recipient domain failed temporarily"


class BadRoute(NextHopError):
    """A static route that cannot be parsed: a configuration problem, retried once an operator fixes it."""

    code = 451
    enhanced = "4.3.5"
    text = "Relay route misconfigured"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_route(domain: str, route: str) -> tuple[str, int, bool]:
    """`host`, `host:port`, `[address]`, `[address]:port`, `[v6]:port` → (host, port, bracketed)."""
    text = route.strip()
    bracketed = text.startswith("[")
    port = SMTP_PORT
    if bracketed:
        end = text.find("]")
        if end < 0:
            raise BadRoute(domain, cause=f"route {route!r} for {domain}: missing ']'")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise BadRoute(domain, cause=f"route {route!r} for {domain}: junk after ']'")
            port_text = rest[1:]
        else:
            port_text = ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise BadRoute(domain, cause=f"route {route!r} for {domain}: bad port")
        port = int(port_text)
    if not host:
        raise BadRoute(domain, cause=f"route {route!r} for {domain}: no host")
    return host, port, bracketed


class NextHopResolver:
    """Turns a recipient domain into the ordered list of hops to try (RFC 5321 §5.1)."""

    def __init__(self, routes: Mapping[str, str], nameservers: Sequence[tuple[str, int]] = (),
                 timeout: float = 10, *, smtp_port: int = SMTP_PORT) -> None:
        self._routes = {d.lower().rstrip("."): r for d, r in routes.items()}
        for domain, route in self._routes.items():
            parse_route(domain, route)  # fail at start-up, not at the first message
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(a, p) for a, p in nameservers]
        else:
            resolver = dns.asyncresolver.Resolver()
        resolver.lifetime = timeout
        resolver.timeout = min(resolver.timeout, timeout)
        # Answers kept for their TTL (RFC 1035 §3.2.1): a burst of mail to one domain asks DNS once, not per message.
        resolver.cache = dns.resolver.Cache()
        self._resolver = resolver
        self._smtp_port = smtp_port

    async def resolve(self, domain: str) -> list[Hop]:
        """The hops for `domain`, best first; raises a `NextHopError` (transient or permanent)."""
        domain = domain.lower().rstrip(".")
        route = self._routes.get(domain)
        if route is not None:
            host, port, _ = parse_route(domain, route)
            if _is_ip(host):
                return [Hop(host, port, host)]
            return [Hop(host, port, a) for a in await self._addresses(domain, host, implicit=False)]
        if domain.startswith("[") and domain.endswith("]") and _is_ip(domain[1:-1]):
            # An address literal as the domain (RFC 5321 §4.1.3): connect there, no lookup.
            return [Hop(domain[1:-1], self._smtp_port, domain[1:-1])]
        mx = await self._mx(domain)
        if mx is None:
            log.debug("no MX for %s, using the implicit MX", domain)
            return [Hop(domain, self._smtp_port, a) for a in await self._addresses(domain, domain, implicit=True)]
        hops: list[Hop] = []
        transient: DnsUnavailable | None = None
        for name in mx:
            try:
                addresses = await self._addresses(domain, name, implicit=False)
            except DnsUnavailable as exc:
                transient = exc
                continue
            except NextHopError:
                continue
            hops.extend(Hop(name, self._smtp_port, a) for a in addresses)
        if not hops:
            if transient is not None:
                raise transient
            raise NoRoute(domain, cause=f"no MX host of {domain} has an address: {', '.join(mx)}")
        return hops

    async def _mx(self, domain: str) -> list[str] | None:
        """MX host names by preference, or None when the domain has no MX (implicit MX applies)."""
        try:
            answer = await self._resolver.resolve(domain, dns.rdatatype.MX, search=False)
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.NXDOMAIN as exc:
            raise NoSuchDomain(domain, cause=f"NXDOMAIN for {domain}") from exc
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            raise DnsUnavailable(domain, cause=f"MX lookup for {domain}: {exc}") from exc
        except dns.exception.DNSException as exc:
            raise DnsUnavailable(domain, cause=f"MX lookup for {domain}: {exc!r}") from exc
        records = [(int(r.preference), r.exchange) for r in answer]
        if any(exchange == dns.name.root for _, exchange in records):
            if len(records) == 1:
                raise NullMx(domain, cause=f"{domain} publishes a null MX")
            log.warning("%s publishes a null MX beside other MX records (RFC 7505 §3); ignoring the null one",
                        domain)
            records = [r for r in records if r[1] != dns.name.root]
        random.shuffle(records)  # equal preferences in random order; the sort below is stable
        records.sort(key=lambda r: r[0])
        names: list[str] = []
        for _, exchange in records:
            name = exchange.to_text(omit_final_dot=True).lower()
            if name not in names:
                names.append(name)
        return names

    async def _addresses(self, domain: str, host: str, *, implicit: bool) -> list[str]:
        """A then AAAA of `host`. NXDOMAIN of the recipient domain itself (implicit MX) is permanent."""
        results = await asyncio.gather(self._lookup(host, dns.rdatatype.A), self._lookup(host, dns.rdatatype.AAAA),
                                       return_exceptions=True)
        addresses: list[str] = []
        errors: list[BaseException] = []
        for result in results:
            if isinstance(result, BaseException):
                errors.append(result)
            else:
                addresses.extend(result)
        if addresses:
            return addresses
        if any(isinstance(e, dns.resolver.NXDOMAIN) for e in errors):
            if implicit:
                raise NoSuchDomain(domain, cause=f"NXDOMAIN for {host}")
            raise NoRoute(domain, cause=f"NXDOMAIN for {host}")
        unexpected = [e for e in errors if not isinstance(e, dns.exception.DNSException)]
        if unexpected:
            raise unexpected[0]
        if errors:
            raise DnsUnavailable(domain, cause=f"address lookup for {host}: {errors[0]!r}")
        raise NoRoute(domain, cause=f"{host} has no A or AAAA record")

    async def _lookup(self, host: str, rdtype: dns.rdatatype.RdataType) -> list[str]:
        try:
            answer = await self._resolver.resolve(host, rdtype, search=False)
        except dns.resolver.NoAnswer:
            return []
        return [r.to_text() for r in answer]
