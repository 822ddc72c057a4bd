"""Tests for L{gateway.pipeline} (the stage runner) and the option
validation of L{gateway.registry.build_options}.

Pure units with fake plugins that declare their stages with
C{@implementer}; time is a L{Clock}, logs are captured with
L{capturedLogs}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from gateway import reply as R
from gateway.config import ConfigError
from gateway.interfaces import (
    IConnectCheck,
    IHeadersCheck,
    IHeloCheck,
    IMailCheck,
    IMessageCheck,
    IQueuedObserver,
    IRcptCheck,
    IRelayGate,
)
from gateway.pipeline import PASSED, Outcome, Pipeline, PluginSlot
from gateway.registry import PluginSettings, build_options
from gateway.reply import Reply
from gateway.verdict import CONTINUE, Action, accept, cont, reject, tempfail

SESSION, TXN, ARG = object(), object(), object()


# -- fakes --------------------------------------------------------------------


class Scripted:
    """A fake plugin: every check returns C{result} (called first when it is
    a callable) and records its arguments in C{calls}."""

    def __init__(self, result: Any = CONTINUE) -> None:
        self.result = result
        self.calls: list[tuple[str, tuple]] = []

    def _answer(self, stage: str, args: tuple) -> Any:
        self.calls.append((stage, args))
        return self.result(*args) if callable(self.result) else self.result

    def check_connect(self, session):
        return self._answer("connect", (session,))

    def check_helo(self, session, name):
        return self._answer("helo", (session, name))

    def check_mail(self, session, transaction, sender):
        return self._answer("mail", (session, transaction, sender))

    def check_relay(self, session, transaction, recipient):
        return self._answer("relay", (session, transaction, recipient))

    def check_rcpt(self, session, transaction, recipient):
        return self._answer("rcpt", (session, transaction, recipient))

    def check_headers(self, session, transaction, headers):
        return self._answer("headers", (session, transaction, headers))

    def check_message(self, session, transaction, message):
        return self._answer("message", (session, transaction, message))

    def message_queued(self, session, transaction, queue_id):
        return self._answer("queued", (session, transaction, queue_id))


@implementer(IMailCheck)
class MailCheck(Scripted):
    """Takes part in the MAIL stage only."""


@implementer(IRelayGate)
class RelayGate(Scripted):
    """A relay gate only."""


@implementer(IRcptCheck)
class RcptCheck(Scripted):
    """Takes part in the RCPT stage only."""


@implementer(IConnectCheck, IHeloCheck, IMailCheck, IRcptCheck, IHeadersCheck, IMessageCheck,
             IQueuedObserver)
class EveryStageButRelay(Scripted):
    """A policy plugin in every stage except the relay gate."""


def raise_error(*args):
    raise RuntimeError("plugin bug")


def pipeline(*plugins: tuple[str, Any] | PluginSlot, clock: Clock | None = None,
             soft_bounce: bool = False) -> Pipeline:
    slots = [p if isinstance(p, PluginSlot) else PluginSlot(p[0], p[1]) for p in plugins]
    return Pipeline("mx", slots, clock or Clock(), soft_bounce=soft_bounce)


def result_of(d: defer.Deferred) -> Any:
    """The result a fired Deferred holds (fails if it has not fired)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


# -- stage semantics ----------------------------------------------------------


def test_fakes_provide_their_interfaces():
    """The fakes really provide the interfaces they declare (verifyObject)."""
    verifyObject(IMailCheck, MailCheck())
    verifyObject(IRelayGate, RelayGate())
    assert not IRelayGate.providedBy(EveryStageButRelay())


def test_stage_lists_built_from_interfaces():
    """Each stage lists only the plugins providing its interface, in
    configured order."""
    p = pipeline(("a", MailCheck()), ("guard", RelayGate()), ("b", EveryStageButRelay()),
                 ("c", RcptCheck()))
    assert p.plugins_for("mail") == ("a", "b")
    assert p.plugins_for("relay") == ("guard",)
    assert p.plugins_for("rcpt") == ("b", "c")
    assert p.has("headers") and not pipeline(("a", MailCheck())).has("headers")


def test_empty_stage_passes():
    """A stage without plugins passes at once with no reply."""
    outcome = pipeline(("a", RcptCheck())).run("mail", SESSION, TXN, ARG)
    assert outcome == PASSED
    assert outcome.action is Action.CONTINUE and outcome.reply is None and not outcome.failed


def test_plugin_gets_stage_arguments():
    """The check method is called with the arguments given to run()."""
    plugin = MailCheck()
    pipeline(("a", plugin)).run("mail", SESSION, TXN, ARG)
    assert plugin.calls == [("mail", (SESSION, TXN, ARG))]


def test_continue_goes_on_to_next_plugin():
    """CONTINUE runs the next plugin; the second plugin's verdict decides."""
    first, second = MailCheck(CONTINUE), MailCheck(reject(text="No"))
    outcome = pipeline(("first", first), ("second", second)).run("mail", SESSION, TXN, ARG)
    assert len(first.calls) == 1 and len(second.calls) == 1
    assert outcome == Outcome(Action.REJECT, Reply(550, "5.7.1", "No"), plugin="second")


def test_all_continue_passes():
    """When every plugin says CONTINUE the stage passes with no reply."""
    outcome = pipeline(("a", MailCheck()), ("b", MailCheck())).run("mail", SESSION, TXN, ARG)
    assert outcome == PASSED


def test_first_accept_ends_stage():
    """The first ACCEPT ends the stage: later plugins are not asked."""
    later = MailCheck(reject())
    outcome = pipeline(("ok", MailCheck(accept())), ("later", later)).run("mail", SESSION, TXN, ARG)
    assert outcome.action is Action.ACCEPT
    assert outcome.plugin == "ok"
    assert outcome.reply is None
    assert not outcome.failed
    assert later.calls == []


def test_accept_reply_is_passed_on():
    """An ACCEPT with its own reply passes that reply on."""
    outcome = pipeline(("ok", MailCheck(accept(Reply(250, "2.1.0", "Welcome"))))).run(
        "mail", SESSION, TXN, ARG)
    assert outcome.reply == Reply(250, "2.1.0", "Welcome")


@pytest.mark.parametrize("verdict", [reject(554, "5.7.1", "Blocked"), tempfail(450, "4.2.0", "Busy")])
def test_reject_and_tempfail_end_stage_with_their_reply(verdict):
    """REJECT and TEMPFAIL end the stage with the verdict's reply."""
    later = MailCheck(accept())
    outcome = pipeline(("deny", MailCheck(verdict)), ("later", later)).run("mail", SESSION, TXN, ARG)
    assert outcome.action is verdict.action
    assert outcome.reply == verdict.reply
    assert outcome.failed
    assert outcome.plugin == "deny"
    assert later.calls == []


def test_disconnect_is_passed_on():
    """A verdict's disconnect flag reaches the outcome."""
    outcome = pipeline(("deny", MailCheck(reject(554, "5.7.1", "Bye", disconnect=True)))).run(
        "mail", SESSION, TXN, ARG)
    assert outcome.disconnect is True


def test_synchronous_plugins_give_an_outcome_not_a_deferred():
    """When every plugin answers at once, run() returns an Outcome."""
    outcome = pipeline(("a", MailCheck()), ("b", MailCheck(accept()))).run("mail", SESSION, TXN, ARG)
    assert isinstance(outcome, Outcome)
    assert not isinstance(outcome, defer.Deferred)


def test_already_fired_deferred_is_accepted():
    """A plugin may return an already fired Deferred."""
    d = pipeline(("a", MailCheck(lambda *a: defer.succeed(reject())))).run("mail", SESSION, TXN, ARG)
    assert result_of(d).action is Action.REJECT


def test_deferred_plugin_gives_a_deferred_and_keeps_order():
    """A Deferred-returning plugin makes run() return a Deferred; later
    plugins run only after it fired, and the stage result follows."""
    pending = defer.Deferred()
    later = MailCheck(reject(text="Later"))
    d = pipeline(("slow", MailCheck(pending)), ("later", later)).run("mail", SESSION, TXN, ARG)
    assert isinstance(d, defer.Deferred)
    assert not d.called
    assert later.calls == []
    pending.callback(CONTINUE)
    assert len(later.calls) == 1
    assert result_of(d) == Outcome(Action.REJECT, Reply(550, "5.7.1", "Later"), plugin="later")


def test_deferred_answer_cancels_timer():
    """A Deferred that fires in time leaves no timer behind."""
    clock = Clock()
    pending = defer.Deferred()
    d = pipeline(("slow", MailCheck(pending)), clock=clock).run("mail", SESSION, TXN, ARG)
    assert len(clock.getDelayedCalls()) == 1
    pending.callback(accept())
    assert clock.getDelayedCalls() == []
    assert result_of(d).action is Action.ACCEPT


def test_two_deferred_plugins_in_a_row():
    """Several Deferred plugins run one after the other."""
    first, second = defer.Deferred(), defer.Deferred()
    p2 = MailCheck(second)
    d = pipeline(("one", MailCheck(first)), ("two", p2)).run("mail", SESSION, TXN, ARG)
    assert p2.calls == []
    first.callback(cont((("X-One", "1"),)))
    assert len(p2.calls) == 1
    second.callback(cont((("X-Two", "2"),)))
    assert result_of(d) == Outcome(Action.CONTINUE, add_headers=(("X-One", "1"), ("X-Two", "2")))


# -- failures fail closed -------------------------------------------------------


def test_raising_plugin_gives_451_430_and_is_logged():
    """A plugin that raises fails closed with 451 4.3.0 and the traceback
    is logged; later plugins are not asked."""
    later = MailCheck(accept())
    with capturedLogs() as events:
        outcome = pipeline(("boom", MailCheck(raise_error)), ("later", later)).run(
            "mail", SESSION, TXN, ARG)
    assert outcome == Outcome(Action.TEMPFAIL, R.PLUGIN_FAILED, plugin="boom")
    assert outcome.reply.to_bytes().startswith(b"451 4.3.0 ")
    assert later.calls == []
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(RuntimeError)
    assert failures[0]["plugin"] == "boom"
    assert failures[0]["log_level"] == LogLevel.critical


def test_errback_gives_451_430_and_is_logged():
    """A plugin whose Deferred fails is treated like one that raised."""
    pending = defer.Deferred()
    with capturedLogs() as events:
        d = pipeline(("boom", MailCheck(pending))).run("mail", SESSION, TXN, ARG)
        pending.errback(ValueError("lookup failed"))
    assert result_of(d) == Outcome(Action.TEMPFAIL, R.PLUGIN_FAILED, plugin="boom")
    failures = [e for e in events if "log_failure" in e]
    assert [f["log_failure"].type for f in failures] == [ValueError]


def test_raising_relay_gate_is_not_a_permit():
    """A relay gate that raises gives 451 4.3.0, never relay."""
    with capturedLogs():
        outcome = pipeline(("gate", RelayGate(raise_error))).run("relay", SESSION, TXN, ARG)
    assert outcome.action is Action.TEMPFAIL
    assert outcome.reply == R.PLUGIN_FAILED


def test_pending_plugin_times_out_with_451_445():
    """A plugin whose Deferred never fires gives 451 4.4.5 after its own
    timeout, measured on the injected clock, and a log line."""
    clock = Clock()
    pending = defer.Deferred()
    later = MailCheck(accept())
    with capturedLogs() as events:
        d = pipeline(PluginSlot("slow", MailCheck(pending), timeout=5.0), ("later", later),
                     clock=clock).run("mail", SESSION, TXN, ARG)
        clock.advance(4.999)
        assert not d.called
        clock.advance(0.001)
    assert result_of(d) == Outcome(Action.TEMPFAIL, R.PLUGIN_TIMEOUT, plugin="slow")
    assert R.PLUGIN_TIMEOUT.to_bytes().startswith(b"451 4.4.5 ")
    assert later.calls == []
    warnings = [e for e in events if e.get("plugin") == "slow" and e["log_level"] == LogLevel.warn]
    assert len(warnings) == 1
    assert warnings[0]["timeout"] == 5.0


def test_late_result_after_timeout_is_ignored():
    """A verdict that arrives after the timeout changes nothing and raises
    nothing in the plugin (its Deferred was cancelled)."""
    clock = Clock()
    pending = defer.Deferred()
    with capturedLogs():
        d = pipeline(PluginSlot("slow", MailCheck(pending), timeout=2.0), clock=clock).run(
            "mail", SESSION, TXN, ARG)
        clock.advance(2.0)
        outcome = result_of(d)
        pending.callback(accept())  # must not raise AlreadyCalledError
    assert outcome.reply == R.PLUGIN_TIMEOUT
    assert clock.getDelayedCalls() == []


def test_timeout_cancels_the_plugin_deferred():
    """At the timeout the plugin's Deferred is cancelled, so its canceller
    can stop the work (e.g. a DNS query)."""
    clock = Clock()
    cancelled = []
    pending = defer.Deferred(canceller=cancelled.append)
    with capturedLogs():
        pipeline(PluginSlot("slow", MailCheck(pending), timeout=1.0), clock=clock).run(
            "mail", SESSION, TXN, ARG)
        clock.advance(1.0)
    assert cancelled == [pending]


@pytest.mark.parametrize("bad", ["reject", Reply(550, "5.7.1", "x"), True, 550, object(), Action.ACCEPT])
def test_non_verdict_result_fails_closed(bad):
    """A plugin returning something that is not a Verdict gives 451 4.3.0
    and an error log line."""
    with capturedLogs() as events:
        outcome = pipeline(("odd", MailCheck(bad))).run("mail", SESSION, TXN, ARG)
    assert outcome == Outcome(Action.TEMPFAIL, R.PLUGIN_FAILED, plugin="odd")
    errors = [e for e in events if e.get("plugin") == "odd" and e["log_level"] == LogLevel.error]
    assert len(errors) == 1


def test_non_verdict_from_deferred_fails_closed():
    """A Deferred firing with a non-Verdict also fails closed."""
    pending = defer.Deferred()
    with capturedLogs():
        d = pipeline(("odd", MailCheck(pending))).run("mail", SESSION, TXN, ARG)
        pending.callback("ok")
    assert result_of(d).reply == R.PLUGIN_FAILED


def test_outcome_returned_by_plugin_fails_closed():
    """An internal Outcome returned by a plugin is not a Verdict either: it
    fails closed instead of ending the stage as the plugin says."""
    sneaky = Outcome(Action.REJECT, Reply(550, "5.7.1", "No"))
    with capturedLogs():
        outcome = pipeline(PluginSlot("odd", MailCheck(sneaky), mode="warn")).run(
            "mail", SESSION, TXN, ARG)
    assert outcome.reply == R.PLUGIN_FAILED


# -- the relay gate -------------------------------------------------------------


def test_relay_denied_without_gates():
    """With no relay gate at all, every recipient gets 554 5.7.1."""
    outcome = pipeline(("policy", EveryStageButRelay(accept()))).run("relay", SESSION, TXN, ARG)
    assert outcome.action is Action.REJECT
    assert outcome.reply == R.RELAY_DENIED
    assert outcome.reply.to_bytes() == b"554 5.7.1 Relay access denied\r\n"


def test_relay_denied_when_gates_only_continue():
    """Gates that have no opinion do not permit relay."""
    outcome = pipeline(("g1", RelayGate()), ("g2", RelayGate())).run("relay", SESSION, TXN, ARG)
    assert outcome.reply == R.RELAY_DENIED


def test_relay_permitted_by_gate_accept():
    """An ACCEPT from a relay gate permits the recipient."""
    outcome = pipeline(("g1", RelayGate()), ("g2", RelayGate(accept()))).run("relay", SESSION, TXN, ARG)
    assert outcome.action is Action.ACCEPT
    assert outcome.plugin == "g2"


def test_relay_gate_reject_reply_is_used():
    """A gate's own REJECT reply is sent instead of the default."""
    outcome = pipeline(("g", RelayGate(reject(550, "5.7.27", "Sender domain has null MX")))).run(
        "relay", SESSION, TXN, ARG)
    assert outcome.reply == Reply(550, "5.7.27", "Sender domain has null MX")


def test_accept_in_other_stages_never_opens_relay():
    """A policy plugin that ACCEPTs in every other stage leaves relay
    denied: the relay lattice is separate."""
    policy = EveryStageButRelay(accept())
    p = pipeline(("policy", policy), ("gate", RelayGate()))
    assert p.run("mail", SESSION, TXN, ARG).action is Action.ACCEPT
    assert p.run("rcpt", SESSION, TXN, ARG).action is Action.ACCEPT
    relay = p.run("relay", SESSION, TXN, ARG)
    assert relay.action is Action.REJECT
    assert relay.reply == R.RELAY_DENIED
    assert [stage for stage, _ in policy.calls] == ["mail", "rcpt"]


def test_relay_denied_after_deferred_gate_continues():
    """Default deny also applies when a gate answered through a Deferred."""
    pending = defer.Deferred()
    d = pipeline(("g", RelayGate(pending))).run("relay", SESSION, TXN, ARG)
    pending.callback(CONTINUE)
    assert result_of(d).reply == R.RELAY_DENIED


def test_relay_gate_in_warn_mode_cannot_deny_but_still_cannot_permit():
    """A warn-mode gate's REJECT is only logged, and relay stays denied by
    default."""
    with capturedLogs():
        outcome = pipeline(PluginSlot("g", RelayGate(reject(550, "5.7.1", "x")), mode="warn")).run(
            "relay", SESSION, TXN, ARG)
    assert outcome.reply == R.RELAY_DENIED


# -- mode = "warn" and soft_bounce --------------------------------------------


@pytest.mark.parametrize("verdict", [reject(), tempfail()])
def test_warn_mode_turns_rejection_into_continue(verdict):
    """In warn mode a REJECT or TEMPFAIL is logged and the stage goes on."""
    later = MailCheck()
    with capturedLogs() as events:
        outcome = pipeline(PluginSlot("trial", MailCheck(verdict), mode="warn"), ("later", later)).run(
            "mail", SESSION, TXN, ARG)
    assert outcome == PASSED
    assert len(later.calls) == 1
    logged = [e for e in events if e.get("plugin") == "trial"]
    assert len(logged) == 1
    assert logged[0]["reply"] == str(verdict.reply)


def test_warn_mode_still_accepts():
    """Warn mode only affects rejections; an ACCEPT still ends the stage."""
    outcome = pipeline(PluginSlot("trial", MailCheck(accept()), mode="warn"), ("later", MailCheck(reject()))).run(
        "mail", SESSION, TXN, ARG)
    assert outcome.action is Action.ACCEPT


def test_warn_mode_applies_to_deferred_verdicts():
    """A rejection arriving through a Deferred is also only logged in warn
    mode."""
    pending = defer.Deferred()
    with capturedLogs():
        d = pipeline(PluginSlot("trial", MailCheck(pending), mode="warn")).run("mail", SESSION, TXN, ARG)
        pending.callback(reject())
    assert result_of(d) == PASSED


def test_soft_bounce_turns_5xx_into_4xx():
    """With soft_bounce a plugin's 5xx becomes the matching 4xx."""
    outcome = pipeline(("deny", MailCheck(reject(554, "5.7.1", "Blocked"))), soft_bounce=True).run(
        "mail", SESSION, TXN, ARG)
    assert outcome.reply == Reply(454, "4.7.1", "Blocked")
    assert outcome.failed


def test_soft_bounce_softens_default_relay_denial():
    """With soft_bounce the default relay denial is 454 4.7.1."""
    outcome = pipeline(("gate", RelayGate()), soft_bounce=True).run("relay", SESSION, TXN, ARG)
    assert outcome.reply == Reply(454, "4.7.1", "Relay access denied")
    assert outcome.action is not Action.ACCEPT


def test_soft_bounce_leaves_4xx_and_accepts_alone():
    """soft_bounce does not touch 4xx or positive replies."""
    p = pipeline(("t", MailCheck(tempfail(450, "4.2.0", "Busy"))), soft_bounce=True)
    assert p.run("mail", SESSION, TXN, ARG).reply == Reply(450, "4.2.0", "Busy")
    p = pipeline(("a", MailCheck(accept(Reply(250, "2.1.0", "Hi")))), soft_bounce=True)
    assert p.run("mail", SESSION, TXN, ARG).reply == Reply(250, "2.1.0", "Hi")


def test_without_soft_bounce_5xx_stays():
    """Without soft_bounce a 5xx stays a 5xx."""
    outcome = pipeline(("deny", MailCheck(reject(554, "5.7.1", "Blocked")))).run("mail", SESSION, TXN, ARG)
    assert outcome.reply == Reply(554, "5.7.1", "Blocked")


# -- add_headers ------------------------------------------------------------------


def test_add_headers_accumulate_in_order():
    """Headers from CONTINUE verdicts and the final verdict accumulate in
    plugin order."""
    p = pipeline(
        ("a", MailCheck(cont((("X-A", "1"),)))),
        ("b", MailCheck(cont((("X-B", "2"), ("X-B2", "3"))))),
        ("c", MailCheck(accept(add_headers=(("X-C", "4"),)))),
        ("d", MailCheck(cont((("X-D", "never"),)))),
    )
    outcome = p.run("mail", SESSION, TXN, ARG)
    assert outcome.action is Action.ACCEPT
    assert outcome.add_headers == (("X-A", "1"), ("X-B", "2"), ("X-B2", "3"), ("X-C", "4"))


def test_add_headers_without_decision():
    """Headers also come back when no plugin decided."""
    outcome = pipeline(("a", MailCheck(cont((("X-A", "1"),)))), ("b", MailCheck())).run(
        "mail", SESSION, TXN, ARG)
    assert outcome == Outcome(Action.CONTINUE, add_headers=(("X-A", "1"),))


def test_add_headers_kept_on_rejection():
    """Headers gathered before a rejection are reported with it."""
    outcome = pipeline(("a", MailCheck(cont((("X-A", "1"),)))), ("b", MailCheck(reject()))).run(
        "mail", SESSION, TXN, ARG)
    assert outcome.add_headers == (("X-A", "1"),)


def test_none_result_is_continue():
    """A plugin returning None is taken as CONTINUE (documented leniency)."""
    later = MailCheck(reject())
    outcome = pipeline(("quiet", MailCheck(None)), ("later", later)).run("mail", SESSION, TXN, ARG)
    assert outcome.action is Action.REJECT
    assert len(later.calls) == 1


# -- registry.build_options -------------------------------------------------------


@dataclass(frozen=True)
class FakeOptions:
    """Options of the fake plugin."""

    senders: list[str] = field(default_factory=list)
    limit: int = 10
    ratio: float = 0.5
    enabled: bool = True
    label: str | None = None
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.limit > 1000:
            raise ValueError("limit must be at most 1000")


@dataclass(frozen=True)
class RequiredOptions:
    """Options with a required field."""

    zone: str


class FakeFactory:
    """Just enough of an IPluginFactory for build_options."""

    def __init__(self, options_type: Any = FakeOptions, name: str = "fake") -> None:
        self.name = name
        self.options_type = options_type


CFG = "/etc/gw.toml"


def options_error(table: dict[str, Any], factory: Any = None) -> str:
    with pytest.raises(ConfigError) as info:
        build_options(factory or FakeFactory(), table, CFG)
    return str(info.value)


def test_build_options_defaults():
    """An empty table gives the dataclass defaults, enforce mode and the
    global timeout (None)."""
    assert build_options(FakeFactory(), {}, CFG) == PluginSettings(FakeOptions(), "enforce", None)


def test_build_options_values():
    """Values are checked and converted to the field types."""
    settings = build_options(FakeFactory(), {
        "senders": ["a@example.com"], "limit": 5, "ratio": 1, "enabled": False,
        "label": "x", "tags": ["t1", "t2"], "mode": "warn", "timeout": "5m",
    }, CFG)
    assert settings.options == FakeOptions(["a@example.com"], 5, 1.0, False, "x", ("t1", "t2"))
    assert isinstance(settings.options.ratio, float)
    assert settings.mode == "warn"
    assert settings.timeout == 300.0


def test_build_options_numeric_timeout():
    """A numeric timeout is seconds."""
    assert build_options(FakeFactory(), {"timeout": 2}, CFG).timeout == 2.0


def test_build_options_unknown_key():
    """An option the plugin does not declare is an error naming it."""
    assert options_error({"limt": 5}) == f"{CFG}: [plugins.fake] limt: unknown key"


@pytest.mark.parametrize("key, value, message", [
    ("limit", "10", "expected int"),
    ("limit", True, "got a boolean"),
    ("limit", 1.5, "expected int"),
    ("ratio", "half", "expected a number"),
    ("ratio", False, "expected a number"),
    ("enabled", 1, "expected bool"),
    ("senders", "a@example.com", "expected a list"),
    ("senders", ["a@example.com", 5], "expected str"),
    ("label", 5, "expected str"),
    ("tags", [1], "expected str"),
])
def test_build_options_wrong_type(key, value, message):
    """Wrong option types name the plugin table and the key."""
    text = options_error({key: value})
    assert text.startswith(f"{CFG}: [plugins.fake] {key}: ")
    assert message in text


@pytest.mark.parametrize("mode", ["block", "Warn", "", 1])
def test_build_options_bad_mode(mode):
    """mode must be "enforce" or "warn"."""
    text = options_error({"mode": mode})
    assert text.startswith(f"{CFG}: [plugins.fake] mode: must be \"enforce\" or \"warn\"")


@pytest.mark.parametrize("timeout", ["soon", -1, True, "5x"])
def test_build_options_bad_timeout(timeout):
    """A bad timeout names the key."""
    assert options_error({"timeout": timeout}).startswith(f"{CFG}: [plugins.fake] timeout: ")


def test_build_options_dataclass_validation():
    """A ValueError from the options type becomes a ConfigError."""
    assert options_error({"limit": 5000}) == f"{CFG}: [plugins.fake]: limit must be at most 1000"


def test_build_options_missing_required_option():
    """A required option that is missing is a ConfigError."""
    text = options_error({}, FakeFactory(RequiredOptions))
    assert text.startswith(f"{CFG}: [plugins.fake]: ")
    assert "zone" in text


def test_build_options_plugin_without_options():
    """A plugin without options_type takes only mode and timeout."""
    factory = FakeFactory(None, name="relay_guard")
    assert build_options(factory, {"mode": "warn", "timeout": 3}, CFG) == PluginSettings(None, "warn", 3.0)
    assert options_error({"x": 1}, factory) == (
        f"{CFG}: [plugins.relay_guard] x: unknown key (this plugin takes no options)")


def test_build_options_leaves_table_alone():
    """build_options() does not consume the config's table."""
    table = {"mode": "warn", "timeout": 3, "limit": 2}
    build_options(FakeFactory(), table, CFG)
    assert table == {"mode": "warn", "timeout": 3, "limit": 2}
