"""Tests for C{plugins.dmarc}: record parsing, the organisational domain,
strict and relaxed alignment, p/sp/pct (with an injected random source),
and the plugin against policies served by the real test DNS server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from publicsuffixlist import PublicSuffixList
from twisted.internet import defer, reactor

from gateway.config import ConfigError
from gateway.registry import build_options
from gateway.session import Transaction
from gateway.verdict import Action
from plugins import dmarc
from plugins.dmarc import (
    DMARCPolicy,
    DMARCRecord,
    DMARCRecordError,
    Options,
    aligned,
    evaluate,
    is_dmarc_record,
    organizational_domain,
    parse_record,
)
from tests.dnsserver import TestDNS
from tests.test_dkim import dns_server, plugin_context, resolver, session, spooled  # noqa: F401 (fixtures)

WAIT = 10
PSL = PublicSuffixList()


def organization(domain: str) -> str:
    return organizational_domain(domain, PSL)


class FixedRandom:
    """An injected random source: random() returns the given values in
    turn and counts the calls."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)
        self.calls = 0

    def random(self) -> float:
        self.calls += 1
        return self.values.pop(0)


def dkim_pass(domain: str) -> list[dict[str, str]]:
    return [{"result": "pass", "domain": domain, "selector": "s", "algorithm": "rsa-sha256"}]


# -- records ------------------------------------------------------------------


def test_parse_record_with_every_tag():
    """p, sp, adkim, aspf and pct are read (case-insensitively in values);
    unknown tags such as rua, fo or a future tag are ignored."""
    record = parse_record("v=DMARC1; p=Reject; sp=quarantine; adkim=s; aspf=S; pct=20; "
                          "rua=mailto:d@example.org; fo=1; future=x")
    assert record == DMARCRecord("reject", "quarantine", "s", "s", 20)


def test_parse_record_defaults_and_bad_optional_tags():
    """Missing or malformed optional tags take their defaults (relaxed
    alignment, pct=100, no sp)."""
    assert parse_record("v=DMARC1;p=none") == DMARCRecord("none", None, "r", "r", 100)
    assert parse_record("v=DMARC1; p=quarantine; adkim=x; aspf=; pct=150;") == DMARCRecord("quarantine")
    assert parse_record("v=DMARC1; p=quarantine; pct=-1").pct == 100


def test_parse_record_without_usable_policy():
    """A bad or missing p= (or a bad sp=) gives p=none when rua= is there,
    and an unusable record otherwise (RFC 7489 §6.6.3 step 6); a record
    that does not start with v=DMARC1 is refused."""
    assert parse_record("v=DMARC1; p=bogus; rua=mailto:r@example.org").policy == "none"
    assert parse_record("v=DMARC1; p=reject; sp=bogus; rua=mailto:r@example.org") == DMARCRecord("none")
    for text in ("v=DMARC1; p=bogus", "v=DMARC1", "p=reject; v=DMARC1", "v=DMARC2; p=reject", "v=dmarc1; p=reject"):
        with pytest.raises(DMARCRecordError):
            parse_record(text)


@pytest.mark.parametrize("text, expected", [
    ("v=DMARC1; p=none", True), ("v = DMARC1 ;p=none", True), ("v=DMARC1", True),
    ("v=spf1 -all", False), ("v=DMARC10; p=none", False), ("p=none; v=DMARC1", False),
])
def test_is_dmarc_record(text: str, expected: bool):
    """Only TXT strings starting with v=DMARC1 count as DMARC records."""
    assert is_dmarc_record(text) is expected


# -- organisational domain and alignment --------------------------------------


@pytest.mark.parametrize("domain, org", [
    ("example.com", "example.com"),
    ("mail.example.com", "example.com"),
    ("a.b.c.example.com", "example.com"),
    ("example.co.uk", "example.co.uk"),
    ("mail.example.co.uk", "example.co.uk"),
    ("co.uk", "co.uk"),
    ("com", "com"),
    ("news.example.test", "example.test"),
    ("user.github.io", "user.github.io"),
])
def test_organizational_domain(domain: str, org: str):
    """The organisational domain is the public suffix plus one label, from
    the list shipped with publicsuffixlist (private suffixes included); an
    unlisted TLD is its own suffix."""
    assert organizational_domain(domain, PSL) == org


@pytest.mark.parametrize("identifier, author, mode, expected", [
    ("example.com", "example.com", "s", True),
    ("EXAMPLE.com.", "example.com", "s", True),
    ("mail.example.com", "example.com", "s", False),
    ("mail.example.com", "example.com", "r", True),
    ("example.com", "news.example.com", "r", True),
    ("a.example.com", "b.example.com", "r", True),
    ("example.net", "example.com", "r", False),
    ("evil-example.com", "example.com", "r", False),
    ("example.co.uk", "other.co.uk", "r", False),
    ("alice.github.io", "bob.github.io", "r", False),
    ("", "example.com", "r", False),
])
def test_alignment(identifier: str, author: str, mode: str, expected: bool):
    """Strict alignment needs the same domain; relaxed the same
    organisational domain, never just the same public suffix."""
    assert aligned(identifier, author, mode, organization) is expected


def test_dkim_and_spf_alignment_in_evaluate():
    """A passing DKIM d= or SPF domain passes DMARC when aligned per
    adkim/aspf; a failing one, or one from another organisation, does not."""
    relaxed, strict = DMARCRecord("reject"), DMARCRecord("reject", adkim="s", aspf="s")
    never = FixedRandom()
    cases = [
        (relaxed, dkim_pass("mail.example.com"), None, "pass"),
        (strict, dkim_pass("mail.example.com"), None, "fail"),
        (strict, dkim_pass("example.com"), None, "pass"),
        (relaxed, [{**dkim_pass("example.com")[0], "result": "fail"}], None, "fail"),
        (relaxed, dkim_pass("example.net"), None, "fail"),
        (relaxed, [], {"result": "pass", "domain": "bounces.example.com"}, "pass"),
        (strict, [], {"result": "pass", "domain": "bounces.example.com"}, "fail"),
        (relaxed, [], {"result": "softfail", "domain": "example.com"}, "fail"),
        (relaxed, [], {"result": "pass", "domain": "example.net"}, "fail"),
    ]
    for record, dkim, spf, result in cases:
        outcome = evaluate("example.com", record, "example.com", dkim, spf, organization, never)
        assert outcome.result == result, (record, dkim, spf)
    both = evaluate("example.com", relaxed, "example.com", dkim_pass("example.com"),
                    {"result": "pass", "domain": "example.com"}, organization, never)
    assert (both.dkim_aligned, both.spf_aligned, both.disposition) == (True, True, "none")
    assert never.calls == 0


def test_sp_applies_to_subdomains_with_the_organisations_record():
    """sp= applies when the record was found at the organisational domain
    for a subdomain author; p= when the author domain has its own record
    or sp= is absent."""
    record = DMARCRecord("reject", subdomain_policy="none")
    never = FixedRandom()
    sub = evaluate("news.example.com", record, "example.com", [], None, organization, never)
    assert (sub.result, sub.policy, sub.disposition) == ("fail", "none", "none")
    own = evaluate("news.example.com", record, "news.example.com", [], None, organization, never)
    assert (own.policy, own.disposition) == ("reject", "reject")
    top = evaluate("example.com", record, "example.com", [], None, organization, never)
    assert top.policy == "reject"
    no_sp = evaluate("news.example.com", DMARCRecord("quarantine"), "example.com", [], None, organization, never)
    assert no_sp.policy == "quarantine"


def test_pct_samples_with_the_injected_random_source():
    """With pct=25 a failing message is in the sample when random()*100 <
    25 and gets the policy; otherwise the next lower one (reject ->
    quarantine, quarantine -> none).  pct=0 never applies it; pct=100 and
    p=none never draw."""
    reject25 = DMARCRecord("reject", pct=25)
    quarantine25 = DMARCRecord("quarantine", pct=25)
    rng = FixedRandom(0.1, 0.9, 0.2, 0.25, 0.0)
    outcomes = [evaluate("example.com", record, "example.com", [], None, organization, rng).disposition
                for record in (reject25, reject25, quarantine25, quarantine25, DMARCRecord("reject", pct=0))]
    assert outcomes == ["reject", "quarantine", "quarantine", "none", "quarantine"]
    assert rng.calls == 5
    idle = FixedRandom()
    evaluate("example.com", DMARCRecord("reject"), "example.com", [], None, organization, idle)
    evaluate("example.com", DMARCRecord("none", pct=10), "example.com", [], None, organization, idle)
    assert idle.calls == 0


@pytest.mark.parametrize("table, message", [
    ({"reject_action": "hold"}, "reject_action"),
    ({"quarantine_action": "drop"}, "quarantine_action"),
    ({"tag_header": "X DMARC"}, "tag_header"),
    ({"policy": "reject"}, "unknown key"),
])
def test_bad_options_stop_startup(table: dict, message: str):
    """Option mistakes are config errors naming [plugins.dmarc]."""
    with pytest.raises(ConfigError, match=r"\[plugins.dmarc\]") as info:
        build_options(dmarc.factory, table, "gw.toml")
    assert message in str(info.value)


# -- the plugin against the test DNS server -----------------------------------


def policy_plugin(tmp_path: Path, resolver: Any, rng: Any = None, **options: Any) -> DMARCPolicy:
    context = plugin_context(tmp_path, "dmarc", resolver, trusted_networks=["192.0.2.0/30"])
    return DMARCPolicy(Options(**options), context, PSL, rng or FixedRandom())


async def check(plugin: DMARCPolicy, tmp_path: Path, from_line: bytes, *, client=None,
                dkim: list | None = None, spf: dict | None = None):
    transaction = Transaction(sender=None)
    if dkim is not None:
        transaction.notes["dkim"] = dkim
    if spf is not None:
        transaction.notes["spf"] = spf
    view = spooled(tmp_path, from_line + b"\r\nSubject: hi\r\n\r\nbody\r\n")
    verdict = await defer.maybeDeferred(plugin.check_message, client or session(), transaction, view
                                        ).addTimeout(WAIT, reactor)
    return verdict, transaction


@pytest_twisted.ensureDeferred
async def test_reject_policy_refuses_with_the_reason(tmp_path: Path, dns_server: TestDNS, resolver):
    """p=reject and no aligned pass: 550 5.7.1 naming the policy's domain
    and the reason; the notes say disposition reject."""
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    verdict, transaction = await check(policy_plugin(tmp_path, resolver), tmp_path, b"From: ceo@example.com",
                                       dkim=dkim_pass("evil.example"), spf={"result": "pass", "domain": "evil.example"})
    assert verdict.action is Action.REJECT
    assert (verdict.reply.code, verdict.reply.status) == (550, "5.7.1")
    assert verdict.reply.text == ("Message rejected by the DMARC policy of example.com: "
                                  "no aligned DKIM signature or SPF pass for example.com")
    note = transaction.notes["dmarc"]
    assert {k: note[k] for k in ("result", "policy", "domain", "disposition")} == {
        "result": "fail", "policy": "reject", "domain": "example.com", "disposition": "reject"}
    assert [(r.plugin, r.result) for r in transaction.results] == [("dmarc", "fail")]


@pytest_twisted.ensureDeferred
async def test_pass_none_and_quarantine(tmp_path: Path, dns_server: TestDNS, resolver):
    """An aligned DKIM pass passes untagged; p=none and p=quarantine
    failures are tagged with the header; reject_action = "tag" tags p=reject
    as quarantine."""
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    dns_server.add("_dmarc.example.net", "TXT", "v=DMARC1; p=none")
    dns_server.add("_dmarc.example.org", "TXT", "v=DMARC1; p=quarantine")
    plugin = policy_plugin(tmp_path, resolver)
    verdict, transaction = await check(plugin, tmp_path, b"From: a@example.com", dkim=dkim_pass("mail.example.com"))
    assert (verdict.action, verdict.add_headers) == (Action.CONTINUE, ())
    assert transaction.notes["dmarc"]["result"] == "pass" and transaction.notes["dmarc"]["dkim_aligned"]
    verdict, transaction = await check(plugin, tmp_path, b"From: a@example.net")
    assert verdict.add_headers == (("X-DMARC-Result", "fail (p=none dis=none) header.from=example.net"),)
    verdict, transaction = await check(plugin, tmp_path, b"From: a@example.org")
    assert verdict.add_headers == (("X-DMARC-Result", "fail (p=quarantine dis=quarantine) header.from=example.org"),)
    assert transaction.notes["dmarc"]["disposition"] == "quarantine"
    tagging = policy_plugin(tmp_path, resolver, reject_action="tag", tag_header="X-Policy")
    verdict, transaction = await check(tagging, tmp_path, b"From: a@example.com")
    assert verdict.add_headers == (("X-Policy", "fail (p=reject dis=quarantine) header.from=example.com"),)
    strict = policy_plugin(tmp_path, resolver, quarantine_action="reject")
    verdict, _ = await check(strict, tmp_path, b"From: a@example.org")
    assert verdict.action is Action.REJECT


@pytest_twisted.ensureDeferred
async def test_discovery_falls_back_to_the_organisational_domain(tmp_path: Path, dns_server: TestDNS, resolver):
    """No record at _dmarc.<From domain>: the organisational domain's is
    used, with its sp=; the look-ups went to the test server in that order."""
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=none; sp=reject")
    dns_server.add("_dmarc.example.com", "TXT", "some other TXT record")
    verdict, transaction = await check(policy_plugin(tmp_path, resolver), tmp_path, b"From: a@news.example.com")
    assert verdict.action is Action.REJECT
    assert transaction.notes["dmarc"]["policy_domain"] == "example.com"
    assert transaction.notes["dmarc"]["policy"] == "reject"
    assert [q for q in dns_server.queries if q[0].startswith("_dmarc")] == [
        ("_dmarc.news.example.com", "TXT"), ("_dmarc.example.com", "TXT")]


@pytest_twisted.ensureDeferred
async def test_no_record_broken_records_and_dns_failure(tmp_path: Path, dns_server: TestDNS, resolver):
    """No record anywhere: result none; two DMARC records or a broken one:
    permerror; SERVFAIL: temperror; none of them rejects or tags."""
    dns_server.add("_dmarc.two.example", "TXT", "v=DMARC1; p=reject")
    dns_server.add("_dmarc.two.example", "TXT", "v=DMARC1; p=none")
    dns_server.add("_dmarc.broken.example", "TXT", "v=DMARC1; p=bogus")
    dns_server.set_servfail("_dmarc.down.example")
    plugin = policy_plugin(tmp_path, resolver)
    for domain, result in (("nothing.example", "none"), ("two.example", "permerror"),
                           ("broken.example", "permerror"), ("down.example", "temperror")):
        verdict, transaction = await check(plugin, tmp_path, b"From: a@" + domain.encode())
        assert (verdict.action, verdict.add_headers) == (Action.CONTINUE, ()), domain
        assert transaction.notes["dmarc"]["result"] == result, domain
        assert transaction.notes["dmarc"]["disposition"] == "none"


@pytest_twisted.ensureDeferred
async def test_pct_in_the_plugin(tmp_path: Path, dns_server: TestDNS, resolver):
    """p=reject; pct=50: a draw of 0.7 is outside the sample, so the
    message is tagged as quarantine instead of refused."""
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject; pct=50")
    rng = FixedRandom(0.7, 0.3)
    plugin = policy_plugin(tmp_path, resolver, rng=rng)
    verdict, transaction = await check(plugin, tmp_path, b"From: a@example.com")
    assert verdict.add_headers == (("X-DMARC-Result", "fail (p=reject dis=quarantine) header.from=example.com"),)
    verdict, _ = await check(plugin, tmp_path, b"From: a@example.com")
    assert verdict.action is Action.REJECT and rng.calls == 2


@pytest_twisted.ensureDeferred
async def test_exempt_clients_and_bad_from(tmp_path: Path, dns_server: TestDNS, resolver):
    """Authenticated and trusted clients are not checked (no look-up);
    several From: fields get 550 5.6.0 (or permerror with
    reject_multiple_from = false); no From: is result none."""
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    plugin = policy_plugin(tmp_path, resolver)
    for client in (session(auth_user="alice@example.com"), session("192.0.2.3")):
        verdict, transaction = await check(plugin, tmp_path, b"From: a@example.com", client=client)
        assert verdict.action is Action.CONTINUE and "dmarc" not in transaction.notes
        assert [(r.result, r.detail) for r in transaction.results] == [("skip", "authenticated or trusted client")]
    assert dns_server.queries == []
    verdict, _ = await check(plugin, tmp_path, b"From: a@example.com\r\nFrom: b@evil.example")
    assert (verdict.action, verdict.reply.status, verdict.reply.text) == (
        Action.REJECT, "5.6.0", "Message must have exactly one From: header")
    lenient = policy_plugin(tmp_path, resolver, reject_multiple_from=False)
    verdict, transaction = await check(lenient, tmp_path, b"From: a@example.com, b@evil.example")
    assert verdict.action is Action.CONTINUE and transaction.notes["dmarc"]["result"] == "permerror"
    verdict, transaction = await check(plugin, tmp_path, b"To: x@example.com")
    assert verdict.action is Action.CONTINUE and transaction.notes["dmarc"]["result"] == "none"
