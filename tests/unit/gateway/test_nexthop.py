"""Next-hop resolution against a real DNS server on 127.0.0.1 (RFC 5321 §5.1, RFC 7505)."""

from __future__ import annotations

import pytest

from gateway.nexthop import (
    BadRoute,
    DnsUnavailable,
    Hop,
    NextHopResolver,
    NoRoute,
    NoSuchDomain,
    NullMx,
    parse_route,
)
from tests.unit.gateway.relay_support import DnsZone, dns_server


async def test_mx_sorted_by_preference_and_expanded_to_addresses() -> None:
    zone = DnsZone()
    zone.add("b.test", "MX", "20 mx2.b.test.", "10 mx1.b.test.")
    zone.add("mx1.b.test", "A", "127.0.0.11")
    zone.add("mx1.b.test", "AAAA", "::1")
    zone.add("mx2.b.test", "A", "127.0.0.12")
    async with dns_server(zone) as ns:
        hops = await NextHopResolver({}, [ns], timeout=5, smtp_port=2525).resolve("B.test")
    assert hops == [Hop("mx1.b.test", 2525, "127.0.0.11"), Hop("mx1.b.test", 2525, "::1"),
                    Hop("mx2.b.test", 2525, "127.0.0.12")]
    assert ("b.test.", "MX") in zone.queries


async def test_implicit_mx_when_no_mx_record() -> None:
    zone = DnsZone()
    zone.add("c.test", "A", "127.0.0.13")
    async with dns_server(zone) as ns:
        hops = await NextHopResolver({}, [ns], timeout=5).resolve("c.test")
    assert hops == [Hop("c.test", 25, "127.0.0.13")]


async def test_mx_host_without_address_is_skipped() -> None:
    zone = DnsZone()
    zone.add("b.test", "MX", "10 gone.b.test.", "20 mx2.b.test.")
    zone.nxdomain.add("gone.b.test.")
    zone.add("mx2.b.test", "A", "127.0.0.12")
    async with dns_server(zone) as ns:
        hops = await NextHopResolver({}, [ns], timeout=5).resolve("b.test")
    assert hops == [Hop("mx2.b.test", 25, "127.0.0.12")]


async def test_null_mx_is_permanent() -> None:
    zone = DnsZone()
    zone.add("nomail.test", "MX", "0 .")
    async with dns_server(zone) as ns:
        with pytest.raises(NullMx) as info:
            await NextHopResolver({}, [ns], timeout=5).resolve("nomail.test")
    assert not info.value.transient
    assert (info.value.code, info.value.enhanced) == (556, "5.1.10")
    assert ("nomail.test.", "A") not in zone.queries  # no fallback to the implicit MX


async def test_nxdomain_is_permanent() -> None:
    zone = DnsZone(nxdomain={"nowhere.test."})
    async with dns_server(zone) as ns:
        with pytest.raises(NoSuchDomain) as info:
            await NextHopResolver({}, [ns], timeout=5).resolve("nowhere.test")
    assert not info.value.transient and info.value.enhanced == "5.1.2"


async def test_no_mx_and_no_address_is_permanent() -> None:
    zone = DnsZone()
    zone.add("empty.test", "TXT", '"v=spf1 -all"')
    async with dns_server(zone) as ns:
        with pytest.raises(NoRoute) as info:
            await NextHopResolver({}, [ns], timeout=5).resolve("empty.test")
    assert not info.value.transient


async def test_servfail_is_transient() -> None:
    zone = DnsZone(servfail={"broken.test."})
    async with dns_server(zone) as ns:
        with pytest.raises(DnsUnavailable) as info:
            await NextHopResolver({}, [ns], timeout=5).resolve("broken.test")
    assert info.value.transient and info.value.enhanced == "4.4.3"
    assert info.value.reply().startswith("451 4.4.3 ")


async def test_timeout_is_transient() -> None:
    zone = DnsZone(silent={"slow.test."})
    async with dns_server(zone) as ns:
        with pytest.raises(DnsUnavailable):
            await NextHopResolver({}, [ns], timeout=0.5).resolve("slow.test")
    assert zone.queries  # the server was asked, and said nothing


async def test_mx_host_servfail_is_transient_when_no_other_host_works() -> None:
    zone = DnsZone(servfail={"mx1.b.test."})
    zone.add("b.test", "MX", "10 mx1.b.test.")
    async with dns_server(zone) as ns:
        with pytest.raises(DnsUnavailable):
            await NextHopResolver({}, [ns], timeout=5).resolve("b.test")


async def test_static_route_wins_without_dns() -> None:
    zone = DnsZone()
    zone.add("b.mssante.test", "MX", "10 mx.elsewhere.test.")
    async with dns_server(zone) as ns:
        resolver = NextHopResolver({"b.mssante.test": "127.0.0.1:10025", "c.mssante.test": "[127.0.0.2]:2525",
                                    "d.mssante.test": "relay.d.test:2526"}, [ns], timeout=5)
        zone.add("relay.d.test", "A", "127.0.0.14")
        assert await resolver.resolve("B.mssante.test.") == [Hop("127.0.0.1", 10025, "127.0.0.1")]
        assert await resolver.resolve("c.mssante.test") == [Hop("127.0.0.2", 2525, "127.0.0.2")]
        assert await resolver.resolve("d.mssante.test") == [Hop("relay.d.test", 2526, "127.0.0.14")]
    assert ("b.mssante.test.", "MX") not in zone.queries
    assert ("relay.d.test.", "MX") not in zone.queries  # a route to a name looks up addresses only
    assert Hop("127.0.0.1", 10025).is_address_literal and not Hop("relay.d.test").is_address_literal


@pytest.mark.parametrize(("route", "expected"), [
    ("mx.b.test", ("mx.b.test", 25, False)),
    ("mx.b.test:587", ("mx.b.test", 587, False)),
    ("[127.0.0.1]", ("127.0.0.1", 25, True)),
    ("[::1]:2525", ("::1", 2525, True)),
])
def test_parse_route(route: str, expected: tuple[str, int, bool]) -> None:
    assert parse_route("x.test", route) == expected


@pytest.mark.parametrize("route", ["[127.0.0.1", "mx:port", "mx:70000", "[::1]x", ":25"])
def test_bad_route_refused_at_construction(route: str) -> None:
    with pytest.raises(BadRoute):
        NextHopResolver({"x.test": route}, [("127.0.0.1", 53)])
