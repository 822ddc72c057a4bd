"""Tests for L{gateway.spf} (the RFC 7208 evaluator) and L{plugins.spf}
(the SMTP side).

Pure units first: the macro expander and the record parser take text and
give values, no reactor.  Then check_host() and the plugin against the real
test DNS server through a real twisted.names resolver (the whole official
suite is in tests/test_spf_suite.py; here are the behaviours it does not
cover: the default explanation, %{t} and %{r}, cancellation, the plugin's
actions, identities, skips and cache).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task

from gateway.address import Mailbox
from gateway.config import ConfigError, DNSConfig, parse_config
from gateway.dns import make_resolver
from gateway.registry import PluginContext, build_options
from gateway.session import Session, Transaction
from gateway.spf import (
    DEFAULT_EXPLANATION,
    Macro,
    MacroValues,
    SPFResult,
    SPFSyntaxError,
    check_host,
    expand_macros,
    is_spf_record,
    parse_domain_spec,
    parse_macro_string,
    parse_record,
    truncate_domain,
)
from gateway.verdict import Action
from plugins import spf as spf_plugin
from tests.dnsserver import TestDNS
from tests.support import base_config

WAIT = 10

# -- Macros (RFC 7208 §7) -------------------------------------------------------

#: RFC 7208 §7.4's example identity.
RFC_SENDER = "strong-bad@email.example.com"


def rfc_values(ip: str = "192.0.2.3", **kwargs: Any) -> MacroValues:
    """The macro values of the examples in RFC 7208 §7.4."""
    values = dict(sender=RFC_SENDER, domain="email.example.com", ip=ipaddress.ip_address(ip),
                  helo="mx.example.org")
    values.update(kwargs)
    return MacroValues(**values)


def expand(text: str, values: MacroValues | None = None, explanation: bool = False) -> str:
    return expand_macros(parse_macro_string(text, explanation=explanation), values or rfc_values())


@pytest.mark.parametrize("text, expected", [
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
])
def test_macro_examples_of_rfc7208(text, expected):
    """Every IPv4 example of RFC 7208 §7.4 expands as the RFC shows."""
    assert expand(text) == expected


def test_macro_ipv6_example_of_rfc7208():
    """For IPv6, %{i} is the dotted, upper-case nibble form and %{v} is
    "ip6" (RFC 7208 §7.4)."""
    assert expand("%{ir}.%{v}._spf.%{d2}", rfc_values("2001:db8::cb01")) == (
        "1.0.B.C.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.B.D.0.1.0.0.2.ip6._spf.example.com")


def test_macro_escapes_and_url_encoding():
    """%% %_ %- are a percent, a space and "%20"; an upper-case letter
    URL-escapes everything but the unreserved characters."""
    values = rfc_values(sender="~jack&jill=up-a_b3.c@e8.example.com")
    assert expand("a%%b%_c%-d") == "a%b c%20d"
    assert expand("%{L}", values) == "~jack%26jill%3Dup-a_b3.c"
    assert expand("%{S}", values) == "~jack%26jill%3Dup-a_b3.c%40e8.example.com"


def test_macro_multiple_delimiters_and_large_digit():
    """Several delimiters split together; a digit larger than the number
    of parts keeps them all."""
    values = rfc_values(sender="foo-bar+zip+quux@e12.example.com")
    assert expand("%{l2r+-}", values) == "bar.foo"
    assert expand("%{l128}", values) == "foo-bar+zip+quux"
    assert expand("%{d200r}") == "com.example.email"


def test_macro_explanation_letters_c_r_t():
    """c, r and t expand only in explanations: the RFC 5952 address, the
    receiver and the timestamp."""
    values = rfc_values("2001:DB8::CB01", receiver="mx.example.net", timestamp=1234)
    assert expand("%{c} %{r} %{t}", values, explanation=True) == "2001:db8::cb01 mx.example.net 1234"
    with pytest.raises(SPFSyntaxError):
        parse_macro_string("%{c}")


def test_macro_local_part_defaults_to_postmaster():
    """With no local part, %{l} is "postmaster" (RFC 7208 §4.3)."""
    assert expand("%{l}", rfc_values(sender="@example.net")) == "postmaster"


def test_macro_p_and_h():
    """%{p} is the validated name given (or "unknown"), %{h} the HELO name."""
    assert expand("%{p}.%{h}") == "unknown.mx.example.org"
    assert expand("%{p2}", rfc_values(validated_name="mx.example.com")) == "example.com"


@pytest.mark.parametrize("text", [
    "%", "%a", "%(ir)", "foo%.bar", "%{", "%{d", "%{x}", "%{d0}", "%{dr0}", "%{d2x}",
    "a b", "tab\there", "nul\0", "caf\u00e9",
])
def test_macro_syntax_errors(text):
    """A lone or misused %, an unknown letter, a zero digit, a malformed
    transformer, spaces, controls and non-ASCII are syntax errors."""
    with pytest.raises(SPFSyntaxError):
        parse_macro_string(text)


def test_macro_tokens():
    """Parsing gives literal text and Macro values with their transformers."""
    assert parse_macro_string("x.%{L2r-+}.y%%") == (
        "x.", Macro("l", 2, True, "-+", True), ".y%")


@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="%")))
def test_literal_macro_string_expands_to_itself(text):
    """A macro-string without % expands to itself."""
    assert expand(text) == text


@given(st.text(max_size=60))
def test_macro_parser_only_raises_syntax_errors(text):
    """On any text the parser returns tokens or raises SPFSyntaxError."""
    try:
        parse_macro_string(text, explanation=True)
    except SPFSyntaxError:
        pass


# -- Domain-specs and records ------------------------------------------------------


@pytest.mark.parametrize("text", ["example.com", "example.com.", "%{d}", "%{d}.com", "a.xn--zckzah",
                                  "foo:bar/baz.example.com", "_spf.%{d2}", "x%%", ".museum"])
def test_domain_spec_valid_endings(text):
    """A domain-spec ends in a macro-expand or in "." toplabel ["."]."""
    parse_domain_spec(text)


@pytest.mark.parametrize("text", ["", "museum", "museum.", "foo-bar", "example.-com", "111.222.33.44",
                                  "abc.123", "example.com:8080", "%{d}.", "example.com/24", "-all"])
def test_domain_spec_bad_endings(text):
    """Empty, single-label, numeric or malformed top labels are syntax errors."""
    with pytest.raises(SPFSyntaxError):
        parse_domain_spec(text)


def test_truncate_domain():
    """A trailing dot goes; then whole labels go from the left until the
    name fits in 253 characters (RFC 7208 §7.3)."""
    assert truncate_domain("example.com.") == "example.com"
    long = ".".join(["a" * 60] * 5) + ".example.com"
    assert len(truncate_domain(long)) <= 253
    assert truncate_domain(long).endswith(".example.com")
    assert truncate_domain(long).split(".")[0] == "a" * 60


def test_parse_record_terms():
    """Mechanisms keep their order, qualifier, target and CIDR lengths;
    redirect=, exp= and unknown modifiers are kept apart."""
    record = parse_record("v=spf1 +a -mx:%{d2}/24//64 ~ptr ?ip4:192.0.2.0/24 ip6:2001:db8::/32 "
                          "include:_spf.example.com exists:%{i}.bl.example.com -all "
                          "redirect=_spf.example.net exp=explain.%{d} x-note=hello")
    names = [(m.qualifier, m.name) for m in record.mechanisms]
    assert names == [("+", "a"), ("-", "mx"), ("~", "ptr"), ("?", "ip4"), ("+", "ip6"),
                     ("+", "include"), ("+", "exists"), ("-", "all")]
    mx = record.mechanisms[1]
    assert (mx.cidr4, mx.cidr6, mx.text) == (24, 64, "-mx:%{d2}/24//64")
    assert record.mechanisms[0].target is None and (record.mechanisms[0].cidr4, record.mechanisms[0].cidr6) == (32, 128)
    assert record.mechanisms[3].network == ipaddress.ip_network("192.0.2.0/24")
    assert record.mechanisms[4].network == ipaddress.ip_network("2001:db8::/32")
    assert record.redirect == ("_spf.example.net",)
    assert record.explanation == ("explain.", Macro("d"))
    assert record.modifiers == (("x-note", "hello"),)
    assert [m.result for m in record.mechanisms[:4]] == ["pass", "fail", "softfail", "neutral"]


def test_parse_record_is_case_insensitive_and_tolerates_spaces():
    """Version, mechanism and modifier names ignore case; terms may be
    separated by several spaces and followed by trailing ones."""
    record = parse_record("V=SPF1  A  MX:example.com   Redirect=example.net  ")
    assert [m.name for m in record.mechanisms] == ["a", "mx"]
    assert record.redirect == ("example.net",)


def test_parse_record_ip4_host_bits_are_allowed():
    """ip4:192.0.2.9/24 means the /24 network."""
    [mechanism] = parse_record("v=spf1 ip4:192.0.2.9/24").mechanisms
    assert mechanism.network == ipaddress.ip_network("192.0.2.0/24")


@pytest.mark.parametrize("record", [
    "v=spf1 moo", "v=spf1 -all.", "v=spf1 all:x", "v=spf1 all/8", "v=spf1 ptr/0", "v=spf1 ptr:",
    "v=spf1 a/33", "v=spf1 a//129", "v=spf1 a/24/64", "v=spf1 a:", "v=spf1 a/032", "v=spf1 mx:museum",
    "v=spf1 include", "v=spf1 include:", "v=spf1 include:x.example.com/24", "v=spf1 exists",
    "v=spf1 exists:", "v=spf1 ip4", "v=spf1 ip4:1.2.3", "v=spf1 ip4:1.2.3.4/33", "v=spf1 ip4:1.2.3.4/032",
    "v=spf1 ip4:01.2.3.4", "v=spf1 ip4:1.2.3.4//32", "v=spf1 ip4:1.2.3.4:25", "v=spf1 ip4:256.1.1.1",
    "v=spf1 ip6", "v=spf1 ip6::CAFE::BABE", "v=spf1 ip6:::1/129", "v=spf1 ip6:::1//33", "v=spf1 ip6:::1/064",
    "v=spf1 ip6:fe80::1%eth0", "v=spf1 redirect:example.com", "v=spf1 redirect=", "v=spf1 exp=",
    "v=spf1 exp=a.example.com exp=b.example.com", "v=spf1 redirect=a.example.com redirect=a.example.com",
    "v=spf1 1up=foo", "v=spf1 =all", "v=spf1 foo=%abc", "v=spf1 a:%{r}.example.com",
    "v=spf1 a:ctrl.example.com\rptr", "v=spf1 ip4:192.0.2.5\n", "v=spf1 a:\u00e9.example.com",
    "v=spf1\tall", "v=spf10", "spf1 -all",
])
def test_parse_record_syntax_errors(record):
    """Every syntax error anywhere in a record is found before evaluation."""
    with pytest.raises(SPFSyntaxError):
        parse_record(record)


def test_is_spf_record():
    """A record is SPF when it starts with v=spf1 then a space or its end."""
    assert is_spf_record(b"v=spf1 -all") and is_spf_record("V=Spf1") and is_spf_record(b"v=spf1")
    assert not is_spf_record(b"v=spf10") and not is_spf_record(b"v=spf1mx")
    assert not is_spf_record(b" v=spf1 -all") and not is_spf_record(b"\x96")


@given(st.text(max_size=80))
def test_record_parser_only_raises_syntax_errors(tail):
    """On any text the record parser returns a Record or raises SPFSyntaxError."""
    try:
        parse_record("v=spf1 " + tail)
    except SPFSyntaxError:
        pass


def test_result_rejects_unknown_results():
    """SPFResult accepts only the seven RFC 7208 results."""
    assert SPFResult("pass").result == "pass"
    with pytest.raises(ValueError):
        SPFResult("unknown")


# -- check_host() against a real DNS server ---------------------------------------------


@pytest.fixture
def test_dns():
    """A running test DNS server, stopped after the test."""
    server = TestDNS(reactor)
    server.start()
    yield server
    pytest_twisted.blockon(server.stop())


@pytest.fixture
def resolver(test_dns):
    """A resolver as the gateway builds it, asking only the test server."""
    return make_resolver(DNSConfig(servers=test_dns.servers, timeout=1), reactor)


def run(coroutine: Any) -> defer.Deferred:
    """A coroutine as a Deferred that fails after WAIT seconds at most."""
    return defer.Deferred.fromCoroutine(coroutine).addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_check_host_pass_and_fail_with_default_explanation(test_dns, resolver):
    """A listed address passes, naming its mechanism; any other fails with
    the default explanation expanded (it names the domain and address)."""
    test_dns.add("example.org", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    passed = await run(check_host("192.0.2.9", "example.org", "a@example.org", "h.example.org", resolver))
    assert (passed.result, passed.mechanism, passed.explanation) == ("pass", "ip4:192.0.2.0/24", None)
    failed = await run(check_host("198.51.100.1", "example.org", "a@example.org", "h.example.org", resolver))
    assert (failed.result, failed.mechanism) == ("fail", "-all")
    assert failed.explanation == "example.org does not designate 198.51.100.1 as a permitted sender"
    assert DEFAULT_EXPLANATION.startswith("%{o}")


@pytest_twisted.ensureDeferred
async def test_check_host_explanation_uses_clock_and_receiver(test_dns, resolver):
    """exp= text may use %{t} (from the injected clock) and %{r}."""
    test_dns.add("example.org", "TXT", "v=spf1 -all exp=why.example.org")
    test_dns.add("why.example.org", "TXT", "at %{t} %{r} refused %{i}")
    clock = task.Clock()
    clock.advance(1234)
    result = await run(check_host("192.0.2.1", "example.org", "a@example.org", "h", resolver,
                                  receiver="mx.example.net", clock=clock))
    assert result.explanation == "at 1234 mx.example.net refused 192.0.2.1"


@pytest_twisted.ensureDeferred
async def test_check_host_no_default_explanation(test_dns, resolver):
    """default_explanation=None leaves a fail without explanation."""
    test_dns.add("example.org", "TXT", "v=spf1 -all")
    result = await run(check_host("192.0.2.1", "example.org", "a@example.org", "h", resolver,
                                  default_explanation=None))
    assert (result.result, result.explanation) == ("fail", None)


@pytest_twisted.ensureDeferred
async def test_check_host_none_temperror_permerror_details(test_dns, resolver):
    """No record gives none; SERVFAIL gives temperror; a broken record
    gives permerror; each with a detail naming the problem."""
    test_dns.add("norecord.example", "A", "192.0.2.1")
    test_dns.set_servfail("broken-dns.example")
    test_dns.add("broken.example", "TXT", "v=spf1 ip4:1.2.3 -all")
    none = await run(check_host("192.0.2.1", "norecord.example", "a@norecord.example", "h", resolver))
    temp = await run(check_host("192.0.2.1", "broken-dns.example", "a@broken-dns.example", "h", resolver))
    perm = await run(check_host("192.0.2.1", "broken.example", "a@broken.example", "h", resolver))
    assert (none.result, none.detail) == ("none", "norecord.example publishes no SPF record")
    assert temp.result == "temperror" and "SERVFAIL" in temp.detail
    assert perm.result == "permerror" and "ip4:1.2.3" in perm.detail


@pytest_twisted.ensureDeferred
async def test_check_host_ipv4_mapped_and_ipv6(test_dns, resolver):
    """An IPv4-mapped client is IPv4 for ip4 and a; an IPv6 client matches
    AAAA records through a and mx."""
    test_dns.add("example.org", "TXT", "v=spf1 ip4:192.0.2.1 mx -all")
    test_dns.add("example.org", "MX", (10, "mx.example.org"))
    test_dns.add("mx.example.org", "AAAA", "2001:db8::25")
    mapped = await run(check_host("::ffff:192.0.2.1", "example.org", "a@example.org", "h", resolver))
    six = await run(check_host("2001:db8::25", "example.org", "a@example.org", "h", resolver))
    assert (mapped.result, mapped.mechanism) == ("pass", "ip4:192.0.2.1")
    assert (six.result, six.mechanism) == ("pass", "mx")


@pytest_twisted.ensureDeferred
async def test_check_host_helo_identity(test_dns, resolver):
    """The HELO identity is checked as postmaster@helo: %{l} is postmaster."""
    test_dns.add("helo.example.org", "TXT", "v=spf1 exists:%{l}.%{o}.allow.example -all")
    test_dns.add("postmaster.helo.example.org.allow.example", "A", "127.0.0.2")
    result = await run(check_host("192.0.2.1", "helo.example.org", "postmaster@helo.example.org",
                                  "helo.example.org", resolver))
    assert result.result == "pass"


@pytest_twisted.ensureDeferred
async def test_check_host_cancel_stops_waiting(test_dns):
    """Cancelling the evaluation (the pipeline's overall timeout) ends it
    with CancelledError at once, not after the DNS timeout."""
    slow = make_resolver(DNSConfig(servers=test_dns.servers, timeout=30), reactor)
    test_dns.set_timeout("example.org")
    pending = defer.Deferred.fromCoroutine(check_host("192.0.2.1", "example.org", "a@example.org", "h", slow))
    await task.deferLater(reactor, 0.1, lambda: None)
    assert ("example.org", "TXT") in test_dns.queries
    pending.cancel()
    with pytest.raises(defer.CancelledError):
        await pending


@pytest_twisted.ensureDeferred
async def test_check_host_asks_only_for_txt(test_dns, resolver):
    """Only TXT is asked for the policy, never type SPF (RFC 7208 §3.1)."""
    test_dns.add("example.org", "TXT", "v=spf1 ?all")
    await run(check_host("192.0.2.1", "example.org", "a@example.org", "h", resolver))
    assert test_dns.queries == [("example.org", "TXT")]


@pytest_twisted.ensureDeferred
async def test_check_host_rejects_a_bad_ip():
    """The client address must be an IP address: ValueError, not a result."""
    with pytest.raises(ValueError):
        await check_host("not-an-ip", "example.org", "a@example.org", "h", None)


# -- The plugin ----------------------------------------------------------------------------


def make_plugin(tmp_path: Path, resolver: Any, clock: Any = None, trusted: list[str] | None = None,
                **options: Any) -> spf_plugin.SPFCheck:
    """The spf plugin built as the registry builds it, from option values."""
    doc = base_config(tmp_path, server={"trusted_networks": trusted or []})
    config = parse_config(doc, str(tmp_path / "gateway.toml"))
    settings = build_options(spf_plugin.factory, options, config.path)
    context = PluginContext("spf", clock or task.Clock(), resolver, config, lambda f, *a: f(*a))
    return spf_plugin.factory.build(settings.options, context)


def session(peer: str = "192.0.2.1", helo: str = "client.example.net", **kwargs: Any) -> Session:
    return Session(id="t1", listener="mx", peer=peer, helo=helo, **kwargs)


def mail_from(address: str | None) -> tuple[Transaction, Mailbox | None]:
    sender = None
    if address is not None:
        local, _, domain = address.rpartition("@")
        sender = Mailbox(local, domain)
    return Transaction(sender=sender), sender


async def check(plugin: spf_plugin.SPFCheck, sess: Session, address: str | None) -> tuple[Any, Transaction]:
    transaction, sender = mail_from(address)
    verdict = plugin.check_mail(sess, transaction, sender)
    if isinstance(verdict, defer.Deferred):
        verdict = await verdict.addTimeout(WAIT, reactor)
    return verdict, transaction


@pytest.fixture
def policy(test_dns):
    """sender.test permits 192.0.2.1 and softfails 192.0.2.2; helo-fail.test
    permits nobody; broken.test has a syntax error."""
    test_dns.add("sender.test", "TXT", "v=spf1 ip4:192.0.2.1 ~ip4:192.0.2.2 -all")
    test_dns.add("helo-fail.test", "TXT", "v=spf1 -all exp=why.helo-fail.test")
    test_dns.add("why.helo-fail.test", "TXT", "HELO %{h} is not ours")
    test_dns.add("broken.test", "TXT", "v=spf1 ip4:192.0.2 -all")
    return test_dns


def test_options_defaults_and_validation(tmp_path):
    """Defaults follow the issue; an action other than reject, tempfail or
    accept, or a negative TTL, stops start-up with a ConfigError."""
    options = spf_plugin.Options()
    assert (options.fail, options.softfail, options.neutral, options.none,
            options.temperror, options.permerror, options.cache_ttl) == (
        "reject", "accept", "accept", "accept", "tempfail", "reject", 60.0)
    with pytest.raises(ConfigError, match="fail must be one of"):
        build_options(spf_plugin.factory, {"fail": "bounce"}, "gateway.toml")
    with pytest.raises(ConfigError, match="cache_ttl"):
        build_options(spf_plugin.factory, {"cache_ttl": -1}, "gateway.toml")
    with pytest.raises(ConfigError, match="unknown key"):
        build_options(spf_plugin.factory, {"fial": "reject"}, "gateway.toml")


@pytest_twisted.ensureDeferred
async def test_plugin_pass_adds_received_spf_and_records_result(tmp_path, policy, resolver):
    """A pass continues with a Received-SPF field and leaves the result in
    transaction.notes["spf"] and the transaction's results."""
    plugin = make_plugin(tmp_path, resolver)
    verdict, transaction = await check(plugin, session(), "alice@sender.test")
    assert verdict.action is Action.CONTINUE
    [(name, value)] = verdict.add_headers
    assert name == "Received-SPF"
    assert value.startswith("pass (mx.example.test: domain of alice@sender.test designates 192.0.2.1 as permitted sender)")
    assert 'client-ip=192.0.2.1; envelope-from="alice@sender.test"; helo=client.example.net;' in value
    assert "identity=mailfrom; mechanism=\"ip4:192.0.2.1\";" in value
    assert transaction.notes["spf"] == {"result": "pass", "domain": "sender.test",
                                        "identity": "mailfrom", "ip": "192.0.2.1"}
    assert [(r.plugin, r.result) for r in transaction.results] == [("spf", "pass")]


@pytest_twisted.ensureDeferred
async def test_plugin_fail_rejects_with_explanation(tmp_path, policy, resolver):
    """A fail is 550 5.7.23 with the explanation; the header travels with
    the verdict (for mode = "warn")."""
    plugin = make_plugin(tmp_path, resolver)
    verdict, transaction = await check(plugin, session("198.51.100.7"), "alice@sender.test")
    assert verdict.action is Action.REJECT
    assert (verdict.reply.code, verdict.reply.status) == (550, "5.7.23")
    assert verdict.reply.text == "SPF fail: sender.test does not designate 198.51.100.7 as a permitted sender"
    assert verdict.add_headers[0][1].startswith("fail ")
    assert transaction.notes["spf"]["result"] == "fail"


@pytest_twisted.ensureDeferred
async def test_plugin_softfail_accepts_by_default_and_rejects_when_configured(tmp_path, policy, resolver):
    """softfail is accepted (with the header) unless configured "reject"
    (550 5.7.23) or "tempfail" (451 4.7.23)."""
    accepted, _ = await check(make_plugin(tmp_path, resolver), session("192.0.2.2"), "a@sender.test")
    rejected, _ = await check(make_plugin(tmp_path, resolver, softfail="reject"), session("192.0.2.2"), "a@sender.test")
    deferred, _ = await check(make_plugin(tmp_path, resolver, softfail="tempfail"), session("192.0.2.2"), "a@sender.test")
    assert accepted.action is Action.CONTINUE and accepted.add_headers[0][1].startswith("softfail ")
    assert (rejected.action, rejected.reply.code, rejected.reply.status) == (Action.REJECT, 550, "5.7.23")
    assert (deferred.action, deferred.reply.code, deferred.reply.status) == (Action.TEMPFAIL, 451, "4.7.23")


@pytest_twisted.ensureDeferred
async def test_plugin_permerror_rejects_or_tags(tmp_path, policy, resolver):
    """permerror is 550 5.7.24 by default; with permerror = "accept" the
    message goes on, tagged with the problem in Received-SPF."""
    rejected, _ = await check(make_plugin(tmp_path, resolver), session(), "a@broken.test")
    tagged, transaction = await check(make_plugin(tmp_path, resolver, permerror="accept"), session(), "a@broken.test")
    assert (rejected.action, rejected.reply.code, rejected.reply.status) == (Action.REJECT, 550, "5.7.24")
    assert rejected.reply.text.startswith("SPF permanent error for broken.test: ")
    assert tagged.action is Action.CONTINUE
    assert tagged.add_headers[0][1].startswith("permerror (") and "problem=" in tagged.add_headers[0][1]
    assert transaction.notes["spf"]["result"] == "permerror"


@pytest_twisted.ensureDeferred
async def test_plugin_temperror_tempfails_and_is_not_cached(tmp_path, policy, resolver):
    """A DNS failure is 451 4.7.24; it is not cached, so the next try asks again."""
    policy.set_servfail("flaky.test")
    plugin = make_plugin(tmp_path, resolver)
    verdict, _ = await check(plugin, session(), "a@flaky.test")
    assert (verdict.action, verdict.reply.code, verdict.reply.status) == (Action.TEMPFAIL, 451, "4.7.24")
    asked = policy.queries.count(("flaky.test", "TXT"))
    await check(plugin, session(), "a@flaky.test")
    assert policy.queries.count(("flaky.test", "TXT")) == asked + 1


@pytest_twisted.ensureDeferred
async def test_plugin_null_sender_uses_helo_identity(tmp_path, policy, resolver):
    """MAIL FROM:<> is checked as postmaster@<helo>, recorded as the helo
    identity with the HELO name as domain."""
    plugin = make_plugin(tmp_path, resolver)
    verdict, transaction = await check(plugin, session(helo="sender.test"), None)
    assert verdict.action is Action.CONTINUE
    assert transaction.notes["spf"] == {"result": "pass", "domain": "sender.test",
                                        "identity": "helo", "ip": "192.0.2.1"}
    assert 'envelope-from="postmaster@sender.test";' in verdict.add_headers[0][1]
    assert "identity=helo;" in verdict.add_headers[0][1]


@pytest_twisted.ensureDeferred
async def test_plugin_helo_fail_is_conclusive(tmp_path, policy, resolver):
    """With check_helo (default) a HELO fail rejects even a sender whose
    own policy would pass, with the HELO domain's explanation."""
    plugin = make_plugin(tmp_path, resolver)
    verdict, transaction = await check(plugin, session(helo="helo-fail.test"), "alice@sender.test")
    assert (verdict.action, verdict.reply.status) == (Action.REJECT, "5.7.23")
    assert verdict.reply.text == "SPF fail: HELO helo-fail.test is not ours"
    assert transaction.notes["spf"]["identity"] == "helo"


@pytest_twisted.ensureDeferred
async def test_plugin_helo_pass_does_not_authorise_mail_from(tmp_path, policy, resolver):
    """A HELO pass is not conclusive: the MAIL FROM domain still decides.
    With check_helo = false the HELO name is not looked up at all."""
    policy.add("good-helo.test", "TXT", "v=spf1 +all")
    verdict, transaction = await check(make_plugin(tmp_path, resolver), session("198.51.100.7", helo="good-helo.test"),
                                       "alice@sender.test")
    assert verdict.action is Action.REJECT and transaction.notes["spf"]["identity"] == "mailfrom"
    policy.queries.clear()
    plugin = make_plugin(tmp_path, resolver, check_helo=False)
    await check(plugin, session(helo="helo-fail.test"), "alice@sender.test")
    assert ("helo-fail.test", "TXT") not in policy.queries


@pytest.mark.parametrize("kwargs, trusted, why", [
    ({"auth_user": "alice"}, None, "authenticated"),
    ({"trusted": True}, None, "trusted"),
    ({}, ["198.51.100.0/24"], "trusted"),
    ({"peer": "::ffff:198.51.100.7"}, ["198.51.100.0/24"], "trusted"),
])
def test_plugin_skips_authenticated_and_trusted_sessions(tmp_path, kwargs, trusted, why):
    """Authenticated sessions, sessions marked trusted and clients in
    trusted_networks are not checked: CONTINUE at once, recorded as skip,
    no DNS (the resolver is not even there)."""
    plugin = make_plugin(tmp_path, None, trusted=trusted)
    sess = session(**{"peer": "198.51.100.7", **kwargs})
    transaction, sender = mail_from("alice@sender.test")
    verdict = plugin.check_mail(sess, transaction, sender)
    assert verdict.action is Action.CONTINUE and not verdict.add_headers
    assert [(r.plugin, r.result, r.detail) for r in transaction.results] == [("spf", "skip", why)]
    assert "spf" not in transaction.notes


@pytest_twisted.ensureDeferred
async def test_plugin_cache_reuses_results_for_cache_ttl(tmp_path, policy, resolver):
    """A result is reused for cache_ttl seconds of the injected clock, then
    looked up again; cache_ttl = 0 turns the cache off."""
    clock = task.Clock()
    plugin = make_plugin(tmp_path, resolver, clock, check_helo=False)
    await check(plugin, session(), "alice@sender.test")
    await check(plugin, session(), "alice@sender.test")
    assert policy.queries.count(("sender.test", "TXT")) == 1
    clock.advance(61)
    await check(plugin, session(), "alice@sender.test")
    assert policy.queries.count(("sender.test", "TXT")) == 2
    uncached = make_plugin(tmp_path, resolver, clock, check_helo=False, cache_ttl=0)
    await check(uncached, session(), "alice@sender.test")
    await check(uncached, session(), "alice@sender.test")
    assert policy.queries.count(("sender.test", "TXT")) == 4


@pytest_twisted.ensureDeferred
async def test_plugin_cache_is_bounded(tmp_path, policy, resolver):
    """The cache never holds more than cache_size results."""
    plugin = make_plugin(tmp_path, resolver, check_helo=False, cache_size=2)
    for local in ("a", "b", "c"):
        await check(plugin, session(), f"{local}@sender.test")
    assert len(plugin._cache) == 2


def test_received_spf_quotes_and_cleans_values():
    """Received-SPF values that are not dot-atoms are quoted, and comments
    cannot be broken by parentheses or control characters."""
    result = SPFResult("permerror", mechanism=None, domain="x.test", detail='bad "term" (\r\n)')
    value = spf_plugin.received_spf(result, identity="mailfrom", ip="2001:db8::1",
                                    sender="a b@x.test", helo="[192.0.2.1]", receiver="mx.example.test")
    first, second = value.split("\r\n\t")
    assert first == "permerror (mx.example.test: domain of a b@x.test has a broken SPF policy: bad \"term\" [??])"
    assert second == ('client-ip="2001:db8::1"; envelope-from="a b@x.test"; helo="[192.0.2.1]"; '
                      'receiver=mx.example.test; identity=mailfrom; problem="bad \\"term\\" (??)";')


@pytest_twisted.ensureDeferred
async def test_registry_builds_spf_on_a_listener_and_warn_mode_keeps_the_header(tmp_path, policy, resolver):
    """The registry finds "spf", verifies it against IMailCheck and puts it
    in the mail stage; with mode = "warn" a fail is not refused but the
    Received-SPF field is still added."""
    from gateway.registry import PluginRegistry

    doc = base_config(tmp_path)
    doc["listener"][0]["plugins"] = ["relay_guard", "spf"]
    doc["plugins"] = {"spf": {"mode": "warn", "timeout": 5}}
    config = parse_config(doc, str(tmp_path / "gateway.toml"))
    pipeline = PluginRegistry(config).build_pipeline(config.listeners[0], reactor, resolver, lambda f, *a: f(*a))
    assert pipeline.plugins_for("mail") == ("spf",)
    transaction, sender = mail_from("alice@sender.test")
    outcome = await defer.maybeDeferred(pipeline.run, "mail", session("198.51.100.7"), transaction, sender)
    assert outcome.action is Action.CONTINUE
    [(name, value)] = outcome.add_headers
    assert name == "Received-SPF" and value.startswith("fail ")
