"""Tests for L{gateway.routing}: destinations from the config, and connect
targets from DNS answered by the real test DNS server on 127.0.0.1.

Every wait is bounded by the resolver's timeout and by L{bounded}.
"""

from __future__ import annotations

import random
from collections.abc import Coroutine
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from gateway.config import DNSConfig, GatewayConfig, NextHop, parse_config
from gateway.dns import make_resolver
from gateway.routing import Destination, Host, Router, RoutingError
from tests.dnsserver import TestDNS

WAIT = 10


def bounded(coro: Coroutine[Any, Any, Any], seconds: float = WAIT) -> Deferred[Any]:
    """Run C{coro} as a Deferred that fails after C{seconds} at most."""
    return Deferred.fromCoroutine(coro).addTimeout(seconds, reactor)


def make_config(**sections: Any) -> GatewayConfig:
    """A validated config (through the real parser) with extra sections,
    e.g. C{routes={...}} or C{relay={"smarthost": ...}}."""
    doc: dict[str, Any] = {
        "server": {"hostname": "gw.example.test"},
        "listener": [{"name": "mx", "address": "127.0.0.1", "port": 0}],
    }
    doc.update(sections)
    return parse_config(doc, "test.toml")


@pytest.fixture
def test_dns():
    """A running test DNS server, stopped after the test."""
    server = TestDNS()
    server.start()
    yield server
    pytest_twisted.blockon(server.stop())


@pytest.fixture
def resolver(test_dns: TestDNS) -> Any:
    """The gateway's own resolver construction, pointed at the test server."""
    return make_resolver(DNSConfig(servers=test_dns.servers, timeout=2), reactor)


def router_for(resolver: Any, seed: int = 0, **sections: Any) -> Router:
    """A router over C{make_config(**sections)} with a seeded shuffle."""
    return Router(make_config(**sections), resolver, rng=random.Random(seed))


async def routing_error(router: Router, domain: str) -> RoutingError:
    """The RoutingError that C{router.hosts} raises for C{domain}."""
    with pytest.raises(RoutingError) as caught:
        await bounded(router.hosts(router.destination(domain)))
    return caught.value


# -- destination: configuration only --------------------------------------------


def test_destination_defaults_to_mx_delivery():
    """Without a route or smarthost, mail goes to the domain's MX hosts on
    the relay port, at the default TLS level."""
    router = Router(make_config(relay={"port": 2525}), resolver=None)
    dest = router.destination("example.test")
    assert dest == Destination(
        key="mx|example.test:2525|may|example.test",
        domain="example.test",
        next_hop=NextHop("example.test", 2525, True),
        tls="may",
        smarthost=False,
        route=None,
    )
    assert dest.kind == "mx"
    assert not dest.configured


def test_destination_route_exact_beats_parent():
    """An exact [routes] entry wins over a ".parent" entry, and the most
    specific ".parent" wins over a shorter one."""
    router = Router(make_config(routes={
        "example.test": "[exact.internal]:2525",
        ".example.test": "parent.internal",
        ".sub.example.test": "[sub.internal]:26",
    }), resolver=None)
    assert router.destination("example.test").next_hop == NextHop("exact.internal", 2525, False)
    assert router.destination("a.example.test").next_hop == NextHop("parent.internal", 25, True)
    assert router.destination("a.sub.example.test").next_hop == NextHop("sub.internal", 26, False)
    assert router.destination("a.sub.example.test").route == ".sub.example.test"
    assert router.destination("other.test").route is None


def test_destination_parent_route_does_not_match_the_parent_itself():
    """".example.test" covers subdomains only, as in Postfix transport(5)."""
    router = Router(make_config(routes={".example.test": "[parent.internal]"}), resolver=None)
    assert router.destination("example.test").kind == "mx"
    assert router.destination("x.example.test").kind == "route"


def test_destination_smarthost_keeps_recipient_domain():
    """Through the smarthost, the destination still names the recipient
    domain, is marked smarthost, and every domain shares one key."""
    router = Router(make_config(relay={"smarthost": "[relay.internal]:587"}), resolver=None)
    one, two = router.destination("one.test"), router.destination("two.test")
    assert one.smarthost and two.smarthost
    assert (one.domain, two.domain) == ("one.test", "two.test")
    assert one.next_hop == NextHop("relay.internal", 587, False)
    assert one.key == two.key == "smarthost|[relay.internal]:587|may|"


def test_destination_route_wins_over_smarthost():
    """[routes] are consulted before the smarthost."""
    router = Router(make_config(relay={"smarthost": "relay.internal"},
                                routes={"local.test": "[store.internal]"}), resolver=None)
    assert router.destination("local.test").next_hop == NextHop("store.internal", 25, False)
    assert router.destination("elsewhere.test").smarthost


def test_destination_tls_from_route_tls():
    """route_tls overrides tls_default for a route (by its [routes] key),
    for the smarthost (key "smarthost") and for MX delivery (by domain)."""
    config = make_config(routes={".corp.test": "[hub.internal]"}, relay={"smarthost": "relay.internal"})
    router = Router(config, None, tls_default="may",
                    route_tls={".corp.test": "verify", "smarthost": "encrypt"})
    assert router.destination("a.corp.test").tls == "verify"
    assert router.destination("other.test").tls == "encrypt"
    mx_router = Router(make_config(), None, route_tls={"bank.test": "verify", ".gov.test": "encrypt"})
    assert mx_router.destination("bank.test").tls == "verify"
    assert mx_router.destination("x.gov.test").tls == "encrypt"
    assert mx_router.destination("other.test").tls == "may"


def test_destination_keys_differ_by_tls_and_policy_domain():
    """Two domains never share a connection across TLS levels or MTA-STS
    policy domains, even when their next hops are the same."""
    config = make_config(routes={"a.test": "[hub.internal]", "b.test": "[hub.internal]"})
    plain = Router(config, None)
    strict = Router(config, None, route_tls={"b.test": "verify"})
    assert plain.destination("a.test").next_hop == plain.destination("b.test").next_hop
    assert plain.destination("a.test").key != plain.destination("b.test").key  # policy domain
    assert strict.destination("b.test").key != plain.destination("b.test").key  # TLS level
    assert plain.destination("a.test").key == plain.destination("a.test").key


def test_unknown_tls_level_is_refused():
    """A TLS level outside none/may/encrypt/verify is a programming or
    config error, caught at construction."""
    with pytest.raises(ValueError, match="route_tls"):
        Router(make_config(), None, route_tls={"x.test": "required"})
    with pytest.raises(ValueError, match="tls_default"):
        Router(make_config(), None, tls_default="dane")


# -- hosts: MX delivery -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hosts_in_mx_preference_order(test_dns: TestDNS, resolver: Any):
    """Connect targets follow MX preference, lowest first, on the relay port."""
    test_dns.add("example.test", "MX", (30, "mx3.example.test"))
    test_dns.add("example.test", "MX", (10, "mx1.example.test"))
    test_dns.add("example.test", "MX", (20, "mx2.example.test"))
    for i in (1, 2, 3):
        test_dns.add(f"mx{i}.example.test", "A", f"192.0.2.{i}")
    router = router_for(resolver, relay={"port": 2525})
    assert await bounded(router.hosts(router.destination("example.test"))) == [
        Host("mx1.example.test", "192.0.2.1", 2525, 10),
        Host("mx2.example.test", "192.0.2.2", 2525, 20),
        Host("mx3.example.test", "192.0.2.3", 2525, 30),
    ]


@pytest_twisted.ensureDeferred
async def test_hosts_shuffle_equal_preferences(test_dns: TestDNS, resolver: Any):
    """MX hosts of equal preference come in random order (both orders occur
    over several calls with a seeded rng), always before higher ones."""
    test_dns.add("example.test", "MX", (10, "a.example.test"))
    test_dns.add("example.test", "MX", (10, "b.example.test"))
    test_dns.add("example.test", "MX", (20, "c.example.test"))
    test_dns.add("a.example.test", "A", "192.0.2.1")
    test_dns.add("b.example.test", "A", "192.0.2.2")
    test_dns.add("c.example.test", "A", "192.0.2.3")
    router = router_for(resolver, seed=42)
    dest = router.destination("example.test")
    orders = set()
    for _ in range(12):
        hosts = await bounded(router.hosts(dest))
        orders.add(tuple(h.name for h in hosts))
    assert orders == {
        ("a.example.test", "b.example.test", "c.example.test"),
        ("b.example.test", "a.example.test", "c.example.test"),
    }


@pytest_twisted.ensureDeferred
async def test_hosts_implicit_mx(test_dns: TestDNS, resolver: Any):
    """A domain without MX records but with addresses is its own mail host
    (RFC 5321 §5.1), IPv4 first."""
    test_dns.add("nomx.test", "AAAA", "2001:db8::7")
    test_dns.add("nomx.test", "A", "192.0.2.7")
    router = router_for(resolver)
    assert await bounded(router.hosts(router.destination("nomx.test"))) == [
        Host("nomx.test", "192.0.2.7", 25, 0),
        Host("nomx.test", "2001:db8::7", 25, 0),
    ]


@pytest_twisted.ensureDeferred
async def test_hosts_no_mx_and_no_address_is_permanent(test_dns: TestDNS, resolver: Any):
    """A domain that exists with neither MX nor address records cannot
    receive mail: permanent 5.1.2."""
    test_dns.add("txtonly.test", "TXT", "v=spf1 -all")
    err = await routing_error(router_for(resolver), "txtonly.test")
    assert (err.permanent, err.status) == (True, "5.1.2")


@pytest_twisted.ensureDeferred
async def test_hosts_null_mx_is_permanent(test_dns: TestDNS, resolver: Any):
    """A null MX (RFC 7505) refuses mail: permanent 5.1.10, no address
    look-ups."""
    test_dns.add("nullmx.test", "MX", (0, "."))
    test_dns.add("nullmx.test", "A", "192.0.2.8")
    err = await routing_error(router_for(resolver), "nullmx.test")
    assert (err.permanent, err.status, err.text) == (
        True, "5.1.10", "Domain nullmx.test does not accept mail (null MX)")
    assert test_dns.queries == [("nullmx.test", "MX")]


@pytest_twisted.ensureDeferred
async def test_hosts_nxdomain_is_permanent(test_dns: TestDNS, resolver: Any):
    """A recipient domain that does not exist: permanent 5.1.2."""
    err = await routing_error(router_for(resolver), "missing.test")
    assert (err.permanent, err.status) == (True, "5.1.2")


@pytest_twisted.ensureDeferred
async def test_hosts_servfail_is_temporary(test_dns: TestDNS, resolver: Any):
    """A SERVFAIL on the MX query defers: temporary 4.4.3."""
    test_dns.add("broken.test", "MX", (10, "mx.broken.test"))
    test_dns.set_servfail("broken.test")
    err = await routing_error(router_for(resolver), "broken.test")
    assert (err.permanent, err.status) == (False, "4.4.3")


@pytest_twisted.ensureDeferred
async def test_hosts_timeout_is_temporary(test_dns: TestDNS):
    """A DNS server that never answers defers after the resolver timeout."""
    resolver = make_resolver(DNSConfig(servers=test_dns.servers, timeout=0.5), reactor)
    test_dns.set_timeout("slow.test")
    router = router_for(resolver)
    with pytest.raises(RoutingError) as caught:
        await bounded(router.hosts(router.destination("slow.test")), 5)
    assert (caught.value.permanent, caught.value.status) == (False, "4.4.3")


@pytest_twisted.ensureDeferred
async def test_hosts_skip_exchange_without_address(test_dns: TestDNS, resolver: Any):
    """An MX host that does not resolve is skipped; the next one is used."""
    test_dns.add("example.test", "MX", (10, "gone.example.test"))
    test_dns.add("example.test", "MX", (20, "nodata.example.test"))
    test_dns.add("example.test", "MX", (30, "good.example.test"))
    test_dns.add("nodata.example.test", "TXT", "no address here")
    test_dns.add("good.example.test", "A", "192.0.2.30")
    router = router_for(resolver)
    assert await bounded(router.hosts(router.destination("example.test"))) == [
        Host("good.example.test", "192.0.2.30", 25, 30),
    ]


@pytest_twisted.ensureDeferred
async def test_hosts_all_exchanges_unresolvable(test_dns: TestDNS, resolver: Any):
    """When no MX host has an address the error is temporary if any
    look-up failed temporarily, else permanent 5.1.2."""
    test_dns.add("example.test", "MX", (10, "gone.example.test"))
    test_dns.add("example.test", "MX", (20, "flaky.example.test"))
    test_dns.add("flaky.example.test", "A", "192.0.2.20")
    test_dns.set_servfail("flaky.example.test")
    router = router_for(resolver)
    err = await routing_error(router, "example.test")
    assert (err.permanent, err.status) == (False, "4.4.3")

    test_dns.remove("flaky.example.test")
    test_dns.clear_failure("flaky.example.test")
    err = await routing_error(router, "example.test")
    assert (err.permanent, err.status) == (True, "5.1.2")


@pytest_twisted.ensureDeferred
async def test_hosts_ipv6_after_ipv4_per_exchange(test_dns: TestDNS, resolver: Any):
    """Each MX host contributes its IPv4 then IPv6 addresses, in MX order;
    an address reached through two MX hosts is tried once."""
    test_dns.add("example.test", "MX", (10, "mx1.example.test"))
    test_dns.add("example.test", "MX", (20, "mx2.example.test"))
    test_dns.add("mx1.example.test", "AAAA", "2001:db8::1")
    test_dns.add("mx1.example.test", "A", "192.0.2.1")
    test_dns.add("mx2.example.test", "A", "192.0.2.1")
    test_dns.add("mx2.example.test", "A", "192.0.2.2")
    router = router_for(resolver)
    assert await bounded(router.hosts(router.destination("example.test"))) == [
        Host("mx1.example.test", "192.0.2.1", 25, 10),
        Host("mx1.example.test", "2001:db8::1", 25, 10),
        Host("mx2.example.test", "192.0.2.2", 25, 20),
    ]


# -- hosts: routes, smarthost, literals ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hosts_bracketed_route_skips_mx(test_dns: TestDNS, resolver: Any):
    """A "[host]:port" route connects to that host's addresses on that port
    without any MX look-up."""
    test_dns.add("store.internal", "A", "192.0.2.40")
    test_dns.add("store.internal", "MX", (10, "elsewhere.internal"))
    router = router_for(resolver, routes={"local.test": "[store.internal]:2526"})
    assert await bounded(router.hosts(router.destination("local.test"))) == [
        Host("store.internal", "192.0.2.40", 2526, 0),
    ]
    assert ("store.internal", "MX") not in test_dns.queries
    assert ("local.test", "MX") not in test_dns.queries


@pytest_twisted.ensureDeferred
async def test_hosts_parent_route_with_mx_lookup(test_dns: TestDNS, resolver: Any):
    """A ".parent" route to an unbracketed host looks up that host's MX."""
    test_dns.add("hub.internal", "MX", (5, "mx.hub.internal"))
    test_dns.add("mx.hub.internal", "A", "192.0.2.41")
    router = router_for(resolver, routes={".corp.test": "hub.internal:2527"})
    assert await bounded(router.hosts(router.destination("sales.corp.test"))) == [
        Host("mx.hub.internal", "192.0.2.41", 2527, 5),
    ]


@pytest_twisted.ensureDeferred
async def test_hosts_ip_route_needs_no_dns(test_dns: TestDNS, resolver: Any):
    """A route to an IP address is used as is, without DNS."""
    router = router_for(resolver, routes={"local.test": "[192.0.2.42]:2528"})
    assert await bounded(router.hosts(router.destination("local.test"))) == [
        Host("192.0.2.42", "192.0.2.42", 2528, 0),
    ]
    assert test_dns.queries == []


@pytest_twisted.ensureDeferred
async def test_hosts_smarthost(test_dns: TestDNS, resolver: Any):
    """Through the smarthost, the recipient domain's MX is never looked up."""
    test_dns.add("relay.internal", "A", "192.0.2.43")
    router = router_for(resolver, relay={"smarthost": "[relay.internal]:587"})
    assert await bounded(router.hosts(router.destination("example.test"))) == [
        Host("relay.internal", "192.0.2.43", 587, 0),
    ]
    assert [q for q in test_dns.queries if q[0] == "example.test"] == []


@pytest_twisted.ensureDeferred
async def test_hosts_unresolvable_configured_hop_is_temporary(test_dns: TestDNS, resolver: Any):
    """A route or smarthost that does not exist is the admin's mistake:
    mail is deferred (4.4.3), never bounced."""
    router = router_for(resolver, relay={"smarthost": "[typo.internal]"})
    err = await routing_error(router, "example.test")
    assert (err.permanent, err.status) == (False, "4.4.3")
    assert "typo.internal" in err.text


@pytest_twisted.ensureDeferred
async def test_hosts_address_literal_domain(test_dns: TestDNS, resolver: Any):
    """Mail to user@[192.0.2.44] goes straight to that address."""
    router = router_for(resolver)
    dest = router.destination("[192.0.2.44]")
    assert dest.kind == "literal"
    assert await bounded(router.hosts(dest)) == [Host("192.0.2.44", "192.0.2.44", 25, 0)]
    assert test_dns.queries == []
