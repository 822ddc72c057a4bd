"""Shared state for policy plugins: the embedded memory store (and the
factory that picks the configured back end).

Why an interface: rate limits and greylisting must be shared when several
gateways take the load behind one MX, and must not need a server when one
gateway is enough.  Plugins see only L{gateway.interfaces.IStateStore};
C{[store] backend} picks memory (default), file or Redis.

Standards: none (an internal contract).
See also: DESIGN.md "Beyond one machine"; Haraka's redis plugin.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from gateway.interfaces import IStateStore


class StoreError(Exception):
    """The store could not answer (back end down or too slow)."""


@implementer(IStateStore)
class MemoryStore:
    """The embedded default: a dict with expiry times, in this process.

    @param clock: C{seconds()} for expiry (IReactorTime), injected for tests.
    """

    def __init__(self, clock: Any = None, max_keys: int = 1_000_000) -> None:
        self._clock = clock
        self._data: dict[str, tuple[Any, float | None]] = {}
        self._max_keys = max_keys

    def _now(self) -> float:
        return self._clock.seconds() if self._clock is not None else time.time()

    def _live(self, key: str) -> Any:
        entry = self._data.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and expires <= self._now():
            del self._data[key]
            return None
        return value

    def _put(self, key: str, value: Any, ttl: float | None) -> None:
        if key not in self._data and len(self._data) >= self._max_keys:
            self._data.pop(next(iter(self._data)))
        self._data[key] = (value, self._now() + ttl if ttl else None)

    def _keep_expiry(self, key: str, value: Any) -> None:
        _, expires = self._data[key]
        self._data[key] = (value, expires)

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> defer.Deferred:
        current = self._live(key)
        if current is None:
            self._put(key, amount, ttl)
            return defer.succeed(amount)
        value = int(current) + amount
        self._keep_expiry(key, value)
        return defer.succeed(value)

    def get(self, key: str) -> defer.Deferred:
        return defer.succeed(self._live(key))

    def set(self, key: str, value: bytes, ttl: float | None = None) -> defer.Deferred:
        self._put(key, value, ttl)
        return defer.succeed(None)

    def delete(self, key: str) -> defer.Deferred:
        self._data.pop(key, None)
        return defer.succeed(None)

    def sadd(self, key: str, member: str, ttl: float | None = None) -> defer.Deferred:
        members = self._live(key)
        if members is None:
            self._put(key, {member}, ttl)
            return defer.succeed(True)
        new = member not in members
        members.add(member)
        return defer.succeed(new)

    def sismember(self, key: str, member: str) -> defer.Deferred:
        members = self._live(key)
        return defer.succeed(members is not None and member in members)

    def close(self) -> defer.Deferred:
        return defer.succeed(None)


def make_store(config: Any, reactor: Any, run_in_thread: Any) -> Any:
    """The store for C{[store]} (a L{gateway.config.StoreConfig})."""
    if config.backend == "memory":
        return MemoryStore(reactor)
    raise StoreError(f"store back end {config.backend!r} is not available")
