"""Tests for L{gateway.store}: the memory store under a C{Clock}, the file
store's snapshot round trip, and the Redis store against a real
redis-server on loopback (started per test; skipped only when
redis-server is not installed).

Every real wait is bounded with C{addTimeout}.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from gateway.config import StoreConfig
from gateway.interfaces import IStateStore
from gateway.store import (
    SNAPSHOT_NAME,
    FileStore,
    MemoryStore,
    RedisStore,
    StoreError,
    encode_snapshot,
    make_store,
    parse_redis_url,
)
from tests import redisserver
from tests.redisserver import free_port

#: The real redis-server fixture (skips only when redis-server is missing).
redis_server = redisserver.redis_server

WAIT = 10.0


def result_of(d: defer.Deferred) -> Any:
    """The result of an already fired Deferred (memory and file stores)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def bounded(d: defer.Deferred, seconds: float = WAIT) -> defer.Deferred:
    """C{d} with a reactor timeout, so a hung store fails the test."""
    return d.addTimeout(seconds, reactor)


def sync_thread(function: Any, *args: Any) -> defer.Deferred:
    """A run_in_thread that runs at once (deterministic file-store tests)."""
    return defer.maybeDeferred(function, *args)


# -- memory ---------------------------------------------------------------------


def test_memory_store_provides_the_interface():
    """MemoryStore, FileStore and RedisStore implement IStateStore."""
    clock = Clock()
    assert verifyObject(IStateStore, MemoryStore(clock))
    assert IStateStore.implementedBy(FileStore)
    assert IStateStore.implementedBy(RedisStore)


def test_memory_incr_ttl_is_set_when_created_and_not_extended():
    """incr creates at the amount with the TTL; later increments keep the
    first expiry (a fixed window), and after it the count starts again."""
    clock = Clock()
    store = MemoryStore(clock)
    assert result_of(store.incr("k", 1, ttl=10)) == 1
    clock.advance(6)
    assert result_of(store.incr("k", 2, ttl=10)) == 3
    clock.advance(4)
    assert result_of(store.get("k")) is None
    assert result_of(store.incr("k", 1, ttl=10)) == 1


def test_memory_set_get_delete_and_expiry():
    """set/get round-trip bytes, expire after their TTL, and delete removes."""
    clock = Clock()
    store = MemoryStore(clock)
    result_of(store.set("a", b"x", ttl=5))
    result_of(store.set("b", b"forever"))
    assert result_of(store.get("a")) == b"x"
    clock.advance(5)
    assert result_of(store.get("a")) is None
    assert result_of(store.get("b")) == b"forever"
    result_of(store.delete("b"))
    assert result_of(store.get("b")) is None


def test_memory_sets_with_ttl():
    """sadd says whether the member was new; sismember finds it; the set
    expires as a whole, TTL set at creation."""
    clock = Clock()
    store = MemoryStore(clock)
    assert result_of(store.sadd("s", "one", ttl=10)) is True
    assert result_of(store.sadd("s", "one", ttl=10)) is False
    assert result_of(store.sismember("s", "one")) is True
    assert result_of(store.sismember("s", "two")) is False
    clock.advance(10)
    assert result_of(store.sismember("s", "one")) is False


def test_memory_store_is_bounded():
    """Past max_keys the oldest key is dropped, so memory stays bounded."""
    store = MemoryStore(Clock(), max_keys=3)
    for name in "abcd":
        result_of(store.set(name, name.encode()))
    assert result_of(store.get("a")) is None
    assert result_of(store.get("d")) == b"d"


# -- file -----------------------------------------------------------------------


def fill(store: Any) -> None:
    result_of(store.incr("counter", 5, ttl=100))
    result_of(store.set("bytes", b"\x00\xffbin", ttl=100))
    result_of(store.set("short", b"gone soon", ttl=1))
    result_of(store.set("forever", b"kept"))
    result_of(store.sadd("members", "x@example.org", ttl=100))
    result_of(store.sadd("members", "y@example.org", ttl=100))


def test_file_store_round_trip(tmp_path):
    """State written at close is loaded by a new FileStore: counters,
    bytes, sets and expiries survive; entries that expired are dropped."""
    clock = Clock()
    clock.advance(1000)
    store = FileStore(str(tmp_path / "state"), clock, sync_thread)
    fill(store)
    result_of(store.close())
    path = tmp_path / "state" / SNAPSHOT_NAME
    assert path.is_file() and not (tmp_path / "state" / f"{SNAPSHOT_NAME}.tmp").exists()

    clock.advance(2)
    again = FileStore(str(tmp_path / "state"), clock, sync_thread)
    try:
        assert result_of(again.incr("counter", 1, ttl=100)) == 6
        assert result_of(again.get("bytes")) == b"\x00\xffbin"
        assert result_of(again.get("short")) is None
        assert result_of(again.get("forever")) == b"kept"
        assert result_of(again.sismember("members", "y@example.org")) is True
        clock.advance(98)  # the counter's expiry came along: 1000 + 100
        assert result_of(again.get("counter")) is None
        assert result_of(again.get("forever")) == b"kept"
    finally:
        result_of(again.close())


def test_file_store_snapshot_is_periodic_written_in_a_thread_and_only_when_dirty(tmp_path):
    """Every interval, a changed store is written through run_in_thread;
    an unchanged one is not written again."""
    clock = Clock()
    calls: list[Any] = []

    def recording_thread(function: Any, *args: Any) -> defer.Deferred:
        calls.append(function)
        return defer.maybeDeferred(function, *args)

    store = FileStore(str(tmp_path), clock, recording_thread, interval=30)
    try:
        clock.advance(30)
        assert calls == []  # nothing changed yet
        result_of(store.set("k", b"v"))
        clock.advance(30)
        assert len(calls) == 1
        document = json.loads((tmp_path / SNAPSHOT_NAME).read_bytes())
        assert document["format"] == "mailgateway-store" and document["version"] == 1
        assert [row[0] for row in document["entries"]] == ["k"]
        clock.advance(30)
        assert len(calls) == 1
    finally:
        result_of(store.close())


def test_file_store_failed_write_is_logged_and_retried(tmp_path):
    """A write that fails leaves the store dirty; the next interval tries
    again, and close() still returns (it never errbacks)."""
    clock = Clock()
    attempts: list[int] = []

    def flaky_thread(function: Any, *args: Any) -> defer.Deferred:
        attempts.append(1)
        if len(attempts) == 1:
            return defer.fail(OSError(28, "No space left on device"))
        return defer.maybeDeferred(function, *args)

    store = FileStore(str(tmp_path), clock, flaky_thread, interval=10)
    result_of(store.set("k", b"v"))
    clock.advance(10)
    assert not (tmp_path / SNAPSHOT_NAME).exists()
    clock.advance(10)
    assert (tmp_path / SNAPSHOT_NAME).exists()
    assert result_of(store.close()) is None


def test_file_store_snapshots_never_overlap(tmp_path):
    """A snapshot asked for while one is being written waits for it, then
    writes the newer state: two writers never share the temporary file."""
    clock = Clock()
    pending: list[tuple[defer.Deferred, Any, tuple]] = []

    def slow_thread(function: Any, *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        pending.append((d, function, args))
        return d

    store = FileStore(str(tmp_path), clock, slow_thread)
    result_of(store.set("k", b"first"))
    first = store.snapshot()
    result_of(store.set("k", b"second"))
    second = store.close()
    assert len(pending) == 1 and not first.called and not second.called
    d, function, args = pending.pop()
    d.callback(function(*args))
    assert first.called and len(pending) == 1
    d, function, args = pending.pop()
    d.callback(function(*args))
    assert second.called
    rows = json.loads((tmp_path / SNAPSHOT_NAME).read_bytes())["entries"]
    assert rows == [["k", "b", "c2Vjb25k", None]]


def test_file_store_corrupt_snapshot_is_moved_aside(tmp_path):
    """An unreadable snapshot does not stop start-up: it is moved to
    state.json.corrupt and the store starts empty."""
    (tmp_path / SNAPSHOT_NAME).write_bytes(b'{"format": "mailgateway-store", "version": 1, "entries": [[1]]}')
    store = FileStore(str(tmp_path), Clock(), sync_thread)
    try:
        assert result_of(store.get("anything")) is None
        assert (tmp_path / f"{SNAPSHOT_NAME}.corrupt").exists()
        assert not (tmp_path / SNAPSHOT_NAME).exists()
    finally:
        result_of(store.close())


def test_file_store_unusable_directory_is_a_store_error(tmp_path):
    """A path that cannot be a directory gives StoreError (start-up turns
    it into a config error)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot create the state directory"):
        FileStore(str(blocker / "state"), Clock(), sync_thread)


def test_snapshot_leaves_out_values_of_unknown_types():
    """encode_snapshot writes only the types a store holds (no pickle)."""
    data = json.loads(encode_snapshot([("ok", 1, None), ("odd", object(), None)], 0.0))
    assert [row[0] for row in data["entries"]] == ["ok"]


@pytest_twisted.ensureDeferred
async def test_file_store_with_the_reactor_thread_pool(tmp_path):
    """With the real reactor thread pool (as in the gateway), close()
    writes the snapshot from a thread and a new store reads it back."""
    from twisted.internet import threads

    run = lambda f, *a: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *a)  # noqa: E731
    store = FileStore(str(tmp_path), reactor, run)
    await store.incr("count", 3, ttl=3600)
    await bounded(store.close())
    again = FileStore(str(tmp_path), reactor, run)
    try:
        assert await again.incr("count", 1, ttl=3600) == 4
    finally:
        await bounded(again.close())


# -- make_store and URLs -------------------------------------------------------------


def test_make_store_picks_the_back_end(tmp_path):
    """[store] backend memory, file and redis give the matching classes;
    file needs a path; an unknown back end is a StoreError."""
    clock = Clock()
    assert type(make_store(StoreConfig(), clock, sync_thread)) is MemoryStore
    store = make_store(StoreConfig(backend="file", path=str(tmp_path / "s")), clock, sync_thread)
    assert isinstance(store, FileStore) and store.file == str(tmp_path / "s" / SNAPSHOT_NAME)
    result_of(store.close())
    with pytest.raises(StoreError, match="needs \\[store\\] path"):
        make_store(StoreConfig(backend="file", path=""), clock, sync_thread)
    with pytest.raises(StoreError, match="not available"):
        make_store(StoreConfig(backend="etcd"), clock, sync_thread)


@pytest_twisted.ensureDeferred
async def test_make_store_redis_uses_timeout_and_prefix():
    """The redis back end takes redis_url, timeout and prefix from [store]."""
    config = StoreConfig(backend="redis", redis_url=f"redis://127.0.0.1:{free_port()}/3", timeout=0.25,
                         prefix="gw1:")
    store = make_store(config, reactor, sync_thread)
    try:
        assert isinstance(store, RedisStore)
        assert store._prefix == "gw1:" and store._timeout == 0.25
    finally:
        await bounded(store.close())


@pytest.mark.parametrize("url, expected", [
    ("redis://127.0.0.1:6380/2", {"host": "127.0.0.1", "port": 6380, "db": 2, "unix": None}),
    ("redis://redis.example", {"host": "redis.example", "port": 6379, "db": None}),
    ("redis://:s%40cret@h:1/0", {"host": "h", "port": 1, "db": 0, "password": "s@cret", "username": None}),
    ("redis://user:pw@h", {"username": "user", "password": "pw"}),
    ("redis://pw@h", {"username": None, "password": "pw"}),
    ("redis://[::1]:7000", {"host": "::1", "port": 7000}),
    ("unix:///run/redis.sock?db=4", {"unix": "/run/redis.sock", "db": 4, "host": None}),
])
def test_parse_redis_url(url, expected):
    """redis:// and unix:// URLs give host, port, socket, db and credentials."""
    parsed = parse_redis_url(url)
    assert {k: parsed[k] for k in expected} == expected


@pytest.mark.parametrize("url", ["http://h", "redis://h:99999", "redis://h/notanumber", "unix://"])
def test_parse_redis_url_errors(url):
    """A URL the store cannot use is a StoreError naming it."""
    with pytest.raises(StoreError, match="bad redis_url"):
        parse_redis_url(url)


# -- Redis (real server) ---------------------------------------------------------------


async def closing(store: RedisStore) -> None:
    await bounded(store.close())


@pytest_twisted.ensureDeferred
async def test_redis_operations_round_trip_with_prefix(redis_server):
    """Against a real redis-server: incr with TTL, set/get/delete with TTL,
    sadd/sismember, and every key carries the configured prefix."""
    store = RedisStore(redis_server.url, reactor, timeout=2.0, prefix="gwtest:")
    try:
        assert await bounded(store.incr("count", 1, ttl=60)) == 1
        assert await bounded(store.incr("count", 4, ttl=60)) == 5
        await bounded(store.set("blob", b"\x00\xffbin", ttl=60))
        await bounded(store.set("plain", b"v"))
        assert await bounded(store.get("blob")) == b"\x00\xffbin"
        assert await bounded(store.get("missing")) is None
        assert await bounded(store.sadd("set", "a", ttl=60)) is True
        assert await bounded(store.sadd("set", "a", ttl=60)) is False
        assert await bounded(store.sismember("set", "a")) is True
        assert await bounded(store.sismember("set", "b")) is False
        await bounded(store.delete("plain"))
        assert await bounded(store.get("plain")) is None
        keys = sorted(redis_server.command("KEYS", "*"))
        assert keys == [b"gwtest:blob", b"gwtest:count", b"gwtest:set"]
        assert 0 < redis_server.command("PTTL", "gwtest:count") <= 60000
        assert 0 < redis_server.command("PTTL", "gwtest:set") <= 60000
        assert redis_server.command("GET", "gwtest:count") == b"5"
    finally:
        await closing(store)


@pytest_twisted.ensureDeferred
async def test_redis_incr_keeps_the_first_expiry(redis_server):
    """As in memory: the TTL is set when the counter is created and later
    increments do not extend it (a fixed window shared by gateways)."""
    store = RedisStore(redis_server.url, reactor, timeout=2.0, prefix="p:")
    try:
        await bounded(store.incr("w", 1, ttl=100))
        redis_server.command("PEXPIRE", "p:w", 5000)
        await bounded(store.incr("w", 1, ttl=100))
        assert redis_server.command("PTTL", "p:w") <= 5000
        await bounded(store.sadd("s", "a", ttl=100))
        redis_server.command("PEXPIRE", "p:s", 5000)
        await bounded(store.sadd("s", "b", ttl=100))
        assert redis_server.command("PTTL", "p:s") <= 5000
        await bounded(store.incr("nottl"))
        assert redis_server.command("PTTL", "p:nottl") == -1
    finally:
        await closing(store)


@pytest_twisted.ensureDeferred
async def test_redis_two_stores_share_state(redis_server):
    """Two stores (two gateways) with the same prefix count together;
    another prefix is another namespace."""
    one = RedisStore(redis_server.url, reactor, timeout=2.0, prefix="shared:")
    two = RedisStore(redis_server.url, reactor, timeout=2.0, prefix="shared:")
    other = RedisStore(redis_server.url, reactor, timeout=2.0, prefix="other:")
    try:
        assert await bounded(one.incr("n", 1, ttl=60)) == 1
        assert await bounded(two.incr("n", 1, ttl=60)) == 2
        assert await bounded(other.incr("n", 1, ttl=60)) == 1
    finally:
        for store in (one, two, other):
            await closing(store)


@pytest_twisted.ensureDeferred
async def test_redis_wrong_type_is_a_store_error(redis_server):
    """A Redis error reply (WRONGTYPE) becomes StoreError, not a crash."""
    store = RedisStore(redis_server.url, reactor, timeout=2.0, prefix="")
    try:
        await bounded(store.set("k", b"text"))
        with pytest.raises(StoreError, match="WRONGTYPE"):
            await bounded(store.sadd("k", "member"))
        with pytest.raises(StoreError):
            await bounded(store.incr("k"))
    finally:
        await closing(store)


@pytest_twisted.ensureDeferred
async def test_redis_unreachable_at_start_fails_within_the_timeout():
    """With nothing listening, a call fails with StoreError after at most
    [store] timeout, and later calls fail at once instead of waiting."""
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", reactor, timeout=0.3, prefix="")
    try:
        started = reactor.seconds()
        with pytest.raises(StoreError):
            await bounded(store.incr("k", 1, ttl=10), 5.0)
        assert reactor.seconds() - started < 3.0
        second = store.get("k")
        assert second.called  # failed fast: no new wait
        with pytest.raises(StoreError, match="not connected"):
            await second
    finally:
        await closing(store)


@pytest_twisted.ensureDeferred
async def test_redis_stalled_server_times_out(redis_server):
    """A Redis that accepts but never answers (SIGSTOP) gives StoreError
    after [store] timeout; after it resumes, the store works again."""
    store = RedisStore(redis_server.url, reactor, timeout=0.3, prefix="")
    try:
        assert await bounded(store.incr("k", 1)) == 1
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreError, match="did not answer|failed"):
                await bounded(store.incr("k", 1), 5.0)
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
        await wait_until_answers(store)
    finally:
        await closing(store)


async def wait_until_answers(store: RedisStore, seconds: float = 20.0) -> Any:
    """Poll the store until it answers (it reconnects by itself); bounded."""
    deadline = reactor.seconds() + seconds
    while True:
        try:
            return await bounded(store.get("probe"), 2.0)
        except (StoreError, defer.TimeoutError):
            if reactor.seconds() > deadline:
                raise
            await task.deferLater(reactor, 0.2, lambda: None)


@pytest_twisted.ensureDeferred
async def test_redis_down_then_back_reconnects(redis_server):
    """When redis-server stops, calls fail with StoreError (not a hang);
    when it comes back on the same port, the store reconnects by itself."""
    from tests.support import in_thread

    store = RedisStore(redis_server.url, reactor, timeout=0.5, prefix="")
    try:
        assert await bounded(store.incr("k", 1)) == 1
        await in_thread(redis_server.stop)
        with pytest.raises(StoreError):
            await bounded(store.incr("k", 1), 5.0)
        await in_thread(redis_server.start)
        await wait_until_answers(store)
        assert await bounded(store.incr("k", 1)) == 1  # a fresh server (no persistence)
    finally:
        await closing(store)


@pytest_twisted.ensureDeferred
async def test_redis_closed_store_refuses_calls(redis_server):
    """After close() every call fails with StoreError and nothing reconnects."""
    store = RedisStore(redis_server.url, reactor, timeout=1.0, prefix="")
    await bounded(store.get("k"))
    await closing(store)
    with pytest.raises(StoreError, match="closed"):
        await store.get("k")
    assert not store.connected
