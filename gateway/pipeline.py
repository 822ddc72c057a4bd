"""Runs one stage of a listener's ordered plugin list and turns the
verdicts into one outcome.

Why a runner of our own: it is the one place that makes plugins safe to
write.  Each call is bounded by a timeout from the injected clock; a plugin
that raises or times out fails *closed* with a 451 (never a dropped
connection, never a message accepted by accident); the relay gate is a
separate lattice that denies by default, so an ACCEPT from a spam or
policy plugin can never open relay.

A stage whose plugins all answer synchronously is answered synchronously
(no Deferred), which keeps the common path cheap.

Standards: RFC 5321 §4.2 (replies), RFC 3463.
See also: Postfix smtpd_relay_restrictions / smtpd_recipient_restrictions;
Haraka C{run_next_hook}; twisted.names C{ResolverChain}.
"""

from __future__ import annotations

import email.message
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway import reply as R
from gateway.interfaces import STAGE_INTERFACES
from gateway.reply import Reply, soften
from gateway.verdict import Action, Verdict


@dataclass(frozen=True, slots=True)
class PluginSlot:
    """One configured plugin on a listener.

    @ivar name: the config name.
    @ivar plugin: the object built by its factory.
    @ivar mode: C{"enforce"} or C{"warn"} (log the would-be rejection only).
    @ivar timeout: seconds before a pending verdict becomes 451 4.4.5.
    """

    name: str
    plugin: Any
    mode: str = "enforce"
    timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of a whole stage.

    @ivar action: the deciding action (CONTINUE when no plugin decided).
    @ivar reply: the reply to send, or None for the stage's default.
    @ivar plugin: the name of the deciding plugin, if any.
    """

    action: Action
    reply: Reply | None = None
    disconnect: bool = False
    add_headers: tuple[tuple[str, str], ...] = ()
    plugin: str | None = None

    @property
    def failed(self) -> bool:
        """True when the stage ends in a 4xx/5xx reply."""
        return self.action in (Action.REJECT, Action.TEMPFAIL)


PASSED = Outcome(Action.CONTINUE)


class MessageView:
    """What L{gateway.interfaces.IMessageCheck} plugins see of a message.

    The body stays on disk: C{open()} returns a new binary file over the
    spooled content, so a 50 MB message is never held in memory.
    """

    def __init__(self, headers: email.message.Message, size: int, opener: Callable[[], BinaryIO]) -> None:
        self.headers = headers
        self.size = size
        self._opener = opener

    def open(self) -> BinaryIO:
        """A fresh read-only binary file positioned at the start of the content."""
        return self._opener()


class _Timeout(Exception):
    """A plugin's Deferred did not fire within its timeout."""


@dataclass(frozen=True, slots=True)
class _Failed:
    """Carries a plugin's Failure down the callback chain (a Failure passed
    to C{callback} would switch the chain to errbacks)."""

    failure: Failure


class Pipeline:
    """The plugin lists of one listener, split per stage once at build time.

    @param slots: the listener's plugins in configured order.
    @param clock: for per-plugin timeouts.
    @param soft_bounce: turn every 5xx into 4xx (Postfix C{soft_bounce}).
    """

    log = Logger()

    def __init__(self, listener: str, slots: list[PluginSlot], clock: IReactorTime,
                 soft_bounce: bool = False) -> None:
        self.listener = listener
        self.slots = tuple(slots)
        self._clock = clock
        self._soft_bounce = soft_bounce
        #: A L{gateway.metrics.GatewayMetrics}, set by the service.
        self.metrics: Any = None
        self._stages: dict[str, tuple[tuple[PluginSlot, Callable[..., Any]], ...]] = {}
        for stage, (interface, method) in STAGE_INTERFACES.items():
            self._stages[stage] = tuple(
                (slot, getattr(slot.plugin, method)) for slot in self.slots
                if interface.providedBy(slot.plugin)
            )

    def plugins_for(self, stage: str) -> tuple[str, ...]:
        """Names of the plugins that take part in C{stage}, in order."""
        return tuple(slot.name for slot, _ in self._stages[stage])

    def has(self, stage: str) -> bool:
        """True when some plugin implements C{stage}."""
        return bool(self._stages[stage])

    def run(self, stage: str, *args: Any) -> Outcome | defer.Deferred:
        """Run C{stage} over its plugins with C{args}.

        @return: an L{Outcome}, or a Deferred firing with one when a plugin
            answered with a Deferred.  Never errbacks.
        """
        calls = self._stages[stage]
        if stage == "relay":
            return self._walk(calls, 0, args, (), relay=True)
        if not calls:
            return PASSED
        return self._walk(calls, 0, args, (), relay=False)

    def _walk(self, calls, index: int, args, headers: tuple, relay: bool):
        while index < len(calls):
            slot, method = calls[index]
            index += 1
            try:
                result = method(*args)
            except Exception:
                self.log.failure("plugin {plugin} raised in {listener}",
                                 plugin=slot.name, listener=self.listener)
                return Outcome(Action.TEMPFAIL, R.PLUGIN_FAILED, plugin=slot.name)
            if isinstance(result, defer.Deferred):
                d = self._bounded(slot, result)
                d.addCallback(self._resume, slot, calls, index, args, headers, relay)
                return d
            outcome = self._judge(slot, result, headers)
            if isinstance(outcome, Outcome):
                return outcome
            headers = outcome
        return self._end(headers, relay)

    def _resume(self, result, slot, calls, index, args, headers, relay):
        outcome = self._judge(slot, result, headers)
        if isinstance(outcome, Outcome):
            return outcome
        return self._walk(calls, index, args, outcome, relay)

    def _end(self, headers: tuple, relay: bool) -> Outcome:
        if relay:
            return Outcome(Action.REJECT, self._final(R.RELAY_DENIED), add_headers=headers)
        if headers:
            return Outcome(Action.CONTINUE, add_headers=headers)
        return PASSED

    def _final(self, reply: Reply) -> Reply:
        return soften(reply) if self._soft_bounce else reply

    def _judge(self, slot: PluginSlot, result: Any, headers: tuple) -> Outcome | tuple:
        """Turn one plugin result into a final Outcome, or the headers so far."""
        if self.metrics is not None:
            if isinstance(result, _Failed):
                action = "timeout" if result.failure.check(_Timeout) else "error"
            elif isinstance(result, Verdict):
                action = result.action.value
            else:
                action = "continue" if result is None else "error"
            self.metrics.plugin_verdicts.labels(slot.name, action).inc()
        if isinstance(result, _Failed):
            if result.failure.check(_Timeout):
                self.log.warn("plugin {plugin} timed out after {timeout}s in {listener}",
                              plugin=slot.name, timeout=slot.timeout, listener=self.listener)
                return Outcome(Action.TEMPFAIL, R.PLUGIN_TIMEOUT, plugin=slot.name)
            self.log.failure("plugin {plugin} failed in {listener}", result.failure,
                             plugin=slot.name, listener=self.listener)
            return Outcome(Action.TEMPFAIL, R.PLUGIN_FAILED, plugin=slot.name)
        if result is None:
            result = Verdict(Action.CONTINUE)
        if not isinstance(result, Verdict):
            self.log.error("plugin {plugin} returned {result!r}, not a Verdict",
                           plugin=slot.name, result=result)
            return Outcome(Action.TEMPFAIL, R.PLUGIN_FAILED, plugin=slot.name)
        headers = headers + result.add_headers
        if result.action is Action.CONTINUE:
            return headers
        if slot.mode == "warn" and result.action in (Action.REJECT, Action.TEMPFAIL):
            self.log.info("plugin {plugin} would answer {reply} (mode=warn)",
                          plugin=slot.name, reply=str(result.reply))
            return headers
        reply = result.reply
        if reply is not None and result.action is not Action.ACCEPT:
            reply = self._final(reply)
        return Outcome(result.action, reply, result.disconnect, headers, slot.name)

    def _bounded(self, slot: PluginSlot, pending: defer.Deferred) -> defer.Deferred:
        """A Deferred that fires with the plugin's result or a timeout
        Failure, whichever comes first, and never errbacks."""
        outer: defer.Deferred = defer.Deferred()

        def on_timeout() -> None:
            if not outer.called:
                outer.callback(_Failed(Failure(_Timeout())))
            pending.cancel()

        timer = self._clock.callLater(slot.timeout, on_timeout)

        def done(result: Any) -> None:
            if outer.called:
                return None
            if timer.active():
                timer.cancel()
            outer.callback(_Failed(result) if isinstance(result, Failure) else result)
            return None

        pending.addBoth(done)
        return outer
