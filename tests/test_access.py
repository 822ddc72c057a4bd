"""Tests for plugins/access.py: rule parsing, matching per list type,
first-match order, the actions, when each list runs (delay_reject), and
the rules file that is read again when it changes.

The plugin is built the way the registry builds it (options validated by
L{build_options}); stage semantics go through the real
L{gateway.pipeline.Pipeline}.  Time is a L{Clock}; the one test with a
real thread is bounded by a reactor timeout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from gateway.address import Mailbox, canonical_domain
from gateway.config import ConfigError, parse_config
from gateway.interfaces import IConnectCheck, IHeloCheck, IMailCheck, IRcptCheck, IRelayGate
from gateway.pipeline import Pipeline, PluginSlot
from gateway.registry import PluginContext, build_options
from gateway.session import Recipient, Session, Transaction
from gateway.verdict import CONTINUE, Action, reject
from plugins import access
from tests.support import base_config

WAIT = 10


def run_now(f: Any, *args: Any) -> Any:
    """A run_in_thread that runs at once, as the unit tests of spf do."""
    return f(*args)


def make(tmp_path: Path, *, clock: Any = None, run_in_thread: Any = run_now, **options: Any) -> Any:
    """The plugin built as the registry builds it, from option values."""
    config = parse_config(base_config(tmp_path), str(tmp_path / "gateway.toml"))
    settings = build_options(access.factory, options, config.path)
    context = PluginContext("access", clock or Clock(), None, config, run_in_thread)
    return access.factory.build(settings.options, context)


def session(peer: str = "192.0.2.10", peer_name: str | None = None, helo: str = "client.example.net") -> Session:
    return Session(id="s1", listener="mx", peer=peer, peer_name=peer_name, helo=helo)


def mailbox(address: str) -> Mailbox:
    """A Mailbox as the server hands it over: the domain canonical."""
    local, _, domain = address.rpartition("@")
    return Mailbox(local, canonical_domain(domain))


def transaction(sender: str | None = "a@sender.example") -> Transaction:
    return Transaction(sender=mailbox(sender) if sender is not None else None)


def rcpt(plugin: Any, sess: Session | None = None, sender: str | None = "a@sender.example",
         to: str = "b@example.test") -> Any:
    """check_rcpt for one recipient; a Deferred result must already have fired."""
    txn = transaction(sender)
    verdict = plugin.check_rcpt(sess or session(), txn, Recipient(mailbox(to)))
    if isinstance(verdict, defer.Deferred):
        verdict = pytest_twisted.blockon(verdict.addTimeout(WAIT, reactor))
    return verdict


# -- parsing ----------------------------------------------------------------------


@pytest.mark.parametrize("kind, text, action, reply_text", [
    ("client", "192.0.2.0/24 REJECT Known spam source", "REJECT", "Known spam source"),
    ("client", "2001:db8::/32 defer", "DEFER", ""),
    ("client", "mail.example.com OK", "OK", ""),
    ("client", ".example.com DUNNO", "DUNNO", ""),
    ("helo", "[192.0.2.1] REJECT", "REJECT", ""),
    ("sender", "<> OK", "OK", ""),
    ("sender", "user@ 554 Go away", "554", "Go away"),
    ("recipient", "@example.test 450", "450", ""),
    ("recipient", "bücher.example REJECT", "REJECT", ""),
])
def test_parse_rule_accepts_access5_forms(kind: str, text: str, action: str, reply_text: str):
    """PATTERN ACTION [text] parses for every type, with actions in any
    case, numeric 4NN/5NN codes, and Unicode domains."""
    rule = access.parse_rule(kind, text)
    assert (rule.kind, rule.action, rule.text) == (kind, action, reply_text)


@pytest.mark.parametrize("kind, text, problem", [
    ("client", "192.0.2.0/24", "expected PATTERN ACTION"),
    ("client", "192.0.2.0/24 PERMIT", "unknown action"),
    ("client", "192.0.2.0/24 250", "unknown action"),
    ("client", "192.0.2.0/24 OK because", "takes no text"),
    ("client", "bad_name.example REJECT", "bad client pattern"),
    ("helo", "[1.2.3] REJECT", "bad helo pattern"),
    ("recipient", "<> REJECT", "null sender"),
    ("sender", "a@.example.com REJECT", "cannot start"),
    ("sender", "@ REJECT", "empty address"),
    ("body", "x REJECT", "unknown type"),
])
def test_parse_rule_refuses_mistakes(kind: str, text: str, problem: str):
    """A malformed rule is an error that says what is wrong."""
    with pytest.raises(ValueError, match=problem):
        access.parse_rule(kind, text)


def test_bad_rule_in_config_is_a_config_error(tmp_path: Path):
    """A bad rule in [plugins.access] stops start-up with a ConfigError
    naming the table and the list."""
    config = parse_config(base_config(tmp_path), str(tmp_path / "gateway.toml"))
    with pytest.raises(ConfigError, match=r"\[plugins.access\].*sender"):
        build_options(access.factory, {"sender": ["example.com MAYBE"]}, config.path)


def test_parse_file_skips_comments_and_names_the_bad_line():
    """The file format is TYPE PATTERN ACTION [text]; comments and blank
    lines are skipped, tabs separate as well as spaces, and an error names
    the file and line."""
    rules = access.parse_file("# comment\n\nclient\t192.0.2.0/24  REJECT  No\nSender <> OK\n", "f")
    assert [r.pattern for r in rules["client"]] == ["192.0.2.0/24"]
    assert rules["client"][0].text == "No"
    assert [r.pattern for r in rules["sender"]] == ["<>"]
    with pytest.raises(ValueError, match="f, line 2"):
        access.parse_file("client 192.0.2.1 OK\nhelo\n", "f")


# -- matching ------------------------------------------------------------------------


@pytest.mark.parametrize("pattern, peer, name, matched", [
    ("192.0.2.0/24", "192.0.2.77", None, True),
    ("192.0.2.0/24", "198.51.100.1", None, False),
    ("192.0.2.77", "192.0.2.77", None, True),
    ("2001:db8::/32", "2001:db8::1", None, True),
    ("2001:db8::/32", "192.0.2.1", None, False),
    ("192.0.2.0/24", "::ffff:192.0.2.5", None, True),
    ("example.com", "192.0.2.1", "example.com", True),
    ("example.com", "192.0.2.1", "mail.EXAMPLE.com.", True),
    ("example.com", "192.0.2.1", "badexample.com", False),
    (".example.com", "192.0.2.1", "example.com", False),
    (".example.com", "192.0.2.1", "a.b.example.com", True),
    ("example.com", "192.0.2.1", None, False),
])
def test_client_matches_address_network_and_verified_name(tmp_path: Path, pattern: str, peer: str,
                                                            name: str | None, matched: bool):
    """Client patterns match the address (networks, IPv4-mapped IPv6) or
    the verified reverse name by domain suffix on a label boundary; no
    verified name, no name match."""
    plugin = make(tmp_path, client=[f"{pattern} REJECT"])
    verdict = rcpt(plugin, session(peer=peer, peer_name=name))
    assert (verdict.action is Action.REJECT) is matched


@pytest.mark.parametrize("pattern, helo, matched", [
    ("localhost", "localhost", True),
    ("localhost", "LOCALHOST.", True),
    ("example.com", "pc1.example.com", True),
    (".example.com", "example.com", False),
    ("192.0.2.0/24", "[192.0.2.9]", True),
    ("192.0.2.0/24", "192.0.2.9", True),
    ("2001:db8::/32", "[IPv6:2001:db8::9]", True),
    ("192.0.2.0/24", "pc1.example.com", False),
])
def test_helo_matches_names_and_address_literals(tmp_path: Path, pattern: str, helo: str, matched: bool):
    """HELO patterns match names by suffix and addresses against literals
    or bare addresses."""
    plugin = make(tmp_path, helo=[f"{pattern} REJECT"])
    assert (rcpt(plugin, session(helo=helo)).action is Action.REJECT) is matched


@pytest.mark.parametrize("pattern, sender, matched", [
    ("Boss@Example.com", "boss@example.COM", True),
    ("boss@example.com", "boss@sub.example.com", False),
    ("boss@", "BOSS@anywhere.example", True),
    ("example.com", "x@example.com", True),
    ("example.com", "x@mail.example.com", True),
    ("example.com", "x@notexample.com", False),
    ("@example.com", "x@example.com", True),
    ("@example.com", "x@mail.example.com", False),
    (".example.com", "x@example.com", False),
    (".example.com", "x@mail.example.com", True),
    ("<>", None, True),
    ("<>", "x@example.com", False),
    ("example.com", None, False),
    ("bücher.example", "x@BÜCHER.example", True),
])
def test_sender_patterns(tmp_path: Path, pattern: str, sender: str | None, matched: bool):
    """Sender patterns: full address and local part case-insensitively,
    domain with subdomains, @domain alone, .domain below, <> the null
    sender, Unicode domains in their A-label form."""
    plugin = make(tmp_path, sender=[f"{pattern} REJECT"])
    assert (rcpt(plugin, sender=sender).action is Action.REJECT) is matched


def test_recipient_patterns_match_the_recipient(tmp_path: Path):
    """Recipient rules look at the recipient, not at the sender."""
    plugin = make(tmp_path, recipient=["noreply@example.test REJECT No mail here"])
    verdict = rcpt(plugin, sender="noreply@example.test", to="noreply@example.test")
    assert verdict.reply.text == "<noreply@example.test>: Recipient address rejected: No mail here"
    assert rcpt(plugin, sender="noreply@example.test", to="other@example.test") is CONTINUE


def test_first_match_wins_in_list_order(tmp_path: Path):
    """Rules are tried in order and the first that matches decides, even
    when a later one is more specific."""
    plugin = make(tmp_path, sender=["example.com DEFER", "boss@example.com OK"])
    assert rcpt(plugin, sender="boss@example.com").action is Action.TEMPFAIL
    plugin = make(tmp_path, sender=["boss@example.com OK", "example.com DEFER"])
    assert rcpt(plugin, sender="boss@example.com").action is Action.ACCEPT


# -- actions -------------------------------------------------------------------------


@pytest.mark.parametrize("rule, code, status, text", [
    ("example.com REJECT", 550, "5.7.1", "<a@example.com>: Sender address rejected: Access denied"),
    ("example.com REJECT Spoofed sender", 550, "5.7.1", "<a@example.com>: Sender address rejected: Spoofed sender"),
    ("example.com DEFER", 451, "4.7.1", "<a@example.com>: Sender address rejected: Access temporarily denied"),
    ("example.com 554 No", 554, "5.7.1", "<a@example.com>: Sender address rejected: No"),
    ("example.com 450", 450, "4.7.1", "<a@example.com>: Sender address rejected: Access temporarily denied"),
])
def test_reject_and_defer_replies(tmp_path: Path, rule: str, code: int, status: str, text: str):
    """REJECT is 550 5.7.1, DEFER 451 4.7.1, a numeric action that code
    with X.7.1; the text says which address was refused, as Postfix's."""
    verdict = rcpt(make(tmp_path, sender=[rule]), sender="a@example.com")
    assert (verdict.reply.code, verdict.reply.status, verdict.reply.text) == (code, status, text)


def test_client_reply_and_unprintable_text(tmp_path: Path):
    """A client rejection says "Client host rejected"; control characters
    from a rules file never reach the wire."""
    plugin = make(tmp_path, client=["192.0.2.0/24 REJECT Go\x07 away"])
    assert rcpt(plugin).reply.text == "Client host rejected: Go? away"


def test_dunno_stops_this_list_only(tmp_path: Path):
    """DUNNO ends the search in its own list (later rules of that list do
    not apply) and the next list still runs."""
    plugin = make(tmp_path, sender=["boss@example.com DUNNO", "example.com REJECT"],
                  recipient=["b@example.test DEFER"])
    assert rcpt(plugin, sender="boss@example.com", to="c@example.test") is CONTINUE
    assert rcpt(plugin, sender="boss@example.com").action is Action.TEMPFAIL
    assert rcpt(plugin, sender="x@example.com").action is Action.REJECT


def test_delayed_lists_run_client_helo_sender_recipient(tmp_path: Path):
    """With delay_reject, every list runs at RCPT in the order client,
    helo, sender, recipient: an OK of the client ends the stage before the
    sender list is consulted."""
    plugin = make(tmp_path, client=["192.0.2.0/24 OK"], sender=["example.com REJECT"])
    assert rcpt(plugin, sender="x@example.com").action is Action.ACCEPT
    assert rcpt(plugin, session(peer="198.51.100.1"), sender="x@example.com").action is Action.REJECT


def test_ok_ends_the_stage_in_the_pipeline(tmp_path: Path):
    """Through the real Pipeline: OK is an ACCEPT that skips the RCPT
    checks listed after access; without a match those checks run."""
    plugin = make(tmp_path, client=["192.0.2.0/24 OK"])

    class Refuser:
        def check_rcpt(self, session, transaction, recipient):
            return reject(text="later check")

    from zope.interface import alsoProvides
    refuser = Refuser()
    alsoProvides(refuser, IRcptCheck)
    pipe = Pipeline("mx", [PluginSlot("access", plugin), PluginSlot("later", refuser)], Clock())
    args = (transaction(), Recipient(mailbox("b@example.test")))
    assert pipe.run("rcpt", session(), *args).action is Action.ACCEPT
    assert pipe.run("rcpt", session(peer="198.51.100.1"), *args).reply.text == "later check"


def test_ok_never_opens_relay(tmp_path: Path):
    """access is not a relay gate: with OK for the client and the
    recipient, the relay stage still denies (554 5.7.1) unless a gate
    permits."""
    plugin = make(tmp_path, client=["0.0.0.0/0 OK"], recipient=["elsewhere.example OK"])
    assert not IRelayGate.providedBy(plugin)
    pipe = Pipeline("mx", [PluginSlot("access", plugin)], Clock())
    outcome = pipe.run("relay", session(), transaction(), Recipient(mailbox("x@elsewhere.example")))
    assert (outcome.action, outcome.reply.code, outcome.reply.status) == (Action.REJECT, 554, "5.7.1")


def test_results_name_the_rule(tmp_path: Path):
    """The matching rule is recorded once per transaction for the log line."""
    plugin = make(tmp_path, sender=["example.com DEFER"])
    txn = transaction("a@example.com")
    for _ in range(2):
        plugin.check_rcpt(session(), txn, Recipient(mailbox("b@example.test")))
    assert [(r.plugin, r.result, r.detail) for r in txn.results] == [("access", "defer", "sender example.com")]


# -- stages ----------------------------------------------------------------------------


def test_delay_reject_decides_the_stages(tmp_path: Path):
    """With delay_reject (default) only RCPT is taken part in; without it
    the client, HELO and sender lists get their own stages."""
    delayed = make(tmp_path)
    assert IRcptCheck.providedBy(delayed)
    assert not any(i.providedBy(delayed) for i in (IConnectCheck, IHeloCheck, IMailCheck))
    early = make(tmp_path, delay_reject=False)
    assert all(i.providedBy(early) for i in (IConnectCheck, IHeloCheck, IMailCheck, IRcptCheck))


def test_each_list_at_its_own_command(tmp_path: Path):
    """Without delay_reject: client at connect (a rejection replaces the
    greeting), helo at HELO with the name given, sender at MAIL, and RCPT
    looks at the recipient list only."""
    plugin = make(tmp_path, delay_reject=False, client=["192.0.2.66 REJECT"], helo=["localhost REJECT"],
                  sender=["<> DEFER"], recipient=["x@example.test REJECT"])
    pipe = Pipeline("mx", [PluginSlot("access", plugin), PluginSlot("relay_guard", _Gate())], Clock())
    assert pipe.run("connect", session(peer="192.0.2.66")).reply.text == "Client host rejected: Access denied"
    assert pipe.run("connect", session()).action is Action.CONTINUE
    assert pipe.run("helo", session(), "localhost").reply.text == "<localhost>: Helo command rejected: Access denied"
    txn = transaction(None)
    assert pipe.run("mail", session(), txn, None).action is Action.TEMPFAIL
    outcome = pipe.run("rcpt", session(peer="192.0.2.66", helo="localhost"), txn,
                       Recipient(mailbox("y@example.test")))
    assert outcome.action is Action.CONTINUE
    assert pipe.run("rcpt", session(), txn, Recipient(mailbox("x@example.test"))).action is Action.REJECT


class _Gate:
    """A relay gate that permits everything (for stage tests)."""

    def check_relay(self, session, transaction, recipient):
        from gateway.verdict import accept
        return accept()


# -- the rules file ------------------------------------------------------------------------


def write(path: Path, text: str, bump: int = 0) -> None:
    """Write a rules file and move its mtime by C{bump} seconds, so a
    rewrite within one clock tick is still seen as a change."""
    path.write_text(text)
    if bump:
        info = path.stat()
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + bump * 1_000_000_000))


def test_file_rules_follow_config_rules(tmp_path: Path):
    """Rules from the file apply after the config's rules of the same type."""
    rules = tmp_path / "access"
    write(rules, "sender example.com REJECT From the file\nsender boss@example.com OK\n")
    plugin = make(tmp_path, file=str(rules), sender=["boss@example.com OK"])
    assert rcpt(plugin, sender="boss@example.com").action is Action.ACCEPT
    assert rcpt(plugin, sender="x@example.com").reply.text.endswith("From the file")


def test_missing_or_broken_file_at_start_is_a_config_error(tmp_path: Path):
    """A file that cannot be read or parsed at start-up stops the gateway
    with an error naming the option (and the line)."""
    with pytest.raises(ConfigError, match=r"\[plugins.access\] file.*cannot read"):
        make(tmp_path, file=str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    write(broken, "client 192.0.2.1 OK\nclient 192.0.2.2 MAYBE\n")
    with pytest.raises(ConfigError, match="line 2"):
        make(tmp_path, file=str(broken))


def test_file_is_read_again_when_it_changes(tmp_path: Path):
    """A changed file (mtime, size or inode) is read again once
    check_interval has passed; before that the old rules stay."""
    clock = Clock()
    rules = tmp_path / "access"
    write(rules, "sender example.com REJECT\n")
    plugin = make(tmp_path, clock=clock, file=str(rules), check_interval=5.0)
    assert rcpt(plugin, sender="x@example.com").action is Action.REJECT
    write(rules, "sender example.com DEFER\n", bump=10)
    assert rcpt(plugin, sender="x@example.com").action is Action.REJECT
    clock.advance(5)
    assert rcpt(plugin, sender="x@example.com").action is Action.TEMPFAIL
    write(rules, "", bump=20)
    clock.advance(5)
    assert rcpt(plugin, sender="x@example.com") is CONTINUE


def test_broken_file_on_reload_keeps_the_rules_and_logs(tmp_path: Path):
    """A file that breaks (or disappears) after start-up is logged once
    and the last good rules stay in force; fixing it takes effect."""
    rules = tmp_path / "access"
    write(rules, "sender example.com REJECT\n")
    plugin = make(tmp_path, file=str(rules), check_interval=0)
    write(rules, "sender example.com NOPE\n", bump=10)
    with capturedLogs() as events:
        assert rcpt(plugin, sender="x@example.com").action is Action.REJECT
        assert rcpt(plugin, sender="x@example.com").action is Action.REJECT
    errors = [e for e in events if e["log_level"] is LogLevel.error]
    assert len(errors) == 1 and "line 1" in errors[0]["reason"]
    rules.unlink()
    with capturedLogs() as events:
        assert rcpt(plugin, sender="x@example.com").action is Action.REJECT
    assert [e for e in events if e["log_level"] is LogLevel.error]
    write(rules, "sender example.com DEFER\n", bump=30)
    assert rcpt(plugin, sender="x@example.com").action is Action.TEMPFAIL


@pytest_twisted.ensureDeferred
async def test_file_is_checked_in_a_thread(tmp_path: Path):
    """With a real thread pool the check answers with a Deferred that
    waits for the reload; concurrent checks share one reload."""
    rules = tmp_path / "access"
    write(rules, "sender example.com REJECT\n")
    calls = []

    def in_thread(f, *args):
        calls.append(f.__name__)
        return threads.deferToThread(f, *args)

    plugin = make(tmp_path, file=str(rules), check_interval=0, run_in_thread=in_thread)
    write(rules, "sender example.com DEFER\n", bump=10)
    first = plugin.check_rcpt(session(), transaction("x@example.com"), Recipient(mailbox("b@example.test")))
    second = plugin.check_rcpt(session(), transaction("y@example.com"), Recipient(mailbox("b@example.test")))
    assert isinstance(first, defer.Deferred) and isinstance(second, defer.Deferred)
    verdicts = await defer.gatherResults([first, second]).addTimeout(WAIT, reactor)
    assert [v.action for v in verdicts] == [Action.TEMPFAIL, Action.TEMPFAIL]
    assert calls == ["_reload_if_changed"]
