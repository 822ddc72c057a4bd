"""Tests for plugins/greylist.py through the real L{Pipeline}, with time
under a C{Clock} (the plugin reads C{context.clock}) and state in a
L{MemoryStore} on the same clock.

The end-to-end test (first sight 451, retry after a real one-second
delay) is in tests/e2e/test_policy_state.py.
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
from plugins import greylist

DAY = 86400.0


class FailingStore:
    """A store whose every call fails, like Redis down."""

    def _fail(self, *args: Any, **kwargs: Any) -> defer.Deferred:
        return defer.fail(StoreError("Redis at 127.0.0.1:1 did not answer GET within 0.5s"))

    incr = get = set = delete = sadd = sismember = _fail


def result_of(value: Any) -> Any:
    if not isinstance(value, defer.Deferred):
        return value
    results: list[Any] = []
    value.addBoth(results.append)
    assert results, "still pending"
    return results[0]


class Harness:
    """The plugin in a one-listener pipeline with a Clock and a store."""

    def __init__(self, tmp_path: Path, options: dict[str, Any] | None = None, store: Any = None,
                 trusted: list[str] | None = None) -> None:
        from tests.support import base_config

        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        doc = base_config(tmp_path, server={"trusted_networks": trusted or []})
        path = str(tmp_path / "gateway.toml")
        config = parse_config(doc, path)
        settings = build_options(greylist.factory, options or {}, path)
        self.store = store if store is not None else MemoryStore(self.clock)
        context = PluginContext("greylist", self.clock, None, config, lambda f, *a: f(*a), self.store)
        self.plugin = greylist.factory.build(settings.options, context)
        self.pipeline = Pipeline("mx", [PluginSlot("greylist", self.plugin, settings.mode, 5.0)], self.clock)

    def rcpt(self, peer: str = "192.0.2.10", sender: str | None = "a@example.org",
             recipient: str = "b@example.test", auth_user: str | None = None) -> Any:
        session = Session(id="s1", listener="mx", peer=peer, auth_user=auth_user)
        mailbox = None if sender is None else Mailbox(*sender.rsplit("@", 1))
        self.transaction = Transaction(sender=mailbox)
        rcpt = Recipient(mailbox=Mailbox(*recipient.rsplit("@", 1)))
        return result_of(self.pipeline.run("rcpt", session, self.transaction, rcpt))

    def results(self) -> list[tuple[str, str]]:
        return [(r.result, r.detail) for r in self.transaction.results]


def greylisted(outcome: Any) -> bool:
    return (outcome.action is Action.TEMPFAIL and outcome.reply.code == 451
            and outcome.reply.status == "4.7.1" and outcome.reply.text.startswith("Greylisted"))


# -- options ---------------------------------------------------------------------------


def test_default_options():
    """Defaults: delay 5 min, lifetime 36 days after a retry, 1 day before,
    auto-allow after 5 passes for 7 days, /24 and /64, fail open."""
    options = greylist.Options()
    assert (options.delay, options.lifetime, options.pending_lifetime) == (300.0, 36 * DAY, DAY)
    assert (options.auto_allow_after, options.auto_allow_lifetime) == (5, 7 * DAY)
    assert (options.ipv4_prefix, options.ipv6_prefix, options.on_store_error) == (24, 64, "open")


@pytest.mark.parametrize("table, message", [
    ({"delay": "2d"}, "pending_lifetime .* must be longer than delay"),
    ({"lifetime": 0}, "must be positive"),
    ({"auto_allow_after": -1}, "auto_allow_after must be"),
    ({"allow_networks": ["192.0.2.300/24"]}, "allow_networks: bad network"),
    ({"ipv4_prefix": 40}, "ipv4_prefix must be 0..32"),
    ({"on_store_error": "maybe"}, "on_store_error must be"),
    ({"whitelist": []}, "unknown key"),
])
def test_bad_options_are_config_errors(table, message):
    """A bad [plugins.greylist] value stops start-up with a line naming it."""
    with pytest.raises(ConfigError, match=message):
        build_options(greylist.factory, table, "g.toml")


def test_registry_finds_the_plugin(tmp_path):
    """"greylist" in a listener's plugin list is found by discovery."""
    from tests.support import base_config

    doc = base_config(tmp_path)
    doc["listener"][0]["plugins"] = ["relay_guard", "greylist"]
    doc["plugins"] = {"greylist": {"delay": "1m"}}
    registry = PluginRegistry(parse_config(doc, str(tmp_path / "g.toml")))
    assert registry.settings["greylist"].options.delay == 60.0


def test_triplet_parts():
    """Networks are /24 and /64 by default; senders are lower-cased with
    the BATV tag removed; <> is the empty sender."""
    assert greylist.client_network("192.0.2.77", 24, 64) == "192.0.2.0/24"
    assert greylist.client_network("::ffff:192.0.2.77", 24, 64) == "192.0.2.0/24"
    assert greylist.client_network("2001:db8::7", 24, 64) == "2001:db8::/64"
    assert greylist.normal_sender(Mailbox("prvs=1234abcd=Bounce", "Example.ORG")) == "bounce@example.org"
    assert greylist.normal_sender(None) == ""
    assert greylist.triplet_key("n", "s", "r") != greylist.triplet_key("n", "sr", "")


# -- the greylisting cycle --------------------------------------------------------------


def test_first_sight_early_retry_then_pass(tmp_path):
    """First sight: 451 4.7.1 with the delay; a retry before the delay:
    451 with the time left (first sight kept); after the delay: passes,
    and from then on the triplet passes at once."""
    h = Harness(tmp_path)
    first = h.rcpt()
    assert greylisted(first) and first.reply.text == "Greylisted, try again in 300 seconds"
    assert h.results() == [("greylisted", "new")]
    h.clock.advance(100)
    early = h.rcpt()
    assert greylisted(early) and early.reply.text == "Greylisted, try again in 200 seconds"
    h.clock.advance(200)
    assert h.rcpt().action is Action.CONTINUE
    assert h.results() == [("pass", "retried after 300s")]
    h.clock.advance(1)
    assert h.rcpt().action is Action.CONTINUE
    assert h.results() == [("pass", "known")]


def test_each_part_of_the_triplet_counts(tmp_path):
    """Another recipient, another sender or another network is a new
    triplet; another address of the same /24 is the same client."""
    h = Harness(tmp_path, {"auto_allow_after": 0})
    h.rcpt()
    h.clock.advance(300)
    assert not h.rcpt().failed
    assert greylisted(h.rcpt(recipient="other@example.test"))
    assert greylisted(h.rcpt(sender="other@example.org"))
    assert greylisted(h.rcpt(sender=None))
    assert greylisted(h.rcpt(peer="198.51.100.10"))
    assert not h.rcpt(peer="192.0.2.200").failed
    assert not h.rcpt(sender="A@EXAMPLE.org", recipient="B@example.test").failed


def test_batv_senders_retry_as_one_triplet(tmp_path):
    """A BATV-tagged bounce address changes its tag on every try; the
    retry still matches the first sight."""
    h = Harness(tmp_path)
    assert greylisted(h.rcpt(sender="prvs=0123abcd=bounces@lists.example"))
    h.clock.advance(301)
    assert not h.rcpt(sender="prvs=4567ef01=bounces@lists.example").failed


def test_ipv6_clients_are_grouped_by_64(tmp_path):
    """An IPv6 client that retries from another address of its /64 passes."""
    h = Harness(tmp_path)
    assert greylisted(h.rcpt(peer="2001:db8:1:2::1"))
    h.clock.advance(300)
    assert not h.rcpt(peer="2001:db8:1:2::99").failed
    assert greylisted(h.rcpt(peer="2001:db8:1:3::1"))


def test_pending_record_expires_after_pending_lifetime(tmp_path):
    """A first sight not retried within pending_lifetime (1 day) is
    forgotten: the next try is a first sight again."""
    h = Harness(tmp_path)
    h.rcpt()
    h.clock.advance(DAY)
    assert greylisted(h.rcpt())
    assert h.results() == [("greylisted", "new")]


def test_passed_triplet_lifetime_is_renewed_by_use(tmp_path):
    """A passed triplet lives 36 days from its last use: used every 35
    days it keeps passing; unused for 36 days it is greylisted again."""
    h = Harness(tmp_path, {"auto_allow_after": 0})
    h.rcpt()
    h.clock.advance(300)
    h.rcpt()
    for _ in range(3):
        h.clock.advance(35 * DAY)
        assert not h.rcpt().failed
    h.clock.advance(36 * DAY)
    assert greylisted(h.rcpt())


def test_clients_that_retried_are_auto_allowed_for_a_while(tmp_path):
    """After auto_allow_after passes, the client network's new triplets
    pass at once, for auto_allow_lifetime since its last message."""
    h = Harness(tmp_path, {"auto_allow_after": 2, "auto_allow_lifetime": "1d"})
    for recipient in ("one@example.test", "two@example.test"):
        assert greylisted(h.rcpt(recipient=recipient))
    h.clock.advance(300)
    assert not h.rcpt(recipient="one@example.test").failed
    assert greylisted(h.rcpt(recipient="new@example.test"))  # one pass is not enough
    assert not h.rcpt(recipient="two@example.test").failed
    assert not h.rcpt(recipient="new@example.test").failed
    assert h.results() == [("pass", "auto-allowed")]
    assert not h.rcpt(peer="192.0.2.99", recipient="brand-new@example.test").failed
    assert greylisted(h.rcpt(peer="198.51.100.1"))  # another network is not
    h.clock.advance(DAY - 1)
    assert not h.rcpt(recipient="later@example.test").failed  # renewed by use
    h.clock.advance(DAY)
    assert greylisted(h.rcpt(recipient="after-expiry@example.test"))


def test_auto_allow_can_be_turned_off(tmp_path):
    """auto_allow_after = 0: however often a client passed, new triplets
    are greylisted."""
    h = Harness(tmp_path, {"auto_allow_after": 0})
    for i in range(6):
        h.rcpt(recipient=f"u{i}@example.test")
    h.clock.advance(300)
    for i in range(6):
        assert not h.rcpt(recipient=f"u{i}@example.test").failed
    assert greylisted(h.rcpt(recipient="new@example.test"))


# -- exemptions ------------------------------------------------------------------------------


def test_authenticated_trusted_and_allowed_clients_are_not_greylisted(tmp_path):
    """Authenticated sessions, trusted_networks and allow_networks pass
    without a store lookup, recorded as skip; exempt_trusted = false
    greylists authenticated and trusted clients too (not allow_networks)."""
    h = Harness(tmp_path, {"allow_networks": ["203.0.113.0/24"]}, trusted=["198.51.100.0/24"])
    assert not h.rcpt(auth_user="alice").failed
    assert h.results() == [("skip", "authenticated")]
    assert not h.rcpt(peer="198.51.100.7").failed
    assert h.results() == [("skip", "trusted")]
    assert not h.rcpt(peer="203.0.113.7").failed
    assert h.results() == [("skip", "allowed")]
    strict = Harness(tmp_path, {"exempt_trusted": False, "allow_networks": ["203.0.113.0/24"]},
                     trusted=["198.51.100.0/24"])
    assert greylisted(strict.rcpt(auth_user="alice"))
    assert greylisted(strict.rcpt(peer="198.51.100.7"))
    assert not strict.rcpt(peer="203.0.113.7").failed


# -- store errors --------------------------------------------------------------------------------


def test_store_error_fails_open_with_a_log_line(tmp_path):
    """With the store down and on_store_error = "open", the recipient is
    accepted and a warning names the reason."""
    h = Harness(tmp_path, store=FailingStore())
    with capturedLogs() as events:
        assert h.rcpt().action is Action.CONTINUE
    warnings = [e for e in events if e["log_level"] == LogLevel.warn]
    assert len(warnings) == 1 and warnings[0]["how"] == "open"
    assert "did not answer" in warnings[0]["reason"]
    assert h.results() == [("error", "store unavailable")]


def test_store_error_fails_closed(tmp_path):
    """on_store_error = "closed": 451 4.3.0 while the store is down."""
    h = Harness(tmp_path, {"on_store_error": "closed"}, store=FailingStore())
    outcome = h.rcpt()
    assert (outcome.reply.code, outcome.reply.status) == (451, "4.3.0")


def test_warn_mode_lets_first_sight_through(tmp_path):
    """mode = "warn" logs the would-be 451 and accepts (a dry run before
    turning greylisting on), while still recording the triplet."""
    h = Harness(tmp_path, {"mode": "warn"})
    with capturedLogs() as events:
        assert not h.rcpt().failed
    assert any("mode=warn" in e["log_format"] for e in events)
    h.clock.advance(300)
    assert h.rcpt().action is Action.CONTINUE
    assert h.results()[0][0] == "pass"
