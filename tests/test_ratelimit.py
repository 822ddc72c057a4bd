"""Tests for plugins/ratelimit.py through the real L{Pipeline}: time is a
C{Clock}, state a L{MemoryStore} on that clock (or a store that fails).

End-to-end tests on real sockets are in tests/e2e/test_policy_state.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from gateway.address import Mailbox
from gateway.config import ConfigError, parse_config
from gateway.pipeline import Pipeline, PluginSlot
from gateway.registry import PluginContext, PluginRegistry, build_options
from gateway.session import Recipient, Session, Transaction
from gateway.store import MemoryStore, StoreError
from gateway.verdict import Action
from plugins import ratelimit
from tests.support import base_config


class FailingStore:
    """A store whose every call fails, like Redis down."""

    calls = 0

    def _fail(self, *args: Any, **kwargs: Any) -> defer.Deferred:
        self.calls += 1
        return defer.fail(StoreError("Redis at 127.0.0.1:1 is not connected"))

    incr = get = set = delete = sadd = sismember = _fail


def result_of(value: Any) -> Any:
    """The value of an Outcome or of an already fired Deferred."""
    if not isinstance(value, defer.Deferred):
        return value
    results: list[Any] = []
    value.addBoth(results.append)
    assert results, "still pending"
    return results[0]


class Harness:
    """The plugin in a one-listener pipeline, with a Clock and a store."""

    def __init__(self, tmp_path: Path, options: dict[str, Any], store: Any = None,
                 trusted: list[str] | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        doc = base_config(tmp_path, server={"trusted_networks": trusted or []})
        doc["listener"][0]["plugins"] = ["relay_guard", "ratelimit"]
        path = str(tmp_path / "gateway.toml")
        self.config = parse_config(doc, path)
        settings = build_options(ratelimit.factory, options, path)
        self.store = store if store is not None else MemoryStore(self.clock)
        context = PluginContext("ratelimit", self.clock, None, self.config, lambda f, *a: f(*a), self.store)
        self.plugin = ratelimit.factory.build(settings.options, context)
        self.pipeline = Pipeline("mx", [PluginSlot("ratelimit", self.plugin, settings.mode, 5.0)], self.clock)

    def session(self, peer: str = "192.0.2.10", auth_user: str | None = None) -> Session:
        return Session(id="s1", listener="mx", peer=peer, auth_user=auth_user)

    def connect(self, session: Session) -> Any:
        return result_of(self.pipeline.run("connect", session))

    def mail(self, session: Session, sender: str | None = "a@example.org") -> Any:
        mailbox = None if sender is None else Mailbox(*sender.split("@"))
        self.transaction = Transaction(sender=mailbox)
        return result_of(self.pipeline.run("mail", session, self.transaction, mailbox))

    def rcpt(self, session: Session, address: str = "b@example.test") -> Any:
        recipient = Recipient(mailbox=Mailbox(*address.split("@")))
        return result_of(self.pipeline.run("rcpt", session, self.transaction, recipient))


def codes(outcome: Any) -> tuple[int, str] | None:
    return None if outcome.reply is None else (outcome.reply.code, outcome.reply.status)


# -- options -----------------------------------------------------------------------


def test_options_parse_window_and_defaults(tmp_path):
    """window takes seconds or a duration string; every limit is off by
    default; ipv4_prefix=32 and ipv6_prefix=64; fail open."""
    options = build_options(ratelimit.factory, {"window": "2s"}, "g.toml").options
    assert options.window == 2.0
    assert build_options(ratelimit.factory, {"window": 90}, "g.toml").options.window == 90.0
    default = ratelimit.Options()
    assert default.window == 3600.0
    assert all(getattr(default, name) == 0 for name in ratelimit.LIMITS)
    assert (default.ipv4_prefix, default.ipv6_prefix, default.exempt_trusted, default.on_store_error) == \
        (32, 64, True, "open")


@pytest.mark.parametrize("table, message", [
    ({"window": "soon"}, "expected a duration"),
    ({"window": 0}, "window must be positive"),
    ({"messages_per_ip": -1}, "messages_per_ip must be a whole number"),
    ({"messages_per_ip": "10"}, "expected int"),
    ({"ipv4_prefix": 33}, "ipv4_prefix must be 0..32"),
    ({"ipv6_prefix": 129}, "ipv6_prefix must be 0..128"),
    ({"on_store_error": "ignore"}, "on_store_error must be"),
    ({"connections_per_minute": 5}, "unknown key"),
])
def test_bad_options_are_config_errors(table, message):
    """A bad [plugins.ratelimit] value stops start-up with a line naming it."""
    with pytest.raises(ConfigError, match=message):
        build_options(ratelimit.factory, table, "g.toml")


def test_registry_finds_the_plugin(tmp_path):
    """"ratelimit" in a listener's plugin list is found by discovery."""
    doc = base_config(tmp_path)
    doc["listener"][0]["plugins"] = ["relay_guard", "ratelimit"]
    doc["plugins"] = {"ratelimit": {"messages_per_ip": 3}}
    registry = PluginRegistry(parse_config(doc, str(tmp_path / "g.toml")))
    assert registry.settings["ratelimit"].options.messages_per_ip == 3


def test_format_duration_and_client_network():
    """Durations print compactly; networks are cut to the prefix and
    IPv4-mapped IPv6 addresses count as IPv4."""
    assert [ratelimit.format_duration(s) for s in (3600, 90, 2, 2.5, 86400)] == ["1h", "90s", "2s", "2.5s", "1d"]
    assert ratelimit.client_network("192.0.2.77", 32, 64) == "192.0.2.77"
    assert ratelimit.client_network("192.0.2.77", 24, 64) == "192.0.2.0/24"
    assert ratelimit.client_network("::ffff:192.0.2.77", 24, 64) == "192.0.2.0/24"
    assert ratelimit.client_network("2001:db8:1:2:3::4", 32, 64) == "2001:db8:1:2::/64"


# -- limits ------------------------------------------------------------------------


def test_messages_per_ip_limit_and_window_reset(tmp_path):
    """messages_per_ip = 2: the third MAIL in the window gets 451 4.7.1
    naming the limit; once the window (fixed, from the first message)
    has passed, MAIL is accepted again."""
    h = Harness(tmp_path, {"messages_per_ip": 2, "window": "10s"})
    session = h.session()
    assert h.mail(session).action is Action.CONTINUE
    h.clock.advance(5)
    assert h.mail(session).action is Action.CONTINUE
    refused = h.mail(session)
    assert codes(refused) == (451, "4.7.1")
    assert refused.reply.text == ("Rate limit exceeded: too many messages from 192.0.2.10 "
                                  "(limit 2 per 10s), try again later")
    assert [r.result for r in h.transaction.results] == ["fail"]
    h.clock.advance(5)  # 10 s after the first message: a new window
    assert h.mail(session).action is Action.CONTINUE
    assert h.mail(session).action is Action.CONTINUE
    assert h.mail(session).failed


def test_recipients_per_ip_counted_at_rcpt(tmp_path):
    """recipients_per_ip = 3 counts RCPT commands across transactions."""
    h = Harness(tmp_path, {"recipients_per_ip": 3, "window": 60})
    session = h.session()
    h.mail(session)
    assert [h.rcpt(session, f"u{i}@example.test").failed for i in range(2)] == [False, False]
    assert h.mail(session).action is Action.CONTINUE  # no message limit set
    assert h.rcpt(session).failed is False
    refused = h.rcpt(session)
    assert codes(refused) == (451, "4.7.1") and "too many recipients from 192.0.2.10" in refused.reply.text


def test_ip_prefix_groups_clients(tmp_path):
    """With ipv4_prefix = 24 and ipv6_prefix = 64, addresses of one network
    share a counter and other networks have their own."""
    h = Harness(tmp_path, {"messages_per_ip": 1, "ipv4_prefix": 24, "window": 60})
    assert not h.mail(h.session("198.51.100.1")).failed
    refused = h.mail(h.session("198.51.100.200"))
    assert refused.failed and "from 198.51.100.0/24" in refused.reply.text
    assert not h.mail(h.session("198.51.101.1")).failed
    assert not h.mail(h.session("2001:db8::1")).failed
    assert h.mail(h.session("2001:db8::ffff:1")).failed
    assert not h.mail(h.session("2001:db8:0:1::1")).failed


def test_per_user_limits_apply_to_authenticated_sessions_only(tmp_path):
    """messages_per_user and recipients_per_user count per AUTH user, across
    client addresses; unauthenticated sessions are not counted per user."""
    h = Harness(tmp_path, {"messages_per_user": 1, "recipients_per_user": 1, "window": 60})
    alice_home = h.session("192.0.2.1", auth_user="alice")
    assert not h.mail(alice_home).failed
    assert not h.rcpt(alice_home).failed
    assert h.rcpt(alice_home).failed
    refused = h.mail(h.session("203.0.113.9", auth_user="alice"))
    assert refused.failed and "too many messages for user alice" in refused.reply.text
    assert not h.mail(h.session("192.0.2.1", auth_user="bob")).failed
    anonymous = h.session("192.0.2.1")
    assert [h.mail(anonymous).failed for _ in range(3)] == [False, False, False]


def test_per_sender_domain_limits(tmp_path):
    """messages_per_sender_domain counts MAIL FROM domains (case-folded);
    the null sender is not counted per domain."""
    h = Harness(tmp_path, {"messages_per_sender_domain": 2, "recipients_per_sender_domain": 2, "window": 60})
    session = h.session()
    assert not h.mail(session, "a@Example.ORG").failed
    assert not h.mail(session, "b@example.org").failed
    refused = h.mail(session, "c@example.org")
    assert refused.failed and "from sender domain example.org" in refused.reply.text
    assert not h.mail(session, "a@other.example").failed
    assert [h.mail(session, None).failed for _ in range(3)] == [False, False, False]
    h.mail(session, "x@third.example")
    assert [h.rcpt(session).failed for _ in range(3)] == [False, False, True]


def test_connections_per_ip_gives_421_and_disconnect(tmp_path):
    """connections_per_ip = 2 per window: the third connection gets
    421 4.7.0 with disconnect; the count is a connection rate."""
    h = Harness(tmp_path, {"connections_per_ip": 2, "window": "1m"})
    assert [h.connect(h.session()).failed for _ in range(2)] == [False, False]
    refused = h.connect(h.session())
    assert codes(refused) == (421, "4.7.0") and refused.disconnect
    assert "too many connections from 192.0.2.10 (limit 2 per 1m)" in refused.reply.text
    h.clock.advance(60)
    assert not h.connect(h.session()).failed


def test_trusted_clients_are_exempt_unless_configured(tmp_path):
    """Clients in trusted_networks are not counted with exempt_trusted
    (default); with exempt_trusted = false they are."""
    h = Harness(tmp_path, {"messages_per_ip": 1, "window": 60}, trusted=["192.0.2.0/24"])
    session = h.session("192.0.2.5")
    assert [h.mail(session).failed for _ in range(3)] == [False, False, False]
    assert [r.detail for r in h.transaction.results] == ["trusted"]
    strict = Harness(tmp_path, {"messages_per_ip": 1, "window": 60, "exempt_trusted": False},
                     trusted=["192.0.2.0/24"])
    assert [strict.mail(session).failed for _ in range(2)] == [False, True]


def test_no_limit_for_a_stage_means_no_store_call(tmp_path):
    """With only message limits set, RCPT and connect do not touch the store."""
    store = FailingStore()
    h = Harness(tmp_path, {"messages_per_ip": 5}, store=store)
    assert not h.connect(h.session()).failed
    assert store.calls == 0


def test_warn_mode_only_logs(tmp_path):
    """mode = "warn": the would-be 451 is logged, the command passes."""
    h = Harness(tmp_path, {"messages_per_ip": 1, "mode": "warn"})
    session = h.session()
    h.mail(session)
    with capturedLogs() as events:
        assert not h.mail(session).failed
    assert any("mode=warn" in e["log_format"] for e in events)


# -- store errors ----------------------------------------------------------------------


def test_store_error_fails_open_with_a_log_line(tmp_path):
    """on_store_error = "open": a failing store lets MAIL through and logs
    a warning that names the reason and the client."""
    h = Harness(tmp_path, {"messages_per_ip": 1}, store=FailingStore())
    with capturedLogs() as events:
        outcome = h.mail(h.session())
    assert outcome.action is Action.CONTINUE
    warnings = [e for e in events if e["log_level"] == LogLevel.warn]
    assert len(warnings) == 1
    assert warnings[0]["how"] == "open" and "not connected" in warnings[0]["reason"]
    assert warnings[0]["client"] == "192.0.2.10"


def test_store_error_fails_closed(tmp_path):
    """on_store_error = "closed": MAIL and RCPT get 451 4.3.0, a new
    connection 421 4.3.0 with disconnect."""
    h = Harness(tmp_path, {"messages_per_ip": 1, "recipients_per_ip": 1, "connections_per_ip": 1,
                           "on_store_error": "closed"}, store=FailingStore())
    session = h.session()
    assert codes(h.mail(session)) == (451, "4.3.0")
    assert codes(h.rcpt(session)) == (451, "4.3.0")
    refused = h.connect(session)
    assert codes(refused) == (421, "4.3.0") and refused.disconnect


def test_store_error_log_is_throttled(tmp_path):
    """While the store stays down the warning is written once a minute,
    with the count of failures in between."""
    h = Harness(tmp_path, {"messages_per_ip": 1}, store=FailingStore())
    with capturedLogs() as events:
        for _ in range(5):
            h.mail(h.session())
        h.clock.advance(ratelimit.LOG_EVERY)
        h.mail(h.session())
    warnings = [e for e in events if e["log_level"] == LogLevel.warn]
    assert [w["suppressed"] for w in warnings] == [0, 4]


def test_pending_store_is_bounded_by_the_plugin_timeout(tmp_path):
    """A store that never answers cannot hang the session: the pipeline's
    per-plugin timeout answers 451 4.4.5 (the store's own timeout, shorter,
    normally answers first)."""

    class HungStore(FailingStore):
        def _fail(self, *args: Any, **kwargs: Any) -> defer.Deferred:
            return defer.Deferred()

        incr = _fail

    h = Harness(tmp_path, {"messages_per_ip": 1}, store=HungStore())
    session = h.session()
    mailbox = Mailbox("a", "example.org")
    pending = h.pipeline.run("mail", session, Transaction(sender=mailbox), mailbox)
    assert isinstance(pending, defer.Deferred) and not pending.called
    h.clock.advance(5.0)
    assert codes(result_of(pending)) == (451, "4.4.5")
