"""Tests for L{gateway.mtasts}: the MTA-STS parsers, the policy cache, the
HTTPS fetcher and the RFC 8461 §5 discovery logic.

The parsers are pure.  The fetcher talks real TLS to a twisted.web server
on 127.0.0.1 (L{tests.httpsserver}) whose certificates come from a CA made
here (L{tests.certs}); the resolver asks a real authoritative DNS server
(L{tests.dnsserver}).  "Now" for policy expiry is a L{Clock}; every real
wait is bounded by L{bounded} or a component's own short timeout.
"""

from __future__ import annotations

import json
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from gateway.config import DNSConfig
from gateway.dns import make_resolver
from gateway.mtasts import (
    MAX_AGE_LIMIT,
    POLICY_PATH,
    CachedPolicy,
    FilePolicyCache,
    IPolicyCache,
    MemoryPolicyCache,
    Mode,
    Policy,
    PolicyError,
    PolicyFetcher,
    PolicyResolver,
    check_domain,
    lookup_txt,
    normalize_domain,
    parse_policy,
    parse_txt,
    policy_url,
)
from tests.certs import TestCA, self_signed
from tests.dnsserver import TestDNS
from tests.httpsserver import HTTPSServer, Route

WAIT = 10
DOMAIN = "example.test"
HOST = "mta-sts.example.test"
GOOD_POLICY = (b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmx: *.mail.example.test\r\n"
               b"max_age: 86400\r\n")
START = 1_700_000_000.0


def bounded(coro: Coroutine[Any, Any, Any], seconds: float = WAIT) -> Deferred[Any]:
    """Run C{coro} as a Deferred that fails after C{seconds} at most."""
    return Deferred.fromCoroutine(coro).addTimeout(seconds, reactor)


async def failure_of(coro: Coroutine[Any, Any, Any], seconds: float = WAIT) -> PolicyError:
    """Await C{coro} (bounded) and return the L{PolicyError} it raised."""
    with pytest.raises(PolicyError) as info:
        await bounded(coro, seconds)
    return info.value


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> TestCA:
    """One test CA for the module."""
    return TestCA()


@pytest.fixture
def https(ca: TestCA):
    """A running HTTPS server with a good certificate for mta-sts.example.test
    serving GOOD_POLICY at the well-known path."""
    server = HTTPSServer(ca.issue(HOST))
    server.start()
    server.serve(POLICY_PATH, GOOD_POLICY)
    yield server
    pytest_twisted.blockon(server.stop())


@pytest.fixture
def fetcher(https: HTTPSServer, ca: TestCA) -> PolicyFetcher:
    """A fetcher trusting only the test CA, connecting to the test server."""
    return PolicyFetcher(reactor, reactor, trust_root=ca.trust_root(), timeout=5,
                         port=https.port, host_override={HOST: "127.0.0.1"})


@pytest.fixture
def test_dns():
    """A running test DNS server, stopped after the test."""
    server = TestDNS()
    server.start()
    yield server
    pytest_twisted.blockon(server.stop())


@pytest.fixture
def dns_resolver(test_dns: TestDNS):
    """A twisted.names resolver asking only the test DNS server."""
    return make_resolver(DNSConfig(servers=test_dns.servers, timeout=2), reactor)


@pytest.fixture
def clock() -> Clock:
    """The resolver's "now", starting at START."""
    c = Clock()
    c.advance(START)
    return c


@pytest.fixture
def cache(tmp_path: Path) -> FilePolicyCache:
    """A file cache in a fresh directory."""
    return FilePolicyCache(tmp_path / "mta-sts")


@pytest.fixture
def errors() -> list[tuple[str, PolicyError]]:
    """Collects on_fetch_error calls."""
    return []


@pytest.fixture
def policies(dns_resolver, fetcher, cache, clock, errors) -> PolicyResolver:
    """The resolver under test, over the real DNS and HTTPS servers."""
    return PolicyResolver(dns_resolver, fetcher, cache, clock,
                          on_fetch_error=lambda domain, error: errors.append((domain, error)))


def publish(test_dns: TestDNS, policy_id: str, domain: str = DOMAIN) -> None:
    """Publish (or replace) the _mta-sts TXT record of C{domain}."""
    test_dns.remove(f"_mta-sts.{domain}")
    test_dns.add(f"_mta-sts.{domain}", "TXT", f"v=STSv1; id={policy_id};")


def cached_entry(policy_id: str = "old1", *, mode: Mode = Mode.ENFORCE, fetched_at: float = START - 100,
                 max_age: int = 86400) -> CachedPolicy:
    """A cache entry for DOMAIN, fetched at C{fetched_at}."""
    policy = Policy("STSv1", mode, ("cached-mx.example.test",), max_age)
    return CachedPolicy(DOMAIN, policy_id, policy, fetched_at, fetched_at + max_age)


# -- parse_txt -------------------------------------------------------------------


@pytest.mark.parametrize("record, expected", [
    ("v=STSv1; id=20160831085700Z;", "20160831085700Z"),
    ("v=STSv1; id=abc123", "abc123"),
    ("v=STSv1;id=abc123;", "abc123"),
    ("v=STSv1 ;  id=abc123 ; ", "abc123"),
    ("v=STSv1; id=" + "a" * 32, "a" * 32),
    ("v=STSv1; id=abc; ext_1=some-value;", "abc"),
    ("v=STSv1; ext=x; id=abc", "abc"),
])
def test_parse_txt_valid_records(record: str, expected: str):
    """A well-formed STSv1 record yields its id; whitespace around ';', the
    trailing ';' and extension fields are allowed (RFC 8461 §3.1)."""
    assert parse_txt([record]) == expected


def test_parse_txt_ignores_records_not_starting_with_stsv1():
    """Other TXT records at the name (SPF, verification tokens, a later
    version) are discarded before counting."""
    records = ["v=spf1 -all", "google-site-verification=xyz", "v=STSv10; id=zzz", "v=STSv1; id=good1"]
    assert parse_txt(records) == "good1"


@pytest.mark.parametrize("records", [
    [],
    ["v=spf1 -all"],
    ["v=STSv1; id=one", "v=STSv1; id=two"],
    ["v=STSv1; id=same", "v=STSv1; id=same"],
    ["v=STSv1"],
    ["v=STSv1;"],
    ["v=STSv1; id="],
    ["v=STSv1; id=" + "a" * 33],
    ["v=STSv1; id=abc-def"],
    ["v=STSv1; id=abc def"],
    ["v=STSv1; ;id=abc"],
    ["v=STSv1; id=abc; broken"],
    ["v=STSv1; id=abc; x=a;b"],
    ["v=stsv1; id=abc"],
    [" v=STSv1; id=abc"],
])
def test_parse_txt_no_policy_when_not_exactly_one_valid_record(records: list[str]):
    """No STSv1 record, more than one, or a malformed one (missing or
    invalid id, stray text, wrong case) means no policy: None."""
    assert parse_txt(records) is None


# -- parse_policy ---------------------------------------------------------------


def test_parse_policy_crlf():
    """The RFC's example policy with CRLF line ends parses completely."""
    policy = parse_policy(GOOD_POLICY)
    assert policy == Policy("STSv1", Mode.ENFORCE, ("mx1.example.test", "*.mail.example.test"), 86400)


def test_parse_policy_lf_unknown_keys_and_repeats():
    """LF line ends work; unknown keys are ignored; a repeated key other
    than mx keeps its first value; blank lines and spaces after the colon
    are tolerated; MX patterns are lower-cased without trailing dot."""
    body = (b"version: STSv1\nmode:testing\nfuture_key: anything at all\n\nmx:  MX1.Example.TEST.\t\n"
            b"mode: enforce\nmax_age: 604800\nmax_age: 1\n")
    policy = parse_policy(body)
    assert policy.mode is Mode.TESTING
    assert policy.mx == ("mx1.example.test",)
    assert policy.max_age == 604800


def test_parse_policy_mode_none_needs_no_mx():
    """A policy in mode none (a withdrawn policy) is valid without mx."""
    policy = parse_policy(b"version: STSv1\nmode: none\nmax_age: 86400\n")
    assert policy.mode is Mode.NONE and policy.mx == ()


def test_parse_policy_caps_max_age():
    """max_age above one year (31557600 s) is capped, 10 digits allowed."""
    body = b"version: STSv1\nmode: enforce\nmx: mx.example.test\nmax_age: 9999999999\n"
    assert parse_policy(body).max_age == MAX_AGE_LIMIT
    assert Policy("STSv1", Mode.ENFORCE, ("a.test",), MAX_AGE_LIMIT + 1).max_age == MAX_AGE_LIMIT


@pytest.mark.parametrize("body, reason", [
    (b"mode: enforce\nmx: a.test\nmax_age: 1\n", "no version"),
    (b"version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n", "unsupported version"),
    (b"version: stsv1\nmode: enforce\nmx: a.test\nmax_age: 1\n", "unsupported version"),
    (b"version: STSv1\nmx: a.test\nmax_age: 1\n", "no mode"),
    (b"version: STSv1\nmode: Enforce\nmx: a.test\nmax_age: 1\n", "invalid mode"),
    (b"version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n", "invalid mode"),
    (b"version: STSv1\nmode: enforce\nmx: a.test\n", "no max_age"),
    (b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n", "invalid max_age"),
    (b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1d\n", "invalid max_age"),
    (b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 12345678901\n", "invalid max_age"),
    (b"version: STSv1\nmode: enforce\nmax_age: 86400\n", "no mx"),
    (b"version: STSv1\nmode: testing\nmax_age: 86400\n", "no mx"),
    (b"version: STSv1\nmode: enforce\nmx: *.*.a.test\nmax_age: 1\n", "not a domain name"),
    (b"version: STSv1\nmode: enforce\nmx: a..test\nmax_age: 1\n", "not a domain name"),
    (b"version: STSv1\nmode: enforce\nmx: mx.*.test\nmax_age: 1\n", "not a domain name"),
    (b"version: STSv1\nmode: enforce\nmx: a.test:25\nmax_age: 1\n", "not a domain name"),
    (b"version: STSv1\nthis line has no colon\nmode: enforce\nmx: a.test\nmax_age: 1\n", "not a 'key: value'"),
    (b"version: STSv1\nmode enforce: x\nmax_age: 1\n", "invalid key"),
    (b"version: STSv1\nmode: enforce\nmx:\nmax_age: 1\n", "empty value"),
    (b"version: STSv1\xff\nmode: enforce\nmx: a.test\nmax_age: 1\n", "not UTF-8"),
    (b"<html><body>Welcome</body></html>", "not a 'key: value'"),
    (b"", "no version"),
])
def test_parse_policy_refuses_malformed(body: bytes, reason: str):
    """Each required field, its syntax and the line syntax are checked, and
    the PolicyError says what is wrong (kind parse, reported to TLS-RPT as
    sts-policy-invalid)."""
    with pytest.raises(PolicyError) as info:
        parse_policy(body)
    assert reason in str(info.value)
    assert info.value.kind == "parse"
    assert info.value.result_type == "sts-policy-invalid"


# -- Policy.matches -----------------------------------------------------------


@pytest.mark.parametrize("host, expected", [
    ("mx1.example.test", True),
    ("MX1.Example.Test", True),
    ("mx1.example.test.", True),
    ("a.mail.example.test", True),
    ("A.MAIL.example.test.", True),
    ("mail.example.test", False),          # the wildcard's own base
    ("a.b.mail.example.test", False),      # two extra labels
    ("xmail.example.test", False),         # suffix without a label boundary
    ("mx2.example.test", False),
    ("example.test", False),
    ("", False),
])
def test_policy_matches_exact_and_one_label_wildcard(host: str, expected: bool):
    """RFC 8461 §4.1: an exact name matches case-insensitively without the
    trailing dot; "*.mail.example.test" matches exactly one more label on
    the left, never the base name nor two labels."""
    policy = Policy("STSv1", Mode.ENFORCE, ("mx1.example.test", "*.mail.example.test"), 86400)
    assert policy.matches(host) is expected


def test_policy_wildcard_example_com():
    """The brief's case: "*.example.com" matches "mx.example.com" only."""
    policy = Policy("STSv1", Mode.ENFORCE, ("*.example.com",), 60)
    assert policy.matches("mx.example.com")
    assert not policy.matches("example.com")
    assert not policy.matches("a.b.example.com")


def test_policy_round_trips_as_dict():
    """to_dict/from_dict are inverse (cache files, gatewayctl)."""
    policy = parse_policy(GOOD_POLICY)
    assert Policy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy


def test_normalize_domain_and_url():
    """Domains become lower-case A-labels without trailing dot; address
    literals and junk are refused before they reach a URL or a file name;
    the URL shows the port only when it is not 443."""
    assert normalize_domain("Example.TEST.") == "example.test"
    assert normalize_domain("bücher.example") == "xn--bcher-kva.example"
    for bad in ("[192.0.2.1]", "example.test/../x", "a b.test", "", "-a.test", "../etc"):
        with pytest.raises(PolicyError):
            normalize_domain(bad)
    assert policy_url("Example.Test") == "https://mta-sts.example.test/.well-known/mta-sts.txt"
    assert policy_url("example.test", 8443) == "https://mta-sts.example.test:8443/.well-known/mta-sts.txt"


# -- FilePolicyCache -----------------------------------------------------------


def test_file_cache_provides_interface(cache: FilePolicyCache):
    """Both caches provide IPolicyCache."""
    assert verifyObject(IPolicyCache, cache)
    assert verifyObject(IPolicyCache, MemoryPolicyCache())


def test_file_cache_survives_new_instance(tmp_path: Path):
    """What one instance put, a new instance on the same directory (a
    restarted gateway) gets back unchanged; delete is persistent too."""
    first = FilePolicyCache(tmp_path / "c")
    entry = cached_entry("abc")
    other = CachedPolicy("other.test", "x1", parse_policy(GOOD_POLICY), 5.0, 10.0)
    first.put(entry)
    first.put(other)
    second = FilePolicyCache(tmp_path / "c")
    assert second.get(DOMAIN) == entry
    assert sorted(e.domain for e in second.all()) == [DOMAIN, "other.test"]
    second.delete("other.test")
    second.delete("never-cached.test")
    assert FilePolicyCache(tmp_path / "c").get("other.test") is None


def test_file_cache_writes_atomically(tmp_path: Path):
    """put replaces <domain>.json through a temporary file: no temporary
    file remains, the JSON is complete, and a leftover temporary file from
    a crash is removed at start-up."""
    directory = tmp_path / "c"
    cache = FilePolicyCache(directory)
    cache.put(cached_entry("v1"))
    cache.put(cached_entry("v2"))
    assert sorted(p.name for p in directory.iterdir()) == ["example.test.json"]
    assert json.loads((directory / "example.test.json").read_text())["policy_id"] == "v2"
    (directory / ".example.test.abcd.tmp").write_text("{half")
    FilePolicyCache(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["example.test.json"]


def test_file_cache_skips_corrupt_files(tmp_path: Path):
    """A truncated or foreign file is skipped (and left for the admin), the
    others load."""
    directory = tmp_path / "c"
    FilePolicyCache(directory).put(cached_entry("good"))
    (directory / "broken.test.json").write_text('{"domain": "broken.te')
    misnamed = cached_entry("x").to_dict()
    (directory / "misnamed.test.json").write_text(json.dumps(misnamed))
    cache = FilePolicyCache(directory)
    assert [e.domain for e in cache.all()] == [DOMAIN]
    assert (directory / "broken.test.json").exists()


def test_file_cache_refuses_unsafe_domain(cache: FilePolicyCache):
    """A domain that is not a normalized host name never becomes a path."""
    for bad in ("../escape", "Example.TEST", "a/b"):
        entry = CachedPolicy(bad, "x", parse_policy(GOOD_POLICY), 0.0, 1.0)
        with pytest.raises(ValueError):
            cache.put(entry)


# -- PolicyFetcher ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fetch_good_policy(https: HTTPSServer, fetcher: PolicyFetcher):
    """A good policy over verified TLS is fetched with one GET of the
    well-known path, SNI and Host naming mta-sts.<domain>."""
    policy = await bounded(fetcher.fetch(DOMAIN))
    assert policy == parse_policy(GOOD_POLICY)
    assert [(r.method, r.path, r.host) for r in https.requests] == [("GET", POLICY_PATH, f"{HOST}:{https.port}")]
    assert https.server_names == [HOST]


@pytest_twisted.ensureDeferred
async def test_fetch_trust_root_from_pem_path(https: HTTPSServer, ca: TestCA, tmp_path: Path):
    """trust_root may be a CA PEM file path (the config's form)."""
    fetcher = PolicyFetcher(reactor, reactor, trust_root=str(ca.write(tmp_path / "ca.pem")), timeout=5,
                            port=https.port, host_override={HOST: "127.0.0.1"})
    assert (await bounded(fetcher.fetch(DOMAIN))).mode is Mode.ENFORCE


@pytest_twisted.ensureDeferred
async def test_fetch_accepts_content_type_parameters(https: HTTPSServer, fetcher: PolicyFetcher):
    """Content-Type text/plain with parameters (charset) is accepted."""
    https.serve(POLICY_PATH, GOOD_POLICY, content_type="Text/Plain; charset=utf-8")
    assert (await bounded(fetcher.fetch(DOMAIN))).mx[0] == "mx1.example.test"


@pytest.mark.parametrize("make_cert", [
    pytest.param(lambda ca: ca.wrong_name(HOST), id="wrong-name"),
    pytest.param(lambda ca: ca.expired(HOST), id="expired"),
    pytest.param(lambda ca: ca.not_yet_valid(HOST), id="not-yet-valid"),
    pytest.param(lambda ca: self_signed(HOST), id="self-signed"),
    pytest.param(lambda ca: TestCA("Another CA").issue(HOST), id="unknown-ca"),
])
@pytest_twisted.ensureDeferred
async def test_fetch_refuses_bad_certificate(https: HTTPSServer, fetcher: PolicyFetcher, ca: TestCA, make_cert):
    """A certificate not valid for mta-sts.<domain> under the trust root is
    refused before any request is sent (kind tls, TLS-RPT
    sts-webpki-invalid)."""
    https.use(make_cert(ca))
    error = await failure_of(fetcher.fetch(DOMAIN))
    assert error.kind == "tls", error
    assert error.result_type == "sts-webpki-invalid"
    assert https.requests == []


@pytest_twisted.ensureDeferred
async def test_fetch_refuses_redirect(https: HTTPSServer, fetcher: PolicyFetcher):
    """A 3xx is a failure; the Location is not followed."""
    https.routes[POLICY_PATH] = Route(redirect=f"https://{HOST}:{https.port}/elsewhere.txt")
    https.serve("/elsewhere.txt", GOOD_POLICY)
    error = await failure_of(fetcher.fetch(DOMAIN))
    assert error.kind == "redirect"
    assert "elsewhere.txt" in str(error)
    assert https.paths() == [POLICY_PATH]


@pytest.mark.parametrize("status", [404, 500, 204, 201])
@pytest_twisted.ensureDeferred
async def test_fetch_refuses_non_200(https: HTTPSServer, fetcher: PolicyFetcher, status: int):
    """Any status but 200 is a failure, even with a valid policy body."""
    https.serve(POLICY_PATH, GOOD_POLICY, status=status)
    error = await failure_of(fetcher.fetch(DOMAIN))
    assert error.kind == "http-status"
    assert str(status) in str(error)


@pytest.mark.parametrize("content_type", ["text/html", "application/octet-stream", None, "text/plainx"])
@pytest_twisted.ensureDeferred
async def test_fetch_refuses_wrong_content_type(https: HTTPSServer, fetcher: PolicyFetcher, content_type):
    """Content-Type must be text/plain (RFC 8461 §3.3); a missing one
    counts as wrong."""
    https.serve(POLICY_PATH, GOOD_POLICY, content_type=content_type)
    error = await failure_of(fetcher.fetch(DOMAIN))
    assert error.kind == "content-type"


@pytest_twisted.ensureDeferred
async def test_fetch_refuses_announced_oversized_body(https: HTTPSServer, fetcher: PolicyFetcher):
    """A Content-Length over max_size is refused without reading the body."""
    https.serve(POLICY_PATH, GOOD_POLICY + b"x: " + b"y" * 70000 + b"\n")
    error = await failure_of(fetcher.fetch(DOMAIN))
    assert error.kind == "too-large"


@pytest_twisted.ensureDeferred
async def test_fetch_refuses_streamed_oversized_body(https: HTTPSServer, fetcher: PolicyFetcher):
    """A chunked body without Content-Length is counted and cut off as soon
    as it passes max_size."""
    https.routes[POLICY_PATH] = Route(body=GOOD_POLICY + b"x: ", stream=4 * 1024 * 1024)
    error = await failure_of(fetcher.fetch(DOMAIN))
    assert error.kind == "too-large"


@pytest_twisted.ensureDeferred
async def test_fetch_accepts_streamed_body_under_limit(https: HTTPSServer, fetcher: PolicyFetcher):
    """A chunked body under max_size is read to the end and parsed."""
    https.routes[POLICY_PATH] = Route(body=GOOD_POLICY + b"comment: ", stream=1000)
    assert (await bounded(fetcher.fetch(DOMAIN))).max_age == 86400


@pytest_twisted.ensureDeferred
async def test_fetch_refuses_malformed_policy(https: HTTPSServer, fetcher: PolicyFetcher):
    """A 200 text/plain body that is not a valid policy is refused (kind
    parse, TLS-RPT sts-policy-invalid)."""
    https.serve(POLICY_PATH, b"version: STSv1\nmode: enforce\nmax_age: 86400\n")
    error = await failure_of(fetcher.fetch(DOMAIN))
    assert error.kind == "parse"
    assert error.result_type == "sts-policy-invalid"
    assert "no mx" in str(error)


@pytest_twisted.ensureDeferred
async def test_fetch_times_out(https: HTTPSServer, ca: TestCA):
    """A server that never answers fails the fetch after `timeout` on the
    injected clock, and the connection is closed."""
    https.routes[POLICY_PATH] = Route(hang=True)
    clock = Clock()
    fetcher = PolicyFetcher(reactor, clock, trust_root=ca.trust_root(), timeout=30,
                            port=https.port, host_override={HOST: "127.0.0.1"})
    pending = bounded(fetcher.fetch(DOMAIN))
    await https.wait_for_requests(1, timeout=WAIT)
    assert not pending.called
    clock.advance(29)
    assert not pending.called
    clock.advance(1)
    with pytest.raises(PolicyError) as info:
        await pending
    assert info.value.kind == "timeout"
    assert clock.getDelayedCalls() == []
    await https.hung[0].addTimeout(WAIT, reactor)  # the client closed the connection


@pytest_twisted.ensureDeferred
async def test_fetch_connection_refused(ca: TestCA):
    """Nothing listening is a fetch error of kind connect."""
    server = HTTPSServer(ca.issue(HOST))
    port = server.start()
    await server.stop()
    fetcher = PolicyFetcher(reactor, reactor, trust_root=ca.trust_root(), timeout=5,
                            port=port, host_override={HOST: "127.0.0.1"})
    error = await failure_of(fetcher.fetch(DOMAIN))
    assert error.kind == "connect"
    assert error.result_type == "sts-policy-fetch-error"


@pytest_twisted.ensureDeferred
async def test_fetch_refuses_invalid_domain(fetcher: PolicyFetcher):
    """An address literal has no policy host; no connection is tried."""
    error = await failure_of(fetcher.fetch("[192.0.2.1]"))
    assert error.kind == "domain"


# -- lookup_txt ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_lookup_txt_joins_strings_and_follows_cname(test_dns: TestDNS, dns_resolver):
    """Character-strings of one record are concatenated; a CNAME at
    _mta-sts is followed, whether or not the server chased it."""
    test_dns.add("_mta-sts.example.test", "TXT", ["v=STSv1; ", "id=split1;"])
    assert await bounded(lookup_txt(dns_resolver, "_mta-sts.example.test")) == ["v=STSv1; id=split1;"]
    test_dns.add("_mta-sts.alias.test", "CNAME", "_mta-sts.example.test")
    assert await bounded(lookup_txt(dns_resolver, "_mta-sts.alias.test")) == ["v=STSv1; id=split1;"]
    test_dns.chase_cnames = False
    assert await bounded(lookup_txt(dns_resolver, "_mta-sts.alias.test")) == ["v=STSv1; id=split1;"]


# -- PolicyResolver ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_resolver_fetches_and_caches(policies: PolicyResolver, test_dns: TestDNS, https: HTTPSServer,
                                           cache: FilePolicyCache):
    """With a TXT record and nothing cached, the policy is fetched and cached
    with expires_at = now + max_age."""
    publish(test_dns, "id1")
    entry, reason = await bounded(policies.policy_for("Example.Test."))
    assert reason == "fetched"
    assert entry == CachedPolicy(DOMAIN, "id1", parse_policy(GOOD_POLICY), START, START + 86400)
    assert cache.get(DOMAIN) == entry
    assert len(https.requests) == 1


@pytest_twisted.ensureDeferred
async def test_resolver_same_id_uses_cache(policies: PolicyResolver, test_dns: TestDNS, https: HTTPSServer,
                                           clock: Clock):
    """An unchanged TXT id means the cached policy applies: no HTTPS."""
    publish(test_dns, "id1")
    await bounded(policies.policy_for(DOMAIN))
    clock.advance(3600)
    entry, reason = await bounded(policies.policy_for(DOMAIN))
    assert reason == "cached, id unchanged"
    assert entry.policy_id == "id1"
    assert len(https.requests) == 1


@pytest_twisted.ensureDeferred
async def test_resolver_id_change_refetches(policies: PolicyResolver, test_dns: TestDNS, https: HTTPSServer,
                                            cache: FilePolicyCache, clock: Clock):
    """A new TXT id means a new policy: it is fetched again and replaces
    the cached one."""
    publish(test_dns, "id1")
    await bounded(policies.policy_for(DOMAIN))
    publish(test_dns, "id2")
    https.serve(POLICY_PATH, GOOD_POLICY.replace(b"mode: enforce", b"mode: testing"))
    clock.advance(60)
    entry, reason = await bounded(policies.policy_for(DOMAIN))
    assert reason == "fetched"
    assert (entry.policy_id, entry.policy.mode, entry.fetched_at) == ("id2", Mode.TESTING, START + 60)
    assert len(https.requests) == 2
    assert cache.get(DOMAIN).policy_id == "id2"


@pytest_twisted.ensureDeferred
async def test_resolver_policy_host_down_keeps_cached(policies: PolicyResolver, test_dns: TestDNS,
                                                      https: HTTPSServer, cache: FilePolicyCache, errors):
    """When the TXT id changed but the policy host is down, the valid cached
    policy still applies (RFC 8461 §5.1), and the failure is reported."""
    cache.put(cached_entry("old1"))
    publish(test_dns, "new2")
    await https.stop()
    entry, reason = await bounded(policies.policy_for(DOMAIN))
    assert entry == cached_entry("old1")
    assert reason.startswith("cached, fetch failed:")
    assert [(d, e.kind, e.result_type) for d, e in errors] == [(DOMAIN, "connect", "sts-policy-fetch-error")]


@pytest_twisted.ensureDeferred
async def test_resolver_failed_fetch_never_downgrades_enforce(policies: PolicyResolver, test_dns: TestDNS,
                                                              https: HTTPSServer, cache: FilePolicyCache, errors,
                                                              clock: Clock):
    """A new id whose policy is invalid (here: served with a redirect, then
    malformed) leaves the cached enforce policy in force and cached."""
    cache.put(cached_entry("old1"))
    publish(test_dns, "new2")
    https.routes[POLICY_PATH] = Route(redirect="https://attacker.test/")
    entry, _ = await bounded(policies.policy_for(DOMAIN))
    assert entry.policy.mode is Mode.ENFORCE and entry.policy_id == "old1"
    clock.advance(policies.fetch_retry)
    https.serve(POLICY_PATH, b"version: STSv1\nmode: none\n")
    entry, _ = await bounded(policies.policy_for(DOMAIN))
    assert entry.policy.mode is Mode.ENFORCE and entry.policy_id == "old1"
    assert cache.get(DOMAIN).policy_id == "old1"
    assert [e.kind for _, e in errors] == ["redirect", "parse"]


@pytest_twisted.ensureDeferred
async def test_resolver_rate_limits_failed_fetches(policies: PolicyResolver, test_dns: TestDNS,
                                                   https: HTTPSServer, clock: Clock, errors):
    """After a failed fetch the same id is not fetched again for
    fetch_retry seconds (one timeout per dead host, not one per delivery);
    a new id, or the end of the wait, fetches again."""
    publish(test_dns, "id1")
    https.serve(POLICY_PATH, b"", status=503)
    await bounded(policies.policy_for(DOMAIN))
    clock.advance(policies.fetch_retry - 1)
    entry, reason = await bounded(policies.policy_for(DOMAIN))
    assert entry is None and reason.startswith("no policy: fetch failed:") and "retry in 1s" in reason
    assert len(https.requests) == 1 and len(errors) == 1
    publish(test_dns, "id2")
    await bounded(policies.policy_for(DOMAIN))
    assert len(https.requests) == 2
    clock.advance(policies.fetch_retry)
    https.serve(POLICY_PATH, GOOD_POLICY)
    entry, reason = await bounded(policies.policy_for(DOMAIN))
    assert reason == "fetched" and len(https.requests) == 3


@pytest_twisted.ensureDeferred
async def test_resolver_fetch_failure_without_cache_is_no_policy(policies: PolicyResolver, test_dns: TestDNS,
                                                                 https: HTTPSServer, errors):
    """A TXT record but no fetchable policy and nothing cached: deliver as
    without MTA-STS (None), reporting the failure."""
    publish(test_dns, "id1")
    https.serve(POLICY_PATH, GOOD_POLICY, status=404)
    entry, reason = await bounded(policies.policy_for(DOMAIN))
    assert entry is None
    assert reason.startswith("no policy: fetch failed:")
    assert [e.kind for _, e in errors] == ["http-status"]


@pytest_twisted.ensureDeferred
async def test_resolver_no_txt_keeps_valid_cache(policies: PolicyResolver, test_dns: TestDNS,
                                                 https: HTTPSServer, cache: FilePolicyCache):
    """The absence of the TXT record (NXDOMAIN, or only other TXT records)
    does not remove a cached unexpired policy (RFC 8461 §5)."""
    cache.put(cached_entry("old1"))
    entry, reason = await bounded(policies.policy_for(DOMAIN))
    assert entry == cached_entry("old1") and reason == "cached, no TXT record"
    test_dns.add(f"_mta-sts.{DOMAIN}", "TXT", "v=spf1 -all")
    entry, _ = await bounded(policies.policy_for(DOMAIN))
    assert entry == cached_entry("old1")
    assert https.requests == []


@pytest_twisted.ensureDeferred
async def test_resolver_expired_cache_and_no_txt_is_none(policies: PolicyResolver, cache: FilePolicyCache,
                                                         clock: Clock, https: HTTPSServer):
    """A cached policy past expires_at is not applied; with no TXT record
    the answer is no policy."""
    cache.put(cached_entry("old1", fetched_at=START - 86400))
    entry, reason = await bounded(policies.policy_for(DOMAIN))
    assert entry is None
    assert reason == "no policy: no TXT record"
    assert https.requests == []


@pytest_twisted.ensureDeferred
async def test_resolver_txt_failure_uses_cache(policies: PolicyResolver, test_dns: TestDNS,
                                               cache: FilePolicyCache):
    """A failing TXT look-up (SERVFAIL) falls back to the cached policy, or
    to none when nothing valid is cached."""
    test_dns.set_servfail(f"_mta-sts.{DOMAIN}")
    entry, reason = await bounded(policies.policy_for(DOMAIN))
    assert entry is None and reason.startswith("no policy: TXT look-up failed")
    cache.put(cached_entry("old1"))
    entry, reason = await bounded(policies.policy_for(DOMAIN))
    assert entry == cached_entry("old1") and reason.startswith("cached, TXT look-up failed")


@pytest_twisted.ensureDeferred
async def test_resolver_invalid_txt_is_like_absent(policies: PolicyResolver, test_dns: TestDNS,
                                                   https: HTTPSServer):
    """Two STSv1 records (or a malformed one) mean no policy, no fetch."""
    test_dns.add(f"_mta-sts.{DOMAIN}", "TXT", "v=STSv1; id=a1;")
    test_dns.add(f"_mta-sts.{DOMAIN}", "TXT", "v=STSv1; id=b2;")
    entry, reason = await bounded(policies.policy_for(DOMAIN))
    assert entry is None and reason == "no policy: no valid STSv1 TXT record"
    assert https.requests == []


@pytest_twisted.ensureDeferred
async def test_resolver_returns_mode_none(policies: PolicyResolver, test_dns: TestDNS, https: HTTPSServer):
    """A fetched mode-none policy is returned (and cached) like any other;
    the caller delivers as without a policy."""
    publish(test_dns, "off1")
    https.serve(POLICY_PATH, b"version: STSv1\nmode: none\nmax_age: 86400\n")
    entry, reason = await bounded(policies.policy_for(DOMAIN))
    assert reason == "fetched" and entry.policy.mode is Mode.NONE


@pytest_twisted.ensureDeferred
async def test_resolver_shares_concurrent_discovery(policies: PolicyResolver, test_dns: TestDNS,
                                                    https: HTTPSServer):
    """Concurrent calls for one domain make one TXT query and one fetch."""
    publish(test_dns, "id1")
    calls = [Deferred.fromCoroutine(policies.policy_for(DOMAIN)) for _ in range(5)]
    results = await gatherResults(calls).addTimeout(WAIT, reactor)
    assert {r[1] for r in results} == {"fetched"}
    assert len(https.requests) == 1
    assert test_dns.queries.count((f"_mta-sts.{DOMAIN}", "TXT")) == 1


@pytest_twisted.ensureDeferred
async def test_resolver_address_literal_has_no_policy(policies: PolicyResolver, test_dns: TestDNS):
    """An address-literal domain has no MTA-STS policy; nothing is asked."""
    entry, reason = await bounded(policies.policy_for("[192.0.2.1]"))
    assert entry is None and reason.startswith("no policy: not a domain name")
    assert test_dns.queries == []


@pytest_twisted.ensureDeferred
async def test_resolver_cache_survives_restart(dns_resolver, fetcher: PolicyFetcher, clock: Clock,
                                               test_dns: TestDNS, https: HTTPSServer, tmp_path: Path):
    """A policy cached by one resolver is used by a new resolver over a new
    FilePolicyCache on the same directory (a restart): no refetch."""
    publish(test_dns, "id1")
    first = PolicyResolver(dns_resolver, fetcher, FilePolicyCache(tmp_path / "sts"), clock)
    await bounded(first.policy_for(DOMAIN))
    second = PolicyResolver(dns_resolver, fetcher, FilePolicyCache(tmp_path / "sts"), clock)
    entry, reason = await bounded(second.policy_for(DOMAIN))
    assert reason == "cached, id unchanged" and entry.policy_id == "id1"
    assert len(https.requests) == 1


@pytest_twisted.ensureDeferred
async def test_resolver_cache_writes_go_through_run_in_thread(dns_resolver, fetcher: PolicyFetcher, clock: Clock,
                                                              test_dns: TestDNS):
    """With run_in_thread, the cache's blocking put runs through it."""
    calls = []

    def run_in_thread(f, *args):
        calls.append(f.__name__)
        return succeed(f(*args))

    cache = MemoryPolicyCache()
    publish(test_dns, "id1")
    resolver = PolicyResolver(dns_resolver, fetcher, cache, clock, run_in_thread=run_in_thread)
    await bounded(resolver.policy_for(DOMAIN))
    assert calls == ["put"]
    assert cache.get(DOMAIN).policy_id == "id1"


@pytest_twisted.ensureDeferred
async def test_refresh_due_refreshes_before_expiry(policies: PolicyResolver, test_dns: TestDNS,
                                                   https: HTTPSServer, cache: FilePolicyCache, clock: Clock):
    """refresh_due refetches policies expiring within refresh_margin (even
    with an unchanged id, so max_age restarts), leaves later ones alone
    and drops expired ones."""
    publish(test_dns, "id1")
    soon = cached_entry("id1", fetched_at=START - 86400 + 3600)            # expires in 1 h
    later = CachedPolicy("later.test", "l1", soon.policy, START, START + 10 * 86400)
    gone = CachedPolicy("gone.test", "g1", soon.policy, START - 20, START - 10)
    for entry in (soon, later, gone):
        cache.put(entry)
    await bounded(policies.refresh_due())
    assert len(https.requests) == 1
    refreshed = cache.get(DOMAIN)
    assert (refreshed.policy_id, refreshed.fetched_at, refreshed.expires_at) == ("id1", START, START + 86400)
    assert cache.get("later.test") == later
    assert cache.get("gone.test") is None


@pytest_twisted.ensureDeferred
async def test_refresh_due_failure_keeps_policy(policies: PolicyResolver, https: HTTPSServer,
                                                cache: FilePolicyCache, errors):
    """A refresh that fails (no TXT, policy host error) keeps the cached
    policy until it expires, and reports the failure."""
    soon = cached_entry("id1", fetched_at=START - 86400 + 3600)
    cache.put(soon)
    https.serve(POLICY_PATH, b"", status=503)
    await bounded(policies.refresh_due())
    assert cache.get(DOMAIN) == soon
    assert [e.kind for _, e in errors] == ["http-status"]


# -- check_domain -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_check_domain_reports_both_halves(test_dns: TestDNS, dns_resolver, fetcher: PolicyFetcher,
                                                https: HTTPSServer):
    """check_domain shows the TXT records, the id and the fetched policy,
    and each half's error on its own."""
    publish(test_dns, "id1")
    result = await bounded(check_domain(DOMAIN, dns_resolver, fetcher))
    assert result["txt_records"] == ["v=STSv1; id=id1;"]
    assert result["policy_id"] == "id1" and result["txt_error"] is None
    assert result["policy"]["mode"] == "enforce" and result["error"] is None
    json.dumps(result)

    test_dns.remove(f"_mta-sts.{DOMAIN}")
    https.serve(POLICY_PATH, GOOD_POLICY, content_type="text/html")
    result = await bounded(check_domain(DOMAIN, dns_resolver, fetcher))
    assert result["policy_id"] is None and "NXDOMAIN" in result["txt_error"]
    assert result["policy"] is None and result["error_kind"] == "content-type"
