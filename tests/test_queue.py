"""
Tests for L{gateway.queue}: the commit protocol, group commit, failures,
recovery and the admin API of the spool.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from gateway.queue import STATES, MessageWriter, QueueError, Spool
from gateway.queuefile import (
    Envelope,
    EnvelopeError,
    EnvelopeRecipient,
    dump_envelope,
    load_envelope,
    new_queue_id,
)

REPO = Path(__file__).resolve().parents[1]
CONTENT = b"Subject: test\r\n\r\nHello.\r\n"


# Helpers


def run_now(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """
    A synchronous C{run_in_thread}.
    """
    return maybeDeferred(f, *args)


class ManualRunner:
    """
    A C{run_in_thread} that holds calls until the test runs them, so a test
    can look at the spool while work is "in the thread".

    The spool makes two kinds of calls: C{_stage} (one per message) and
    C{_commit_batch} (one per group commit).  With C{hold_stages=False}
    stages run at once and only batches are held.
    """

    def __init__(self, hold_stages: bool = True) -> None:
        self.hold_stages = hold_stages
        self.held: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []
        self.batch_sizes: list[int] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if f.__name__ == "_commit_batch":
            self.batch_sizes.append(len(args[0]))
        elif not self.hold_stages:
            return maybeDeferred(f, *args)
        d: Deferred[Any] = Deferred()
        self.held.append((f, args, d))
        return d

    def _run(self, index: int) -> None:
        f, args, d = self.held.pop(index)
        try:
            result = f(*args)
        except BaseException:
            d.errback()
        else:
            d.callback(result)

    def run_stages(self) -> None:
        """
        Run the held stage calls, in order.
        """
        while any(f.__name__ == "_stage" for f, _, _ in self.held):
            self._run(next(i for i, (f, _, _) in enumerate(self.held) if f.__name__ == "_stage"))

    def run_batch(self) -> None:
        """
        Run the oldest held batch.
        """
        self._run(next(i for i, (f, _, _) in enumerate(self.held) if f.__name__ == "_commit_batch"))


def result_of(d: Deferred[Any]) -> Any:
    """
    The result of a Deferred that has fired (SynchronousTestCase's
    successResultOf for plain pytest functions).
    """
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def failure_of(d: Deferred[Any], *types: type[BaseException]) -> Failure:
    """
    The Failure of a Deferred that has failed with one of C{types}.
    """
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    assert isinstance(results[0], Failure), f"Deferred succeeded with {results[0]!r}"
    assert results[0].check(*types), results[0]
    return results[0]


def has_result(d: Deferred[Any]) -> bool:
    results: list[Any] = []
    d.addBoth(lambda r: (results.append(r), r)[1])
    return bool(results)


def make_envelope(queue_id: str, **changes: Any) -> Envelope:
    values: dict[str, Any] = dict(
        queue_id=queue_id,
        sender="alice@example.test",
        recipients=[EnvelopeRecipient("bob@example.test")],
        received_at=1_700_000_000.0,
        listener="mx",
        client_address="192.0.2.1",
    )
    values.update(changes)
    return Envelope(**values)


def receive(spool: Spool, content: bytes = CONTENT) -> MessageWriter:
    writer = spool.open_message()
    writer.write(content)
    return writer


def queue_message(spool: Spool, content: bytes = CONTENT, **changes: Any) -> str:
    """
    Receive and commit a message with a synchronous spool.
    """
    writer = receive(spool, content)
    return result_of(spool.commit(writer, make_envelope(writer.queue_id, **changes)))


def files(spool: Spool, name: str) -> list[str]:
    return sorted(os.listdir(os.path.join(spool.path, name)))


def make_spool(path: Path, run_in_thread: Callable[..., Deferred[Any]] = run_now,
               memory_limit: int = 0) -> Spool:
    """A spool on a fixed clock; by default every message streams to tmp/
    from its first octet (memory_limit 0), the path large messages take."""
    clock = Clock()
    clock.advance(1_700_000_000)
    return Spool(path, run_in_thread=run_in_thread, clock=clock, memory_limit=memory_limit)


def replace_with_file(path: str) -> None:
    """
    Make a spool directory unusable, as chmod cannot when running as root.
    """
    os.rename(path, path + ".gone")
    with open(path, "wb"):
        pass


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return make_spool(tmp_path / "spool")


@pytest.fixture
def fsync_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """
    Record the path of every fsync'ed descriptor, still calling the real
    fsync.
    """
    calls: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return calls


# Directories and the writer


def test_directories_are_created_private(tmp_path: Path) -> None:
    """
    Starting a spool creates every state directory, readable only by the
    gateway's user (mode 0700).
    """
    spool = make_spool(tmp_path / "var" / "spool")
    for name in ("tmp", "data") + STATES:
        mode = os.stat(os.path.join(spool.path, name)).st_mode
        assert stat.S_ISDIR(mode)
        assert stat.S_IMODE(mode) == 0o700


def test_spool_path_that_is_a_file_raises_queue_error(tmp_path: Path) -> None:
    """
    A spool that cannot be created is reported as QueueError at start.
    """
    (tmp_path / "spool").write_bytes(b"")
    with pytest.raises(QueueError):
        make_spool(tmp_path / "spool")


def test_open_message_streams_to_tmp(spool: Spool) -> None:
    """
    Content being received lives only in tmp/<id>.eml, counted in size,
    and is readable there after flush (for end-of-data checks).
    """
    writer = spool.open_message()
    writer.write(b"abc")
    writer.write(b"defg")
    assert writer.size == 7
    assert writer.path == os.path.join(spool.path, "tmp", writer.queue_id + ".eml")
    writer.flush()
    assert Path(writer.path).read_bytes() == b"abcdefg"
    assert files(spool, "data") == []
    writer.abort()


def test_open_message_gives_distinct_ids(spool: Spool) -> None:
    """
    Messages opened at the same clock time still get distinct ids and
    files.
    """
    writers = [spool.open_message() for _ in range(20)]
    assert len({w.queue_id for w in writers}) == 20
    assert len(files(spool, "tmp")) == 20
    for writer in writers:
        writer.abort()


def test_open_message_retries_on_id_collision(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    An id that is already taken in data/ is never reused: another is drawn.
    """
    taken = queue_message(spool)
    ids = iter([taken, taken, "0000000000000001"])
    monkeypatch.setattr("gateway.queue.new_queue_id", lambda now: next(ids))
    writer = spool.open_message()
    assert writer.queue_id == "0000000000000001"
    writer.abort()


def test_open_message_on_unwritable_spool_raises_queue_error(spool: Spool) -> None:
    """
    When tmp/ is unusable, DATA fails with QueueError (452 4.3.1) instead
    of a traceback.
    """
    replace_with_file(os.path.join(spool.path, "tmp"))
    with pytest.raises(QueueError):
        spool.open_message()


def test_abort_removes_the_file_and_is_idempotent(spool: Spool) -> None:
    """
    abort() removes the temporary file, can be called again, and leaves a
    writer that refuses further writes with QueueError.
    """
    writer = receive(spool)
    writer.abort()
    writer.abort()
    assert files(spool, "tmp") == []
    assert writer.closed
    with pytest.raises(QueueError):
        writer.write(b"more")


def test_abort_never_raises(spool: Spool) -> None:
    """
    abort() swallows errors, even if the temporary file already vanished.
    """
    writer = receive(spool)
    os.unlink(writer.path)
    writer.abort()
    assert writer.closed


def write_limited(tmp_path: Path, when: str) -> dict[str, Any]:
    """
    Run a spool in a child process whose file size limit is 100 kB
    (RLIMIT_FSIZE gives EFBIG, as a full disk gives ENOSPC).
    """
    script = textwrap.dedent(
        """
        import json, resource, sys
        from twisted.internet.defer import maybeDeferred
        from twisted.internet.task import Clock
        from gateway.queue import QueueError, Spool
        from gateway.queuefile import Envelope, EnvelopeRecipient

        spool = Spool(sys.argv[1], run_in_thread=lambda f, *a: maybeDeferred(f, *a), clock=Clock(),
                      memory_limit=0)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        writer = spool.open_message()
        outcome = {}
        try:
            for _ in range(int(sys.argv[2])):
                writer.write(b"x" * 1000)
        except QueueError as e:
            outcome["write"] = str(e)
        else:
            envelope = Envelope(writer.queue_id, "", [EnvelopeRecipient("a@b.test")], 0.0)
            results = []
            spool.commit(writer, envelope).addBoth(results.append)
            outcome["commit"] = repr(results[0])
            failed = hasattr(results[0], "check")
            outcome["commit_is_queue_error"] = failed and bool(results[0].check(QueueError))
        print(json.dumps(outcome))
        """
    )
    chunks = {"write": 200, "commit": 120}[when]
    spool_path = tmp_path / "spool"
    output = subprocess.run(
        [sys.executable, "-c", script, str(spool_path), str(chunks)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        check=True,
        timeout=60,
    )
    outcome = json.loads(output.stdout)
    outcome["leftovers"] = {
        name: os.listdir(spool_path / name) for name in ("tmp", "data", "incoming")
    }
    return outcome


def test_write_past_file_size_limit_raises_queue_error(tmp_path: Path) -> None:
    """
    A write that hits EFBIG raises QueueError during DATA and removes the
    partial file.
    """
    outcome = write_limited(tmp_path, "write")
    assert "File too large" in outcome["write"]
    assert outcome["leftovers"] == {"tmp": [], "data": [], "incoming": []}


def test_flush_past_file_size_limit_fails_commit(tmp_path: Path) -> None:
    """
    When buffered content hits EFBIG only at commit, the commit fails with
    QueueError and nothing is left in the spool.
    """
    outcome = write_limited(tmp_path, "commit")
    assert outcome["commit_is_queue_error"], outcome
    assert "File too large" in outcome["commit"]
    assert outcome["leftovers"] == {"tmp": [], "data": [], "incoming": []}


# Commit


def test_commit_files_appear_only_when_the_deferred_fires(tmp_path: Path) -> None:
    """
    Until the batch has run (even after the message's own fsyncs), nothing
    is in data/ or incoming/ and the Deferred has not fired; when it fires,
    both files are there, the content intact and the envelope loadable with
    the size filled in.
    """
    runner = ManualRunner()
    spool = make_spool(tmp_path / "spool", runner)
    writer = receive(spool)
    d = spool.commit(writer, make_envelope(writer.queue_id))
    assert not has_result(d)
    assert files(spool, "data") == [] and files(spool, "incoming") == []
    runner.run_stages()
    assert not has_result(d)
    assert files(spool, "data") == [] and files(spool, "incoming") == []
    assert files(spool, "tmp") == [writer.queue_id + ".env", writer.queue_id + ".eml"][::-1]
    runner.run_batch()
    queue_id = result_of(d)
    assert queue_id == writer.queue_id
    assert files(spool, "data") == [queue_id + ".eml"]
    assert files(spool, "incoming") == [queue_id + ".env"]
    assert files(spool, "tmp") == []
    assert Path(spool.data_path(queue_id)).read_bytes() == CONTENT
    state, envelope = spool.load(queue_id)
    assert state == "incoming"
    assert envelope == make_envelope(queue_id, size=len(CONTENT))


def test_commit_serialises_the_envelope_when_called(tmp_path: Path) -> None:
    """
    The envelope is captured at commit(); changing the object afterwards,
    while the batch waits, changes nothing on disk.
    """
    runner = ManualRunner()
    spool = make_spool(tmp_path / "spool", runner)
    writer = receive(spool)
    envelope = make_envelope(writer.queue_id)
    d = spool.commit(writer, envelope)
    envelope.sender = "mallory@example.test"
    runner.run_stages()
    runner.run_batch()
    assert spool.load(result_of(d))[1].sender == "alice@example.test"


@pytest_twisted.ensureDeferred
async def test_commit_with_real_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    With a real thread pool, each commit's files exist at the moment its
    Deferred fires, and no fsync runs on the reactor thread.
    """
    from twisted.internet import reactor

    fsync_threads: list[int] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        fsync_threads.append(threading.get_ident())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    spool = Spool(tmp_path / "spool", run_in_thread=deferToThread, clock=reactor)
    seen: list[tuple[bool, bool]] = []

    def check(queue_id: str) -> str:
        seen.append(
            (
                os.path.exists(os.path.join(spool.path, "data", queue_id + ".eml")),
                os.path.exists(os.path.join(spool.path, "incoming", queue_id + ".env")),
            )
        )
        return queue_id

    ds = []
    for _ in range(5):
        writer = receive(spool)
        ds.append(spool.commit(writer, make_envelope(writer.queue_id)).addCallback(check))
    ids = await gatherResults(ds).addTimeout(10, reactor)
    assert seen == [(True, True)] * 5
    assert sorted(ids) == spool.list("incoming")
    await spool.drain().addTimeout(10, reactor)
    assert fsync_threads and threading.get_ident() not in fsync_threads


def test_commits_during_a_batch_are_grouped(tmp_path: Path, fsync_calls: list[str]) -> None:
    """
    Twenty commits requested while the first batch is in the thread go
    together in one second batch, and each batch fsyncs data/ and incoming/
    once, not once per message.
    """
    runner = ManualRunner()
    spool = make_spool(tmp_path / "spool", runner)
    first = receive(spool)
    ds = [spool.commit(first, make_envelope(first.queue_id))]
    runner.run_stages()
    for _ in range(20):
        writer = receive(spool)
        ds.append(spool.commit(writer, make_envelope(writer.queue_id)))
    runner.run_stages()
    assert runner.batch_sizes == [1]
    runner.run_batch()
    assert runner.batch_sizes == [1, 20]
    runner.run_batch()
    assert len({result_of(d) for d in ds}) == 21
    assert len(runner.batch_sizes) < 21
    spool_path = os.path.realpath(spool.path)
    directory_syncs = [p for p in fsync_calls if os.path.isdir(p)]
    assert directory_syncs == [
        os.path.join(spool_path, "data"),
        os.path.join(spool_path, "incoming"),
    ] * 2


@pytest_twisted.inlineCallbacks
def test_commits_during_a_batch_are_grouped_with_real_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """
    With real threads, while the first batch is blocked in its thread,
    twenty more commits do their own fsyncs in parallel and are then made
    durable together by one more batch.
    """
    from twisted.internet import reactor

    spool = Spool(tmp_path / "spool", run_in_thread=deferToThread, clock=reactor)
    real_batch = spool._commit_batch
    batch_sizes: list[int] = []
    in_first_batch = threading.Event()
    release = threading.Event()

    def counting_batch(jobs: list[Any]) -> Any:
        batch_sizes.append(len(jobs))
        if len(batch_sizes) == 1:
            in_first_batch.set()
            release.wait(10)
        return real_batch(jobs)

    # Count messages whose own fsyncs are done, so that the first batch is
    # released only when all twenty wait for the next one.
    real_staged = spool._cb_staged
    staged_count = [0]
    all_staged: Deferred[None] = Deferred()

    def counting_staged(result: object, pending: Any) -> None:
        real_staged(result, pending)
        staged_count[0] += 1
        if staged_count[0] == 21:
            all_staged.callback(None)

    monkeypatch.setattr(spool, "_commit_batch", counting_batch)
    monkeypatch.setattr(spool, "_cb_staged", counting_staged)
    first = receive(spool)
    ds = [spool.commit(first, make_envelope(first.queue_id))]
    yield deferToThread(in_first_batch.wait, 10).addTimeout(10, reactor)
    for _ in range(20):
        writer = receive(spool)
        ds.append(spool.commit(writer, make_envelope(writer.queue_id)))
    try:
        yield all_staged.addTimeout(10, reactor)
    finally:
        release.set()
    ids = yield gatherResults(ds).addTimeout(10, reactor)
    assert batch_sizes == [1, 20]
    assert len(batch_sizes) < len(ds)
    assert sorted(ids) == spool.list("incoming")


def test_commit_fsyncs_content_envelope_and_directories(
    spool: Spool, fsync_calls: list[str]
) -> None:
    """
    A commit fsyncs the content and the envelope (while in tmp/, before
    their renames) and then the data/ and incoming/ directories.
    """
    queue_id = queue_message(spool)
    base = os.path.realpath(spool.path)
    assert fsync_calls == [
        os.path.join(base, "tmp", queue_id + ".eml"),
        os.path.join(base, "tmp", queue_id + ".env"),
        os.path.join(base, "data"),
        os.path.join(base, "incoming"),
    ]


def test_commit_when_incoming_is_unusable(spool: Spool) -> None:
    """
    If the envelope cannot enter incoming/, the commit fails with
    QueueError and the content is taken out of data/ again: nothing is
    half-accepted.
    """
    writer = receive(spool)
    replace_with_file(os.path.join(spool.path, "incoming"))
    failure = failure_of(spool.commit(writer, make_envelope(writer.queue_id)), QueueError)
    assert isinstance(failure.value.__cause__, OSError)
    assert files(spool, "data") == []
    assert files(spool, "tmp") == []
    assert os.listdir(os.path.join(spool.path, "incoming.gone")) == []


def test_commit_when_tmp_is_replaced_by_a_file(spool: Spool) -> None:
    """
    If tmp/ becomes a regular file while a message is open, the commit
    fails with QueueError and neither data/ nor incoming/ gets anything.
    """
    writer = receive(spool)
    replace_with_file(os.path.join(spool.path, "tmp"))
    failure_of(spool.commit(writer, make_envelope(writer.queue_id)), QueueError)
    assert files(spool, "data") == []
    assert files(spool, "incoming") == []


def test_one_failure_leaves_the_rest_of_the_batch_alone(tmp_path: Path) -> None:
    """
    A message that fails inside a batch errbacks alone; the others in the
    same batch are committed.
    """
    runner = ManualRunner()
    spool = make_spool(tmp_path / "spool", runner)
    writers = [receive(spool) for _ in range(4)]
    ds = [spool.commit(w, make_envelope(w.queue_id)) for w in writers]
    os.unlink(writers[2].path)  # lost before its batch runs
    runner.run_stages()  # the first starts a batch, the others wait
    runner.run_batch()
    runner.run_batch()
    assert runner.batch_sizes == [1, 3]
    failure_of(ds[2], QueueError)
    good = sorted(result_of(d) for i, d in enumerate(ds) if i != 2)
    assert spool.list("incoming") == good
    assert files(spool, "data") == [q + ".eml" for q in good]
    assert files(spool, "tmp") == []


def test_directory_fsync_failure_fails_the_whole_batch(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    If a directory fsync fails, durability is unknown for every message of
    the batch, so all of them fail and their files are removed.
    """
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    writer = receive(spool)
    failure = failure_of(spool.commit(writer, make_envelope(writer.queue_id)), QueueError)
    assert "Input/output error" in str(failure.value)
    assert files(spool, "data") == [] and files(spool, "incoming") == []


@pytest.mark.parametrize("failing_step", ["_stage", "_commit_batch"])
def test_failing_thread_runner_fails_commits_cleanly(tmp_path: Path, failing_step: str) -> None:
    """
    If the thread runner itself fails (a stopped pool) for either step, the
    commit fails with that error, the message's files are removed, and the
    spool is idle again.
    """

    def runner(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if f.__name__ == failing_step:
            return fail(RuntimeError("pool stopped"))
        return maybeDeferred(f, *args)

    spool = make_spool(tmp_path / "spool", runner)
    writer = receive(spool)
    failure_of(spool.commit(writer, make_envelope(writer.queue_id)), RuntimeError)
    for name in ("tmp", "data", "incoming"):
        assert files(spool, name) == []
    assert has_result(spool.drain())


def test_invalid_envelope_fails_commit_and_aborts(spool: Spool) -> None:
    """
    An envelope that could not be read back (no recipients) is refused with
    EnvelopeError before any I/O, and the message is aborted.
    """
    writer = receive(spool)
    failure_of(spool.commit(writer, make_envelope(writer.queue_id, recipients=[])), EnvelopeError)
    assert writer.closed
    assert files(spool, "tmp") == []


def test_commit_checks_the_writer(spool: Spool) -> None:
    """
    An envelope for another id, or a writer already committed, is a caller
    bug reported as ValueError; abort() after commit does nothing.
    """
    writer = receive(spool)
    failure_of(spool.commit(writer, make_envelope(new_queue_id(1.0))), ValueError)
    queue_id = result_of(spool.commit(writer, make_envelope(writer.queue_id)))
    failure_of(spool.commit(writer, make_envelope(writer.queue_id)), ValueError)
    writer.abort()
    assert os.path.exists(spool.data_path(queue_id))


def test_commits_from_callbacks_join_the_next_batch(tmp_path: Path) -> None:
    """
    Commits requested from a commit's callback wait for the next batch
    (together) instead of re-entering the running one.
    """
    runner = ManualRunner(hold_stages=False)
    spool = make_spool(tmp_path / "spool", runner)
    later = [receive(spool) for _ in range(2)]
    first = receive(spool)
    chained: list[Deferred[str]] = []

    def commit_more(queue_id: str) -> str:
        for w in later:
            chained.append(spool.commit(w, make_envelope(w.queue_id)))
        return queue_id

    spool.commit(first, make_envelope(first.queue_id)).addCallback(commit_more)
    runner.run_batch()
    assert runner.batch_sizes == [1, 2]
    runner.run_batch()
    assert [result_of(d) for d in chained] == [w.queue_id for w in later]


def test_drain_waits_for_running_batches(tmp_path: Path) -> None:
    """
    drain() fires at once when idle, and otherwise only after the running
    and pending batches are done (for a clean stopService).
    """
    runner = ManualRunner()
    spool = make_spool(tmp_path / "spool", runner)
    assert has_result(spool.drain())
    writers = [receive(spool) for _ in range(2)]
    for w in writers:
        spool.commit(w, make_envelope(w.queue_id))
    drained = spool.drain()
    runner.run_stages()
    runner.run_batch()
    assert not has_result(drained)
    runner.run_batch()
    assert result_of(drained) is None


# Recovery


def restart(spool: Spool) -> Spool:
    """
    A new Spool on the same directory, as after a restart.
    """
    return make_spool(Path(spool.path))


def test_recover_requeues_stale_active_entries(spool: Spool) -> None:
    """
    An envelope leased to active/ when the process died goes back to
    incoming/.
    """
    queue_id = queue_message(spool)
    spool.move(queue_id, "incoming", "active")
    counts = restart(spool).recover()
    assert counts["requeued"] == 1 and counts["queued"] == 1
    assert spool.list("active") == [] and spool.list("incoming") == [queue_id]


def test_recover_moves_envelope_without_content_to_corrupt(spool: Spool) -> None:
    """
    An envelope whose content is missing is never delivered: it goes to
    corrupt/.
    """
    queue_id = queue_message(spool)
    os.unlink(spool.data_path(queue_id))
    counts = restart(spool).recover()
    assert counts["corrupt"] == 1 and counts["queued"] == 0
    assert spool.list("incoming") == [] and spool.list("corrupt") == [queue_id]
    assert files(spool, "corrupt") == [queue_id + ".env"]


def test_recover_deletes_content_without_envelope(spool: Spool) -> None:
    """
    Content with no envelope anywhere was never acknowledged, so it is
    deleted; content of queued messages is kept.
    """
    kept = queue_message(spool)
    orphan = new_queue_id(1_700_000_001.0)
    Path(spool.path, "data", orphan + ".eml").write_bytes(CONTENT)
    counts = restart(spool).recover()
    assert counts["orphans_removed"] == 1
    assert files(spool, "data") == [kept + ".eml"]


def test_recover_moves_truncated_envelope_and_content_to_corrupt(spool: Spool) -> None:
    """
    A truncated envelope goes to corrupt/ together with its content, where
    gatewayctl can still find both; nothing of it is left to deliver.
    """
    queue_id = queue_message(spool)
    path = Path(spool.path, "incoming", queue_id + ".env")
    path.write_bytes(path.read_bytes()[:40])
    counts = restart(spool).recover()
    assert counts["corrupt"] == 1
    assert files(spool, "corrupt") == [queue_id + ".env", queue_id + ".eml"][::-1]
    assert files(spool, "data") == [] and spool.list("incoming") == []
    assert spool.list("corrupt") == [queue_id]
    assert spool.data_path(queue_id) == os.path.join(spool.path, "corrupt", queue_id + ".eml")
    with pytest.raises(EnvelopeError):
        spool.load(queue_id)


def test_recover_moves_envelope_naming_another_id_to_corrupt(spool: Spool) -> None:
    """
    An envelope whose queue_id does not match its file name is corrupt.
    """
    queue_id = queue_message(spool)
    other = make_envelope(new_queue_id(1.0))
    Path(spool.path, "deferred", queue_id + ".env").write_bytes(dump_envelope(other))
    os.unlink(Path(spool.path, "incoming", queue_id + ".env"))
    assert restart(spool).recover()["corrupt"] == 1
    assert spool.list("corrupt") == [queue_id]


def test_recover_empties_tmp(spool: Spool) -> None:
    """
    Messages that were being received or envelopes being written when the
    process died are removed from tmp/.
    """
    Path(spool.path, "tmp", new_queue_id(1.0) + ".eml").write_bytes(CONTENT)
    Path(spool.path, "tmp", "leftover.env").write_bytes(b"{")
    counts = restart(spool).recover()
    assert counts["tmp_removed"] == 2
    assert files(spool, "tmp") == []


def test_recover_leaves_unknown_files_alone(spool: Spool) -> None:
    """
    Files whose names are not queue files are logged and kept, never
    deleted or delivered.
    """
    Path(spool.path, "incoming", "README").write_bytes(b"")
    Path(spool.path, "data", "notes.txt").write_bytes(b"")
    counts = restart(spool).recover()
    assert counts["ignored"] == 2
    assert files(spool, "incoming") == ["README"] and files(spool, "data") == ["notes.txt"]


def test_recover_handles_everything_at_once(spool: Spool, fsync_calls: list[str]) -> None:
    """
    One recovery handles each kind of damage, returns the counts, makes
    the result durable with directory fsyncs, and a second run finds
    nothing more to do.
    """
    stale = queue_message(spool)
    spool.move(stale, "incoming", "active")
    deferred = queue_message(spool)
    spool.move(deferred, "incoming", "deferred")
    held = queue_message(spool)
    spool.move(held, "incoming", "hold")
    no_content = queue_message(spool)
    os.unlink(spool.data_path(no_content))
    truncated = queue_message(spool)
    env = Path(spool.path, "incoming", truncated + ".env")
    env.write_bytes(env.read_bytes()[:-2])
    Path(spool.path, "data", new_queue_id(1_700_000_002.0) + ".eml").write_bytes(b"x")
    Path(spool.path, "tmp", new_queue_id(1_700_000_003.0) + ".eml").write_bytes(b"x")
    fsync_calls.clear()

    recovered = restart(spool)
    assert recovered.recover() == {
        "requeued": 1,
        "corrupt": 2,
        "orphans_removed": 1,
        "tmp_removed": 1,
        "ignored": 0,
        "queued": 3,
    }
    assert recovered.list("incoming") == [stale]
    assert recovered.list("deferred") == [deferred]
    assert recovered.list("hold") == [held]
    assert recovered.list("corrupt") == sorted([no_content, truncated])
    base = os.path.realpath(spool.path)
    for name in ("tmp", "data") + STATES:
        assert os.path.join(base, name) in fsync_calls
    assert restart(spool).recover() == {
        "requeued": 0,
        "corrupt": 0,
        "orphans_removed": 0,
        "tmp_removed": 0,
        "ignored": 0,
        "queued": 3,
    }


# Read and admin API


def test_list_is_oldest_first(tmp_path: Path) -> None:
    """
    list() returns queue ids in receiving order, which the scheduler uses
    as first-in first-out.
    """
    clock = Clock()
    spool = Spool(tmp_path / "spool", run_in_thread=run_now, clock=clock)
    ids = []
    for second in (5, 10, 15):
        clock.advance(second)
        ids.append(queue_message(spool))
    assert spool.list("incoming") == ids


def test_list_rejects_unknown_state(spool: Spool) -> None:
    """
    Only the documented states can be listed; tmp/ and data/ are not states.
    """
    with pytest.raises(ValueError):
        spool.list("tmp")


def test_load_finds_the_state(spool: Spool) -> None:
    """
    load() finds the message in whichever state it is.
    """
    queue_id = queue_message(spool)
    spool.move(queue_id, "incoming", "deferred")
    state, envelope = spool.load(queue_id)
    assert state == "deferred" and envelope.queue_id == queue_id


@pytest.mark.parametrize("queue_id", ["0000000000000000", "../incoming/x", "", "lower"])
def test_unknown_or_malformed_ids_are_key_errors(spool: Spool, queue_id: str) -> None:
    """
    An unknown id, or one that is not an id at all (a path typed at
    gatewayctl), is a KeyError in load, move and remove, and never touches
    a path outside the spool.
    """
    with pytest.raises(KeyError):
        spool.load(queue_id)
    with pytest.raises(KeyError):
        spool.move(queue_id, "incoming", "hold")
    with pytest.raises(KeyError):
        spool.remove(queue_id)


def test_data_path_rejects_malformed_ids(spool: Spool) -> None:
    """
    data_path() refuses to build a path from something that is not an id.
    """
    with pytest.raises(ValueError):
        spool.data_path("../../etc/passwd")


def test_move_between_states(spool: Spool) -> None:
    """
    move() renames the envelope; the content stays in data/.
    """
    queue_id = queue_message(spool)
    spool.move(queue_id, "incoming", "active")
    spool.move(queue_id, "active", "deferred")
    assert spool.counts() == {
        "incoming": 0,
        "active": 0,
        "deferred": 1,
        "hold": 0,
        "corrupt": 0,
    }
    assert files(spool, "data") == [queue_id + ".eml"]
    with pytest.raises(KeyError):
        spool.move(queue_id, "incoming", "hold")
    with pytest.raises(ValueError):
        spool.move(queue_id, "deferred", "sent")


def test_move_never_overwrites(spool: Spool) -> None:
    """
    Moving onto an envelope already present in the target state fails with
    QueueError rather than silently dropping one copy.
    """
    queue_id = queue_message(spool)
    source = Path(spool.path, "incoming", queue_id + ".env")
    Path(spool.path, "hold", queue_id + ".env").write_bytes(source.read_bytes())
    with pytest.raises(QueueError):
        spool.move(queue_id, "incoming", "hold")
    assert source.exists()


def test_move_fsyncs_only_when_asked(spool: Spool, fsync_calls: list[str]) -> None:
    """
    A plain move does no fsync (cheap on the reactor thread); sync=True
    fsyncs both directories, for moves a crash must not undo.
    """
    queue_id = queue_message(spool)
    fsync_calls.clear()
    spool.move(queue_id, "incoming", "active")
    assert fsync_calls == []
    spool.move(queue_id, "active", "hold", sync=True)
    base = os.path.realpath(spool.path)
    assert fsync_calls == [os.path.join(base, "hold"), os.path.join(base, "active")]


def test_move_out_of_corrupt_restores_content(spool: Spool) -> None:
    """
    After an operator repairs a corrupt envelope, moving it back to a live
    state brings its content back to data/.
    """
    queue_id = queue_message(spool)
    path = Path(spool.path, "incoming", queue_id + ".env")
    good = path.read_bytes()
    path.write_bytes(good[:10])
    restart(spool).recover()
    Path(spool.path, "corrupt", queue_id + ".env").write_bytes(good)
    spool.move(queue_id, "corrupt", "incoming")
    assert files(spool, "corrupt") == []
    assert Path(spool.data_path(queue_id)).read_bytes() == CONTENT
    assert restart(spool).recover()["queued"] == 1


def test_update_rewrites_the_envelope_durably(spool: Spool, fsync_calls: list[str]) -> None:
    """
    update() replaces the envelope in place via tmp/, fsyncing the file and
    the state directory, and leaves nothing in tmp/.
    """
    queue_id = queue_message(spool)
    spool.move(queue_id, "incoming", "deferred")
    state, envelope = spool.load(queue_id)
    envelope.attempts = 1
    envelope.next_attempt = 1_700_000_900.0
    envelope.recipients[0].status = "deferred"
    envelope.recipients[0].last_reply = "451 4.3.0 later"
    fsync_calls.clear()
    spool.update(queue_id, "deferred", envelope)
    assert spool.load(queue_id) == ("deferred", envelope)
    assert files(spool, "tmp") == []
    base = os.path.realpath(spool.path)
    assert len(fsync_calls) == 2
    assert fsync_calls[0].startswith(os.path.join(base, "tmp", queue_id))
    assert fsync_calls[1] == os.path.join(base, "deferred")


def test_update_refuses_to_create_a_second_copy(spool: Spool) -> None:
    """
    update() only rewrites an envelope where it is: naming another state
    is a KeyError, so a message never ends up in two states.
    """
    queue_id = queue_message(spool)
    _, envelope = spool.load(queue_id)
    with pytest.raises(KeyError):
        spool.update(queue_id, "deferred", envelope)
    assert spool.list("deferred") == []


def test_update_keeps_the_old_envelope_on_bad_input(spool: Spool) -> None:
    """
    An invalid envelope or one for another id is refused before anything
    is written; the old envelope stays.
    """
    queue_id = queue_message(spool)
    _, envelope = spool.load(queue_id)
    before = Path(spool.path, "incoming", queue_id + ".env").read_bytes()
    with pytest.raises(ValueError):
        spool.update(queue_id, "incoming", make_envelope(new_queue_id(1.0)))
    envelope.recipients = []
    with pytest.raises(EnvelopeError):
        spool.update(queue_id, "incoming", envelope)
    assert Path(spool.path, "incoming", queue_id + ".env").read_bytes() == before
    assert files(spool, "tmp") == []


def test_update_failure_raises_queue_error(spool: Spool) -> None:
    """
    If the new envelope cannot be written, update() raises QueueError and
    the old envelope is kept.
    """
    queue_id = queue_message(spool)
    _, envelope = spool.load(queue_id)
    replace_with_file(os.path.join(spool.path, "tmp"))
    with pytest.raises(QueueError):
        spool.update(queue_id, "incoming", envelope)
    assert load_envelope(Path(spool.path, "incoming", queue_id + ".env").read_bytes()) == envelope


def test_remove_deletes_envelope_and_content(spool: Spool) -> None:
    """
    remove() deletes a delivered message entirely; removing it again is a
    KeyError.
    """
    queue_id = queue_message(spool)
    spool.move(queue_id, "incoming", "active")
    spool.remove(queue_id)
    assert files(spool, "data") == [] and spool.counts()["active"] == 0
    with pytest.raises(KeyError):
        spool.remove(queue_id)


def test_remove_deletes_corrupt_messages(spool: Spool) -> None:
    """
    remove() also clears a corrupt message, including content that
    recovery moved to corrupt/.
    """
    queue_id = queue_message(spool)
    Path(spool.path, "incoming", queue_id + ".env").write_bytes(b"garbage")
    restart(spool).recover()
    spool.remove(queue_id)
    assert files(spool, "corrupt") == []


# Small messages stay in memory until the commit thread writes them.


def test_small_message_touches_no_file_until_commit(tmp_path: Path) -> None:
    """
    With the default memory limit a small message creates no file while it
    is received; its content is readable through open_content(), and the
    commit writes, fsyncs and queues it like any other.
    """
    spool = make_spool(tmp_path / "spool", memory_limit=1024)
    writer = spool.open_message()
    writer.write(b"Subject: small\r\n\r\nbody\r\n")
    writer.flush()
    assert files(spool, "tmp") == []
    with writer.open_content() as content:
        assert content.read() == b"Subject: small\r\n\r\nbody\r\n"
    queue_id = result_of(spool.commit(writer, make_envelope(writer.queue_id)))
    assert spool.list("incoming") == [queue_id]
    assert Path(spool.data_path(queue_id)).read_bytes() == b"Subject: small\r\n\r\nbody\r\n"
    assert files(spool, "tmp") == []


def test_message_past_memory_limit_spills_to_tmp(tmp_path: Path) -> None:
    """
    Content that grows past the memory limit moves to tmp/<id>.eml and
    streams there from then on, so a large message never sits in memory.
    """
    spool = make_spool(tmp_path / "spool", memory_limit=10)
    writer = spool.open_message()
    writer.write(b"12345")
    assert files(spool, "tmp") == []
    writer.write(b"67890abcdef")
    writer.flush()
    assert Path(writer.path).read_bytes() == b"1234567890abcdef"
    writer.abort()
    assert files(spool, "tmp") == []


def test_aborted_memory_message_leaves_nothing(tmp_path: Path) -> None:
    """
    Aborting a message held in memory leaves no file and refuses further
    writes.
    """
    spool = make_spool(tmp_path / "spool", memory_limit=1024)
    writer = spool.open_message()
    writer.write(b"abc")
    writer.abort()
    assert writer.closed
    assert files(spool, "tmp") == []
    with pytest.raises(QueueError):
        writer.write(b"more")
