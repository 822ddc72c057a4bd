"""Tests for L{gateway.dns} (resolver construction, MX and address look-ups)
and for the test DNS server in L{tests.dnsserver} they run against.

Real sockets: a twisted.names client talks UDP (and TCP after truncation)
to an authoritative server on 127.0.0.1.  Every wait is bounded by the
resolver's timeout and by L{bounded}.
"""

from __future__ import annotations

from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.testing import MemoryReactorClock
from twisted.names import client, error

from gateway.config import DNSConfig
from gateway.dns import DNSPermanentError, DNSTemporaryError, lookup_addresses, lookup_mx, make_resolver
from tests.dnsserver import TestDNS, reverse_name

WAIT = 10


def bounded(coro: Coroutine[Any, Any, Any], seconds: float = WAIT) -> Deferred[Any]:
    """Run C{coro} as a Deferred that fails after C{seconds} at most."""
    return Deferred.fromCoroutine(coro).addTimeout(seconds, reactor)


@pytest.fixture
def test_dns():
    """A running test DNS server, stopped after the test."""
    server = TestDNS()
    server.start()
    yield server
    pytest_twisted.blockon(server.stop())


@pytest.fixture
def resolver(test_dns: TestDNS) -> client.Resolver:
    """A client.Resolver, built as the gateway builds it, that asks only
    the test server."""
    return make_resolver(DNSConfig(servers=test_dns.servers, timeout=2), reactor)


# -- make_resolver ------------------------------------------------------------


def test_make_resolver_uses_configured_servers_and_timeout():
    """With [dns] servers, the resolver asks exactly those, with the one
    configured timeout per query."""
    resolver = make_resolver(DNSConfig(servers=(("192.0.2.53", 5353),), timeout=3.5), MemoryReactorClock())
    assert isinstance(resolver, client.Resolver)
    assert resolver.servers == [("192.0.2.53", 5353)]
    assert resolver.timeout == (3.5,)


def test_make_resolver_reads_resolv_conf_without_servers(tmp_path: Path):
    """Without [dns] servers, the resolver uses the system's resolv.conf
    (the path is injectable so the test does not depend on the host)."""
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 192.0.2.54\n")
    clock = MemoryReactorClock()
    resolver = make_resolver(DNSConfig(timeout=4), clock, resolv_conf=str(conf))
    assert resolver.servers == []
    assert resolver.dynServers == [("192.0.2.54", 53)]
    assert resolver.timeout == (4,)


# -- lookup_mx ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_lookup_mx_sorted_by_preference(test_dns: TestDNS, resolver: client.Resolver):
    """MX records come back as (preference, exchange), lowest preference
    first, exchanges lower case without the trailing dot."""
    test_dns.add("example.test", "MX", (20, "MX2.Example.Test."))
    test_dns.add("example.test", "MX", (5, "mx0.example.test"))
    test_dns.add("example.test", "MX", (10, "mx1.example.test"))
    assert await bounded(lookup_mx(resolver, "example.test")) == [
        (5, "mx0.example.test"), (10, "mx1.example.test"), (20, "mx2.example.test"),
    ]
    assert test_dns.queries == [("example.test", "MX")]


@pytest_twisted.ensureDeferred
async def test_lookup_mx_nodata_is_empty(test_dns: TestDNS, resolver: client.Resolver):
    """A name that exists without MX records gives [] (NODATA), not an
    error: the caller then applies the implicit MX."""
    test_dns.add("nomx.test", "A", "192.0.2.1")
    assert await bounded(lookup_mx(resolver, "nomx.test")) == []


@pytest_twisted.ensureDeferred
async def test_lookup_mx_nxdomain_is_permanent(test_dns: TestDNS, resolver: client.Resolver):
    """NXDOMAIN is the one permanent failure."""
    with pytest.raises(DNSPermanentError):
        await bounded(lookup_mx(resolver, "missing.test"))


@pytest_twisted.ensureDeferred
async def test_lookup_mx_servfail_is_temporary(test_dns: TestDNS, resolver: client.Resolver):
    """SERVFAIL may heal, so it is temporary."""
    test_dns.add("broken.test", "MX", (10, "mx.broken.test"))
    test_dns.set_servfail("broken.test")
    with pytest.raises(DNSTemporaryError, match="SERVFAIL"):
        await bounded(lookup_mx(resolver, "broken.test"))


@pytest_twisted.ensureDeferred
async def test_lookup_mx_timeout_is_temporary(test_dns: TestDNS):
    """A server that never answers fails the look-up after the resolver's
    own timeout, as a temporary error."""
    resolver = make_resolver(DNSConfig(servers=test_dns.servers, timeout=0.5), reactor)
    test_dns.set_timeout("slow.test")
    with pytest.raises(DNSTemporaryError, match="timed out"):
        await bounded(lookup_mx(resolver, "slow.test"), 5)
    assert test_dns.queries == [("slow.test", "MX")]


@pytest_twisted.ensureDeferred
async def test_lookup_mx_null_mx_is_visible(test_dns: TestDNS, resolver: client.Resolver):
    """The RFC 7505 null MX comes back as exchange "" so routing can refuse
    it."""
    test_dns.add("nullmx.test", "MX", (0, "."))
    assert await bounded(lookup_mx(resolver, "nullmx.test")) == [(0, "")]


@pytest_twisted.ensureDeferred
async def test_lookup_mx_follows_cname_in_answer(test_dns: TestDNS, resolver: client.Resolver):
    """When the server answers a CNAME with the target's records, the
    target's MX records are returned from that one answer."""
    test_dns.add("alias.test", "CNAME", "real.test")
    test_dns.add("real.test", "MX", (10, "mx.real.test"))
    assert await bounded(lookup_mx(resolver, "alias.test")) == [(10, "mx.real.test")]
    assert test_dns.queries == [("alias.test", "MX")]


@pytest_twisted.ensureDeferred
async def test_lookup_mx_requeries_unchased_cname(test_dns: TestDNS, resolver: client.Resolver):
    """When the answer holds only the CNAME (an out-of-zone target), the
    target is asked for next."""
    test_dns.chase_cnames = False
    test_dns.add("alias.test", "CNAME", "real.test")
    test_dns.add("real.test", "MX", (10, "mx.real.test"))
    assert await bounded(lookup_mx(resolver, "alias.test")) == [(10, "mx.real.test")]
    assert test_dns.queries == [("alias.test", "MX"), ("real.test", "MX")]


@pytest_twisted.ensureDeferred
async def test_lookup_mx_cname_loop_is_temporary(test_dns: TestDNS, resolver: client.Resolver):
    """A CNAME loop ends in a bounded number of queries, as a temporary
    error rather than a bounce."""
    test_dns.chase_cnames = False
    test_dns.add("a.loop.test", "CNAME", "b.loop.test")
    test_dns.add("b.loop.test", "CNAME", "a.loop.test")
    with pytest.raises(DNSTemporaryError, match="loop"):
        await bounded(lookup_mx(resolver, "a.loop.test"))
    assert len(test_dns.queries) == 2


@pytest_twisted.ensureDeferred
async def test_identical_queries_in_flight_are_sent_once(test_dns: TestDNS, resolver: client.Resolver):
    """Two concurrent look-ups of the same MX share one query on the wire."""
    test_dns.add("example.test", "MX", (10, "mx.example.test"))
    first, second = await gatherResults([
        bounded(lookup_mx(resolver, "example.test")),
        bounded(lookup_mx(resolver, "example.test")),
    ])
    assert first == second == [(10, "mx.example.test")]
    assert test_dns.queries == [("example.test", "MX")]


# -- lookup_addresses -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_lookup_addresses_ipv4_before_ipv6(test_dns: TestDNS, resolver: client.Resolver):
    """A records come first, then AAAA, whatever the order on the wire."""
    test_dns.add("host.test", "AAAA", "2001:db8::1")
    test_dns.add("host.test", "A", "192.0.2.1")
    test_dns.add("host.test", "A", "192.0.2.2")
    assert await bounded(lookup_addresses(resolver, "host.test")) == ["192.0.2.1", "192.0.2.2", "2001:db8::1"]
    assert sorted(test_dns.queries) == [("host.test", "A"), ("host.test", "AAAA")]


@pytest_twisted.ensureDeferred
async def test_lookup_addresses_of_an_ip_needs_no_query(test_dns: TestDNS, resolver: client.Resolver):
    """An IP address is its own address, in normal spelling, without DNS."""
    assert await bounded(lookup_addresses(resolver, "192.0.2.9")) == ["192.0.2.9"]
    assert await bounded(lookup_addresses(resolver, "2001:DB8:0::9")) == ["2001:db8::9"]
    assert test_dns.queries == []


@pytest_twisted.ensureDeferred
async def test_lookup_addresses_nodata_is_empty(test_dns: TestDNS, resolver: client.Resolver):
    """A name with neither A nor AAAA (but other records) gives []."""
    test_dns.add("mailonly.test", "MX", (10, "mx.test"))
    assert await bounded(lookup_addresses(resolver, "mailonly.test")) == []


@pytest_twisted.ensureDeferred
async def test_lookup_addresses_nxdomain_is_permanent(test_dns: TestDNS, resolver: client.Resolver):
    """A host that does not exist is a permanent error."""
    with pytest.raises(DNSPermanentError):
        await bounded(lookup_addresses(resolver, "nohost.test"))


@pytest_twisted.ensureDeferred
async def test_lookup_addresses_keeps_ipv4_when_aaaa_fails(test_dns: TestDNS, resolver: client.Resolver):
    """A failing AAAA query does not hide the IPv4 addresses found."""
    test_dns.add("half.test", "A", "192.0.2.3")
    test_dns.set_servfail("half.test", "AAAA")
    assert await bounded(lookup_addresses(resolver, "half.test")) == ["192.0.2.3"]


@pytest_twisted.ensureDeferred
async def test_lookup_addresses_failure_without_addresses_is_temporary(test_dns: TestDNS, resolver: client.Resolver):
    """With no address found and a SERVFAIL, the look-up fails temporarily."""
    test_dns.add("down.test", "A", "192.0.2.4")
    test_dns.set_servfail("down.test")
    with pytest.raises(DNSTemporaryError):
        await bounded(lookup_addresses(resolver, "down.test"))


@pytest_twisted.ensureDeferred
async def test_lookup_addresses_follows_cname(test_dns: TestDNS, resolver: client.Resolver):
    """A host name that is an alias resolves to its target's addresses."""
    test_dns.add("www.test", "CNAME", "web.test")
    test_dns.add("web.test", "A", "192.0.2.5")
    test_dns.add("web.test", "AAAA", "2001:db8::5")
    assert await bounded(lookup_addresses(resolver, "www.test")) == ["192.0.2.5", "2001:db8::5"]


# -- the test server itself -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_server_distinguishes_nxdomain_and_nodata(test_dns: TestDNS, resolver: client.Resolver):
    """The test server answers NXDOMAIN for unknown names and an empty
    NOERROR answer for a known name without the asked type (RFC 2308)."""
    test_dns.add("known.test", "TXT", "hello")
    answers, _, _ = await resolver.lookupAddress("known.test").addTimeout(WAIT, reactor)
    assert answers == []
    with pytest.raises(error.DNSNameError):
        await resolver.lookupAddress("unknown.test").addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_server_zone_changes_apply_at_once(test_dns: TestDNS, resolver: client.Resolver):
    """Records added or removed while the server runs answer the next query."""
    with pytest.raises(DNSPermanentError):
        await bounded(lookup_addresses(resolver, "late.test"))
    test_dns.add("late.test", "A", "192.0.2.7")
    assert await bounded(lookup_addresses(resolver, "late.test")) == ["192.0.2.7"]
    test_dns.remove("late.test")
    with pytest.raises(DNSPermanentError):
        await bounded(lookup_addresses(resolver, "late.test"))


@pytest_twisted.ensureDeferred
async def test_server_txt_chunks_and_tcp_fallback(test_dns: TestDNS, resolver: client.Resolver):
    """TXT values keep their chunks; a TXT too long for a 512-byte UDP
    answer (a 4096-bit DKIM key) is truncated and fetched again over TCP."""
    test_dns.add("chunks.test", "TXT", ["v=spf1 ", "-all"])
    answers, _, _ = await resolver.lookupText("chunks.test").addTimeout(WAIT, reactor)
    assert [rr.payload.data for rr in answers] == [[b"v=spf1 ", b"-all"]]

    test_dns.queries.clear()
    key = "v=DKIM1; k=rsa; p=" + "A" * 736
    test_dns.add("sel._domainkey.example.test", "TXT", key)
    answers, _, _ = await resolver.lookupText("sel._domainkey.example.test").addTimeout(WAIT, reactor)
    assert b"".join(answers[0].payload.data).decode() == key
    assert [len(chunk) for chunk in answers[0].payload.data] == [255, 255, len(key) - 510]
    # UDP first (truncated), then the same question over TCP.
    assert test_dns.queries == [("sel._domainkey.example.test", "TXT")] * 2


@pytest_twisted.ensureDeferred
async def test_server_ptr_records(test_dns: TestDNS, resolver: client.Resolver):
    """PTR records are served under the reverse name of an address."""
    test_dns.add(reverse_name("192.0.2.1"), "PTR", "mx.example.test")
    answers, _, _ = await resolver.lookupPointer("1.2.0.192.in-addr.arpa").addTimeout(WAIT, reactor)
    assert [rr.payload.name.name for rr in answers] == [b"mx.example.test"]
