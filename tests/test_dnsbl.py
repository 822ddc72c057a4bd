"""Tests for plugins/dnsbl.py: the site syntax and answer filters, the
reversed query names, and the plugin against the real test DNS server
(tests/dnsserver.py) through a real twisted.names resolver: listed and
unlisted clients, weights, allow lists, lists that time out or fail, the
cache, the trust exemption and the two stages.

Every wait is bounded: the resolver has a short timeout and every
Deferred awaited here has a reactor timeout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from gateway.address import Mailbox
from gateway.config import ConfigError, DNSConfig, parse_config
from gateway.dns import make_resolver
from gateway.interfaces import IConnectCheck, IRcptCheck
from gateway.pipeline import Pipeline, PluginSlot
from gateway.registry import PluginContext, build_options
from gateway.session import Recipient, Session, Transaction
from gateway.store import MemoryStore, StoreError
from gateway.verdict import CONTINUE, Action
from plugins import dnsbl
from tests.dnsserver import TestDNS

WAIT = 10

# -- pure units ----------------------------------------------------------------------


@pytest.mark.parametrize("text, zone, weight", [
    ("zen.example", "zen.example", 1),
    ("Zen.Example.", "zen.example", 1),
    ("zen.example*3", "zen.example", 3),
    ("zen.example=127.0.0.[2..11]*3", "zen.example", 3),
    ("wl.example=127.0.[0..255].[2;3]*-5", "wl.example", -5),
    ("bl.example=127.0.0.[2;4;9..11]", "bl.example", 1),
])
def test_parse_site(text: str, zone: str, weight: int):
    """zone[=filter][*weight] as in Postfix's postscreen_dnsbl_sites."""
    site = dnsbl.parse_site(text)
    assert (site.zone, site.weight) == (zone, weight)


@pytest.mark.parametrize("text", [
    "", "zen.example=", "zen.example*", "zen.example*x", "zen.example=127.0.0", "zen.example=127.0.0.256",
    "zen.example=127.0.0.[11..2]", "zen.example=127.0.0.[2..]", "zen.example=127.0.0.[a]", "bad_zone.example",
    "[127.0.0.1]", "zen.example=127.0.0.2=3",
])
def test_parse_site_refuses_mistakes(text: str):
    """Malformed entries are errors."""
    with pytest.raises(ValueError):
        dnsbl.parse_site(text)


@pytest.mark.parametrize("site, answer, counts", [
    ("bl.example", "127.0.0.2", True),
    ("bl.example", "127.1.2.3", True),
    ("bl.example", "127.255.255.254", False),
    ("bl.example", "192.0.2.1", False),
    ("bl.example=127.0.0.[2..11]", "127.0.0.11", True),
    ("bl.example=127.0.0.[2..11]", "127.0.0.12", False),
    ("bl.example=127.0.0.[2;4;9..11]", "127.0.0.4", True),
    ("bl.example=127.0.0.[2;4;9..11]", "127.0.0.3", False),
    ("bl.example=127.0.[0..255].[2;3]", "127.0.17.3", True),
    ("bl.example=192.0.2.1", "192.0.2.1", True),
])
def test_answer_filters(site: str, answer: str, counts: bool):
    """A filter selects answers octet by octet; without one only
    127.0.0.0/8 outside 127.255.255.0/24 counts."""
    assert dnsbl.parse_site(site).counts(answer) is counts


@pytest.mark.parametrize("ip, name", [
    ("192.0.2.99", "99.2.0.192.bl.example"),
    ("::ffff:192.0.2.99", "99.2.0.192.bl.example"),
    ("2001:db8::567:89ab", "b.a.9.8.7.6.5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.example"),
])
def test_query_names(ip: str, name: str):
    """IPv4 octets reversed; IPv6 as 32 reversed nibbles (RFC 5782 §2.4);
    an IPv4-mapped address as IPv4."""
    assert dnsbl.query_name(ip, "bl.example") == name


@pytest.mark.parametrize("options, problem", [
    ({}, "sites must name"),
    ({"sites": ["bl.example"], "stage": "data"}, "stage"),
    ({"sites": ["bl.example"], "threshold": 0}, "threshold"),
    ({"sites": ["bl.example=1.2.3"]}, "four octet"),
    ({"sites": ["bl.example"], "query_timeout": 0}, "query_timeout"),
    ({"sites": ["bl.example"], "cache_ttl": -1}, "cache_ttl"),
])
def test_bad_options_are_config_errors(tmp_path: Path, options: dict[str, Any], problem: str):
    """Options are validated at start-up."""
    with pytest.raises(ConfigError, match=problem):
        build_options(dnsbl.factory, options, str(tmp_path / "gateway.toml"))


# -- against the test DNS server --------------------------------------------------------


@pytest.fixture
def test_dns():
    """A running test DNS server, stopped after the test."""
    server = TestDNS(reactor)
    server.start()
    yield server
    pytest_twisted.blockon(server.stop())


@pytest.fixture
def resolver(test_dns):
    """A resolver as the gateway builds it, with a short timeout."""
    return make_resolver(DNSConfig(servers=test_dns.servers, timeout=0.5), reactor)


def make(tmp_path: Path, resolver: Any, *, clock: Any = reactor, store: Any = None,
         trusted: list[str] | None = None, plugin_timeout: Any = None, **options: Any) -> Any:
    """The plugin built as the registry builds it."""
    from tests.support import base_config

    doc = base_config(tmp_path, server={"trusted_networks": trusted or []})
    if plugin_timeout is not None:
        doc["plugins"] = {"dnsbl": {"timeout": plugin_timeout}}
    config = parse_config(doc, str(tmp_path / "gateway.toml"))
    settings = build_options(dnsbl.factory, options, config.path)
    context = PluginContext("dnsbl", clock, resolver, config, lambda f, *a: f(*a), store)
    return dnsbl.factory.build(settings.options, context)


def session(peer: str = "192.0.2.99", **kwargs: Any) -> Session:
    return Session(id="s1", listener="mx", peer=peer, helo="client.example.org", **kwargs)


async def rcpt(plugin: Any, sess: Session | None = None, txn: Transaction | None = None) -> Any:
    txn = txn or Transaction(sender=Mailbox("a", "example.org"))
    verdict = plugin.check_rcpt(sess or session(), txn, Recipient(Mailbox("b", "example.test")))
    if isinstance(verdict, defer.Deferred):
        verdict = await verdict.addTimeout(WAIT, reactor)
    return verdict


def listing(test_dns: TestDNS, zone: str, ip: str = "192.0.2.99", code: str = "127.0.0.2") -> None:
    test_dns.add(dnsbl.query_name(ip, zone), "A", code)


@pytest_twisted.ensureDeferred
async def test_listed_client_is_refused_with_554(tmp_path, test_dns, resolver):
    """A client listed in a zone gets 554 5.7.1 naming the client and the
    list; the score is left in the session notes."""
    listing(test_dns, "bl.test")
    plugin = make(tmp_path, resolver, sites=["bl.test"])
    sess = session()
    verdict = await rcpt(plugin, sess)
    assert (verdict.action, verdict.reply.code, verdict.reply.status) == (Action.REJECT, 554, "5.7.1")
    assert verdict.reply.text == "Service unavailable; client [192.0.2.99] blocked using bl.test"
    assert sess.notes["dnsbl"]["score"] == 1
    assert sess.notes["dnsbl"]["listed"] == [("bl.test", 1, ("127.0.0.2",))]


@pytest_twisted.ensureDeferred
async def test_unlisted_client_passes(tmp_path, test_dns, resolver):
    """NXDOMAIN is "not listed": CONTINUE, recorded as pass."""
    plugin = make(tmp_path, resolver, sites=["bl.test"])
    txn = Transaction(sender=None)
    assert await rcpt(plugin, txn=txn) is CONTINUE
    assert [(r.plugin, r.result, r.detail) for r in txn.results] == [("dnsbl", "pass", "score=0")]
    assert ("99.2.0.192.bl.test", "A") in test_dns.queries


@pytest_twisted.ensureDeferred
async def test_ipv6_client_is_looked_up_by_nibbles(tmp_path, test_dns, resolver):
    """An IPv6 client is found under its nibble name."""
    listing(test_dns, "bl.test", ip="2001:db8::1")
    plugin = make(tmp_path, resolver, sites=["bl.test"])
    verdict = await rcpt(plugin, session(peer="2001:db8::1"))
    assert verdict.reply.text == "Service unavailable; client [2001:db8::1] blocked using bl.test"


@pytest_twisted.ensureDeferred
async def test_filter_selects_return_codes(tmp_path, test_dns, resolver):
    """An answer the filter does not select does not count."""
    listing(test_dns, "bl.test", code="127.0.0.10")
    plugin = make(tmp_path, resolver, sites=["bl.test=127.0.0.[2..4]"])
    assert await rcpt(plugin) is CONTINUE
    plugin = make(tmp_path, resolver, sites=["bl.test=127.0.0.[2..4;10]"], cache_ttl=0)
    assert (await rcpt(plugin)).action is Action.REJECT


@pytest_twisted.ensureDeferred
async def test_weights_add_up_to_the_threshold(tmp_path, test_dns, resolver):
    """Weights of all listing zones add up; below the threshold the client
    passes, at it the reply names every listing zone."""
    listing(test_dns, "one.test")
    listing(test_dns, "two.test")
    plugin = make(tmp_path, resolver, sites=["one.test*2", "two.test", "three.test*5"], threshold=4)
    assert await rcpt(plugin) is CONTINUE
    plugin = make(tmp_path, resolver, sites=["one.test*2", "two.test*2", "three.test*5"], threshold=4)
    verdict = await rcpt(plugin)
    assert verdict.reply.text.endswith("blocked using one.test, two.test")


@pytest_twisted.ensureDeferred
async def test_same_zone_twice_is_asked_once(tmp_path, test_dns, resolver):
    """A zone in two entries (different filters and weights) is queried
    once and each entry that selects the answer counts."""
    test_dns.add(dnsbl.query_name("192.0.2.99", "zen.test"), "A", "127.0.0.2")
    test_dns.add(dnsbl.query_name("192.0.2.99", "zen.test"), "A", "127.0.0.4")
    plugin = make(tmp_path, resolver, sites=["zen.test=127.0.0.2*2", "zen.test=127.0.0.4*3", "zen.test=127.0.0.9*7"],
                  threshold=5)
    sess = session()
    assert (await rcpt(plugin, sess)).action is Action.REJECT
    assert sess.notes["dnsbl"]["score"] == 5
    assert test_dns.queries.count(("99.2.0.192.zen.test", "A")) == 1


@pytest_twisted.ensureDeferred
async def test_allow_list_offsets_a_listing(tmp_path, test_dns, resolver):
    """A negative weight (a DNSWL) brings the score below the threshold;
    the allow list is never named in a reply."""
    listing(test_dns, "bl.test")
    listing(test_dns, "wl.test", code="127.0.10.2")
    sites = ["bl.test*3", "wl.test=127.0.[0..255].[2;3]*-5"]
    sess = session()
    assert await rcpt(make(tmp_path, resolver, sites=sites, threshold=3), sess) is CONTINUE
    assert sess.notes["dnsbl"]["score"] == -2
    test_dns.remove(dnsbl.query_name("192.0.2.99", "wl.test"))
    verdict = await rcpt(make(tmp_path, resolver, sites=sites, threshold=3, cache_ttl=0))
    assert verdict.reply.text.endswith("blocked using bl.test")


@pytest_twisted.ensureDeferred
async def test_timing_out_list_counts_as_not_listed(tmp_path, test_dns, resolver):
    """A zone that never answers counts as not listed and is logged; the
    other zones still count, and the answer comes within the resolver's
    bound."""
    listing(test_dns, "bl.test")
    test_dns.set_timeout(dnsbl.query_name("192.0.2.99", "slow.test"))
    plugin = make(tmp_path, resolver, sites=["slow.test*5", "bl.test"], threshold=2)
    sess = session()
    started = reactor.seconds()
    with capturedLogs() as events:
        assert await rcpt(plugin, sess) is CONTINUE
    assert reactor.seconds() - started < 5
    assert sess.notes["dnsbl"]["failed"] == ["slow.test"]
    assert sess.notes["dnsbl"]["score"] == 1
    warnings = [e for e in events if e["log_level"] is LogLevel.warn]
    assert [w["zone"] for w in warnings] == ["slow.test"]


@pytest_twisted.ensureDeferred
async def test_query_timeout_bounds_each_list(tmp_path, test_dns):
    """query_timeout bounds a list even when the resolver would wait
    longer; the timed-out list is counted as not listed."""
    slow_resolver = make_resolver(DNSConfig(servers=test_dns.servers, timeout=30), reactor)
    test_dns.set_timeout(dnsbl.query_name("192.0.2.99", "slow.test"))
    plugin = make(tmp_path, slow_resolver, sites=["slow.test"], query_timeout=0.2)
    started = reactor.seconds()
    with capturedLogs() as events:
        assert await rcpt(plugin) is CONTINUE
    assert reactor.seconds() - started < 5
    assert any(e.get("reason") == "timed out" for e in events)


@pytest_twisted.ensureDeferred
async def test_servfail_counts_as_not_listed_and_is_not_cached(tmp_path, test_dns, resolver):
    """SERVFAIL is not a listing; it is not cached, so the next client
    asks again."""
    name = dnsbl.query_name("192.0.2.99", "bl.test")
    test_dns.set_servfail(name)
    plugin = make(tmp_path, resolver, sites=["bl.test"])
    with capturedLogs():
        assert await rcpt(plugin) is CONTINUE
    test_dns.clear_failure(name)
    listing(test_dns, "bl.test")
    assert (await rcpt(plugin)).action is Action.REJECT


@pytest_twisted.ensureDeferred
async def test_answers_are_cached_until_ttl(tmp_path, test_dns, resolver):
    """A second connection from the same client is answered from the cache
    (listed and not listed alike) until cache_ttl passes."""
    clock = Clock()
    listing(test_dns, "bl.test")
    plugin = make(tmp_path, resolver, clock=clock, sites=["bl.test", "clean.test"], cache_ttl=60)
    assert (await rcpt(plugin, session())).action is Action.REJECT
    asked = len(test_dns.queries)
    assert (await rcpt(plugin, session())).action is Action.REJECT
    assert len(test_dns.queries) == asked
    clock.advance(61)
    test_dns.remove(dnsbl.query_name("192.0.2.99", "bl.test"))
    assert await rcpt(plugin, session()) is CONTINUE
    assert len(test_dns.queries) == asked + 2


@pytest_twisted.ensureDeferred
async def test_shared_store_is_used_and_its_failures_skipped(tmp_path, test_dns, resolver):
    """With context.store the answers go there (so gateways share them);
    a store that fails is skipped and the list asked."""
    store = MemoryStore()
    listing(test_dns, "bl.test")
    plugin = make(tmp_path, resolver, store=store, sites=["bl.test"])
    assert (await rcpt(plugin)).action is Action.REJECT
    assert await store.get("dnsbl:99.2.0.192.bl.test") == b"127.0.0.2"

    class BrokenStore(MemoryStore):
        def get(self, key):
            return defer.fail(StoreError("down"))

        def set(self, key, value, ttl=None):
            return defer.fail(StoreError("down"))

    plugin = make(tmp_path, resolver, store=BrokenStore(), sites=["bl.test"])
    with capturedLogs() as events:
        assert (await rcpt(plugin)).action is Action.REJECT
    assert any("cache" in e.get("log_format", "") for e in events)


@pytest_twisted.ensureDeferred
async def test_lists_are_asked_once_per_session(tmp_path, test_dns, resolver):
    """Every RCPT of a session gets the reply, from one round of queries."""
    listing(test_dns, "bl.test")
    plugin = make(tmp_path, resolver, sites=["bl.test"], cache_ttl=0)
    sess = session()
    for _ in range(3):
        assert (await rcpt(plugin, sess)).action is Action.REJECT
    assert test_dns.queries.count(("99.2.0.192.bl.test", "A")) == 1


@pytest_twisted.ensureDeferred
async def test_trusted_and_authenticated_clients_are_not_looked_up(tmp_path, test_dns, resolver):
    """trusted_networks, session.trusted and authenticated sessions skip
    the lists (recorded as skip) and no query is sent."""
    listing(test_dns, "bl.test")
    plugin = make(tmp_path, resolver, sites=["bl.test"], trusted=["192.0.2.0/24"])
    txn = Transaction(sender=None)
    assert await rcpt(plugin, txn=txn) is CONTINUE
    assert [(r.result, r.detail) for r in txn.results] == [("skip", "trusted")]
    plugin = make(tmp_path, resolver, sites=["bl.test"])
    assert await rcpt(plugin, session(auth_user="alice")) is CONTINUE
    assert await rcpt(plugin, session(trusted=True)) is CONTINUE
    assert test_dns.queries == []


@pytest_twisted.ensureDeferred
async def test_connect_stage_through_the_pipeline(tmp_path, test_dns, resolver):
    """With stage = "connect" the plugin takes part in the connect stage
    only, and the real Pipeline answers the connection with the 554."""
    listing(test_dns, "bl.test")
    plugin = make(tmp_path, resolver, sites=["bl.test"], stage="connect")
    assert IConnectCheck.providedBy(plugin) and not IRcptCheck.providedBy(plugin)
    pipe = Pipeline("mx", [PluginSlot("dnsbl", plugin, timeout=WAIT)], reactor)
    outcome = await pipe.run("connect", session()).addTimeout(WAIT, reactor)
    assert (outcome.action, outcome.reply.code, outcome.plugin) == (Action.REJECT, 554, "dnsbl")
    default = make(tmp_path, resolver, sites=["bl.test"])
    assert IRcptCheck.providedBy(default) and not IConnectCheck.providedBy(default)


def test_warns_when_query_timeout_is_not_below_plugin_timeout(tmp_path):
    """A query_timeout at or above the plugin's timeout is logged at
    start-up: a slow list would then give 451 instead of passing."""
    with capturedLogs() as events:
        make(tmp_path, None, sites=["bl.test"], query_timeout=5, plugin_timeout="2s")
    assert any(e["log_level"] is LogLevel.warn and e.get("timeout") == 2.0 for e in events)
    with capturedLogs() as events:
        make(tmp_path, None, sites=["bl.test"], query_timeout=1)
    assert not [e for e in events if e["log_level"] is LogLevel.warn]
