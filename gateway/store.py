# -*- test-case-name: tests.test_store -*-
"""Shared state for policy plugins: the memory, file and Redis back ends
of L{gateway.interfaces.IStateStore}, and the factory that picks one.

Why an interface: rate limits and greylisting must be shared when several
gateways take the load behind one MX, and must not need a server when one
gateway is enough.  Plugins see only L{gateway.interfaces.IStateStore};
C{[store] backend} picks the back end:

  - C{memory} (default): a dict in this process; lost at a restart.
  - C{file}: the memory store plus a JSON snapshot, C{<[store] path>/state.json},
    written in a thread every 30 seconds (when something changed) and at
    shutdown, and read back at start, so greylisting and counters survive a
    restart.  One process only: two gateways never share a file store.
  - C{redis}: Redis through txredisapi (non-blocking), shared by every
    gateway that names the same C{redis_url}.  Every call is bounded by
    C{[store] timeout} and fails with L{StoreError} when Redis is down or
    slow; the connection comes back by itself when Redis does.  Keys carry
    C{[store] prefix}.

Expiry is the clock's: C{MemoryStore} and C{FileStore} compare against
C{clock.seconds()} (the reactor's wall clock in production, a C{Clock} in
tests); Redis expires keys itself (C{PX}).

Standards: none (an internal contract).
See also: DESIGN.md "Beyond one machine"; Haraka's redis plugin; Postfix
anvil(8) (per-process counters, which is what C{memory} is).
"""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.interfaces import IStateStore

log = Logger()


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


#: The snapshot file inside C{[store] path}.
SNAPSHOT_NAME = "state.json"
_SNAPSHOT_FORMAT = "mailgateway-store"
_SNAPSHOT_VERSION = 1


@implementer(IStateStore)
class FileStore(MemoryStore):
    """The memory store plus a JSON snapshot on disk, so that state
    survives a restart of this one process.

    The snapshot is read at construction (start-up, before the reactor
    runs, like the spool's recovery) and written by C{run_in_thread} every
    C{interval} seconds when something changed, and once more by
    L{close}.  The entries are copied on the reactor thread (a plain pass
    over the dict that also drops expired keys), then encoded and written
    in the thread: temporary file, fsync, rename, directory fsync, so a
    crash leaves the previous snapshot or the new one, never half of one.
    A state change made after the last snapshot and before a crash is
    lost; that is the trade against a write per SMTP command.

    An unreadable snapshot is moved aside to C{state.json.corrupt} and the
    store starts empty (policy state is a cache, not mail).

    @param path: the directory (C{[store] path}); created if missing.
    @param clock: IReactorTime for expiry and the periodic writes.
    @param run_in_thread: C{f(*args) -> Deferred}.
    @param interval: seconds between snapshots.
    @raise StoreError: the directory cannot be created.
    """

    def __init__(self, path: str, clock: Any, run_in_thread: Callable[..., Any],
                 interval: float = 30.0, max_keys: int = 1_000_000) -> None:
        super().__init__(clock, max_keys)
        self.path = path
        self.file = os.path.join(path, SNAPSHOT_NAME)
        self._run_in_thread = run_in_thread
        self._dirty = False
        self._writing: defer.Deferred | None = None
        self._closed = False
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the state directory {path}: {exc.strerror or exc}") from None
        self.load()
        self._loop = task.LoopingCall(self._periodic)
        self._loop.clock = clock
        self._loop.start(interval, now=False)

    # -- changes mark the store dirty ------------------------------------

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> defer.Deferred:
        self._dirty = True
        return super().incr(key, amount, ttl)

    def set(self, key: str, value: bytes, ttl: float | None = None) -> defer.Deferred:
        self._dirty = True
        return super().set(key, value, ttl)

    def delete(self, key: str) -> defer.Deferred:
        self._dirty = True
        return super().delete(key)

    def sadd(self, key: str, member: str, ttl: float | None = None) -> defer.Deferred:
        self._dirty = True
        return super().sadd(key, member, ttl)

    # -- snapshot ----------------------------------------------------------

    def load(self) -> int:
        """Read the snapshot (blocking; start-up only).

        @return: the number of live entries loaded.
        """
        try:
            with open(self.file, "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise StoreError(f"cannot read {self.file}: {exc.strerror or exc}") from None
        try:
            entries = _decode_snapshot(raw)
        except ValueError as exc:
            aside = self.file + ".corrupt"
            log.error("state snapshot {path} unreadable ({reason}); moved to {aside}, starting empty",
                      path=self.file, reason=str(exc), aside=aside)
            try:
                os.replace(self.file, aside)
            except OSError:
                pass
            return 0
        now = self._now()
        loaded = 0
        for key, value, expires in entries:
            if expires is not None and expires <= now:
                continue
            if key not in self._data and len(self._data) >= self._max_keys:
                break
            self._data[key] = (value, expires)
            loaded += 1
        log.info("state snapshot {path} loaded: {count} entries", path=self.file, count=loaded)
        return loaded

    def entries(self) -> list[tuple[str, Any, float | None]]:
        """A copy of the live entries (sets as sorted lists); drops expired ones."""
        now = self._now()
        out = []
        for key, (value, expires) in list(self._data.items()):
            if expires is not None and expires <= now:
                del self._data[key]
                continue
            if isinstance(value, set):
                value = sorted(value)
            out.append((key, value, expires))
        return out

    def snapshot(self) -> defer.Deferred:
        """Write the snapshot now (in a thread); fires when it is on disk.

        Never errbacks: a failed write is logged and retried at the next
        interval.  A write already in progress is waited for first.
        """
        if self._writing is not None:
            waiting: defer.Deferred = defer.Deferred()
            self._writing.addBoth(lambda _: waiting.callback(None))
            return waiting.addCallback(lambda _: self.snapshot())
        self._dirty = False
        entries = self.entries()
        saved = self._now()
        writing: defer.Deferred = defer.Deferred()
        self._writing = writing

        def failed(failure: Failure) -> None:
            self._dirty = True
            log.error("state snapshot {path} not written: {reason}", path=self.file,
                      reason=failure.getErrorMessage())

        def done(_: Any) -> None:
            self._writing = None
            writing.callback(None)

        d = defer.maybeDeferred(self._run_in_thread, _write_snapshot, self.file, entries, saved)
        d.addErrback(failed)
        d.addBoth(done)
        return writing

    def _periodic(self) -> defer.Deferred | None:
        if self._dirty and self._writing is None:
            return self.snapshot()
        return None

    def close(self) -> defer.Deferred:
        """Stop the periodic writes and write a last snapshot."""
        if self._closed:
            return defer.succeed(None)
        self._closed = True
        if self._loop.running:
            self._loop.stop()
        return self.snapshot()


def _encode_value(value: Any) -> tuple[str, Any] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return "i", value
    if isinstance(value, (bytes, bytearray)):
        return "b", base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, str):
        return "t", value
    if isinstance(value, list):
        return "s", [str(m) for m in value]
    return None


def _decode_value(kind: str, value: Any) -> Any:
    if kind == "i" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "b" and isinstance(value, str):
        return base64.b64decode(value.encode("ascii"), validate=True)
    if kind == "t" and isinstance(value, str):
        return value
    if kind == "s" and isinstance(value, list) and all(isinstance(m, str) for m in value):
        return set(value)
    raise ValueError(f"bad entry of kind {kind!r}")


def encode_snapshot(entries: list[tuple[str, Any, float | None]], saved: float) -> bytes:
    """The snapshot document for C{entries} (key, value, expiry).  Values
    of a type the store never holds are left out."""
    rows = []
    for key, value, expires in entries:
        encoded = _encode_value(value)
        if encoded is not None:
            rows.append([key, encoded[0], encoded[1], expires])
    document = {"format": _SNAPSHOT_FORMAT, "version": _SNAPSHOT_VERSION, "saved": saved, "entries": rows}
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def _decode_snapshot(raw: bytes) -> list[tuple[str, Any, float | None]]:
    """Parse a snapshot; raise ValueError for anything unexpected."""
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if (not isinstance(document, dict) or document.get("format") != _SNAPSHOT_FORMAT
            or document.get("version") != _SNAPSHOT_VERSION or not isinstance(document.get("entries"), list)):
        raise ValueError("not a mailgateway state snapshot (version 1)")
    out = []
    for row in document["entries"]:
        if not (isinstance(row, list) and len(row) == 4 and isinstance(row[0], str)
                and (row[3] is None or isinstance(row[3], (int, float)))):
            raise ValueError(f"bad entry {row!r:.80}")
        try:
            value = _decode_value(row[1], row[2])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"bad entry for {row[0]!r:.80}: {exc}") from None
        out.append((row[0], value, None if row[3] is None else float(row[3])))
    return out


def _write_snapshot(path: str, entries: list[tuple[str, Any, float | None]], saved: float) -> None:
    """Encode and write atomically (runs in a thread): temporary file,
    fsync, rename, directory fsync."""
    data = encode_snapshot(entries, saved)
    directory = os.path.dirname(path) or "."
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- Redis -----------------------------------------------------------------

#: INCRBY that sets the expiry only when it creates the key, atomically.
_INCR_SCRIPT = """
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], 0, 'PX', ARGV[2], 'NX')
end
return redis.call('INCRBY', KEYS[1], ARGV[1])
"""

#: SADD that sets the expiry only when it creates the set, atomically.
_SADD_SCRIPT = """
local created = redis.call('EXISTS', KEYS[1]) == 0
local added = redis.call('SADD', KEYS[1], ARGV[1])
if created and tonumber(ARGV[2]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return added
"""


def parse_redis_url(url: str) -> dict[str, Any]:
    """Split C{redis://[[user]:password@]host[:port][/db]} or
    C{unix:///path/to/socket[?db=N]} (a C{password=} query works for both).

    @return: C{host}, C{port}, C{unix} (a path or None), C{db},
        C{username}, C{password}.
    @raise StoreError: for anything else.
    """
    try:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        out: dict[str, Any] = {"host": None, "port": 6379, "unix": None, "db": None,
                               "username": unquote(parts.username) if parts.username else None,
                               "password": unquote(parts.password) if parts.password else None}
        if "password" in query:
            out["password"] = query["password"][0]
        if parts.scheme == "redis":
            out["host"] = parts.hostname or "127.0.0.1"
            out["port"] = parts.port or 6379
            db = parts.path.strip("/")
        elif parts.scheme == "unix":
            if not parts.path:
                raise ValueError("no socket path")
            out["unix"] = parts.path
            db = query.get("db", [""])[0]
        else:
            raise ValueError("expected redis:// or unix://")
        if db:
            out["db"] = int(db)
    except ValueError as exc:
        raise StoreError(f"bad redis_url {url!r}: {exc}") from None
    if out["username"] and not out["password"]:
        out["password"], out["username"] = out["username"], None  # redis://secret@host
    return out


def _ms(ttl: float | None) -> int:
    """A TTL in whole milliseconds for PX (0: none)."""
    if not ttl or ttl <= 0:
        return 0
    return max(1, int(round(ttl * 1000)))


@implementer(IStateStore)
class RedisStore:
    """The shared back end: Redis through txredisapi.

    Non-blocking throughout.  One connection, pipelined, is kept by
    txredisapi's reconnecting factory (first retry after half a second,
    then backing off to at most C{max_retry_delay}), so the store comes
    back by itself when Redis does.

    Every call is bounded by C{timeout}: a call that gets no answer in
    time errbacks with L{StoreError} (and txredisapi drops the stalled
    connection and reconnects).  While the connection is known to be down
    calls fail at once rather than waiting, so a gateway without its Redis
    answers each command immediately, not C{timeout} seconds later.

    @param url: C{[store] redis_url}.
    @param reactor: IReactorTCP, IReactorUNIX and IReactorTime.
    @param prefix: prepended to every key (C{[store] prefix}).
    @raise StoreError: a bad URL, or txredisapi is not installed.
    """

    def __init__(self, url: str, reactor: Any, timeout: float = 2.0, prefix: str = "mailgateway:",
                 max_retry_delay: float = 5.0) -> None:
        try:
            # Imported here, not at module level: txredisapi imports the
            # global reactor, which must not happen before twistd picks one.
            import txredisapi
        except ImportError:
            raise StoreError("the redis back end needs txredisapi (pip install txredisapi)") from None
        from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint

        self._txredisapi = txredisapi
        self.url = url
        self._clock = reactor
        self._timeout = timeout
        self._prefix = prefix
        self._closed = False
        self._fail_fast = False
        where = parse_redis_url(url)
        self._where = where["unix"] or f"{where['host']}:{where['port']}"
        handler = txredisapi.UnixConnectionHandler if where["unix"] else txredisapi.ConnectionHandler
        self._factory = txredisapi.RedisFactory(
            None, where["db"], 1, isLazy=True, handler=handler, charset=None,
            password=where["password"], replyTimeout=timeout, convertNumbers=False,
            username=where["username"])
        self._factory.initialDelay = 0.5
        self._factory.maxDelay = max_retry_delay
        if where["unix"]:
            endpoint = UNIXClientEndpoint(reactor, where["unix"], timeout=timeout)
        else:
            endpoint = HostnameEndpoint(reactor, where["host"], where["port"], timeout=timeout)
        self._factory.startConnecting(endpoint)
        self._handler = self._factory.handler

    @property
    def connected(self) -> bool:
        """True while a connection to Redis is up."""
        return self._factory.size > 0

    def _call(self, command: str, call: Callable[[], defer.Deferred]) -> defer.Deferred:
        if self._closed:
            return defer.fail(StoreError("the state store is closed"))
        if self._factory.size > 0:
            self._fail_fast = True
        elif self._fail_fast:
            return defer.fail(StoreError(f"Redis at {self._where} is not connected"))
        try:
            d = call()
        except Exception as exc:
            return defer.fail(StoreError(f"Redis {command} failed: {exc}"))
        d.addTimeout(self._timeout, self._clock)
        d.addErrback(self._eb_failed, command)
        return d

    def _eb_failed(self, failure: Failure, command: str) -> None:
        if self._factory.size == 0:
            self._fail_fast = True
        if failure.check(StoreError):
            failure.raiseException()
        if failure.check(defer.TimeoutError, self._txredisapi.TimeoutError):
            raise StoreError(f"Redis at {self._where} did not answer {command} within {self._timeout:g}s")
        raise StoreError(f"Redis {command} at {self._where} failed: {failure.getErrorMessage()}")

    def _key(self, key: str) -> str:
        return self._prefix + key

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> defer.Deferred:
        return self._call("INCRBY", lambda: self._handler.eval(
            _INCR_SCRIPT, [self._key(key)], [int(amount), _ms(ttl)])).addCallback(int)

    def get(self, key: str) -> defer.Deferred:
        return self._call("GET", lambda: self._handler.execute_command("GET", self._key(key)))

    def set(self, key: str, value: bytes, ttl: float | None = None) -> defer.Deferred:
        ms = _ms(ttl)
        extra = ("PX", ms) if ms else ()
        d = self._call("SET", lambda: self._handler.execute_command("SET", self._key(key), value, *extra))
        return d.addCallback(lambda _: None)

    def delete(self, key: str) -> defer.Deferred:
        d = self._call("DEL", lambda: self._handler.execute_command("DEL", self._key(key)))
        return d.addCallback(lambda _: None)

    def sadd(self, key: str, member: str, ttl: float | None = None) -> defer.Deferred:
        d = self._call("SADD", lambda: self._handler.eval(_SADD_SCRIPT, [self._key(key)], [member, _ms(ttl)]))
        return d.addCallback(lambda added: bool(int(added)))

    def sismember(self, key: str, member: str) -> defer.Deferred:
        d = self._call("SISMEMBER", lambda: self._handler.execute_command("SISMEMBER", self._key(key), member))
        return d.addCallback(lambda found: bool(int(found)))

    def close(self) -> defer.Deferred:
        """Stop reconnecting and close the connection (bounded by the timeout)."""
        if self._closed:
            return defer.succeed(None)
        self._closed = True
        d = self._factory.disconnect()
        d.addTimeout(self._timeout, self._clock)
        d.addErrback(lambda failure: log.warn("closing the Redis connection: {reason}",
                                              reason=failure.getErrorMessage()))
        return d.addCallback(lambda _: None)


def make_store(config: Any, reactor: Any, run_in_thread: Any) -> Any:
    """The store for C{[store]} (a L{gateway.config.StoreConfig}).

    @raise StoreError: the back end cannot be set up (the message is the
        line for the admin).
    """
    if config.backend == "memory":
        return MemoryStore(reactor)
    if config.backend == "file":
        if not config.path:
            raise StoreError("the file back end needs [store] path")
        return FileStore(config.path, reactor, run_in_thread)
    if config.backend == "redis":
        return RedisStore(config.redis_url, reactor, timeout=config.timeout, prefix=config.prefix)
    raise StoreError(f"store back end {config.backend!r} is not available")
