# -*- test-case-name: tests.test_queue -*-
"""
The spool: the single writer of queued mail, with Postfix's semantics.

A message is accepted (250 after DATA) only once its content and envelope
are on disk and fsync'ed, file and directory.  Queue states are
directories, and every state change after the commit is one atomic rename
within one file system::

    tmp/        <id>.eml being streamed during DATA; <id>.env being written
    data/       <id>.eml committed content, immutable, never moved
    incoming/   <id>.env committed envelope: the commit point
    active/     <id>.env leased by the scheduler; back to incoming/ at start
    deferred/   <id>.env waiting for next_attempt (inside the envelope)
    hold/       <id>.env quarantined by an admin or a plugin; no retries
    corrupt/    whatever failed to parse or lost its other half

A commit runs in threads in two steps.  Each message's own files are
fsync'ed in C{tmp/} in parallel with other messages (concurrent fsyncs share
journal commits).  Then the renames into C{data/} and C{incoming/} and the two
directory fsyncs are done for a whole batch at once (group commit): messages
staged while one batch runs go together in the next, so the directory
fsyncs are paid once per batch, however many messages it holds.

Standards:
    RFC 5321 section 4.5.4 and 6.1 (a 250 after DATA is a promise to
    deliver or bounce), RFC 3463 (452 4.3.1 when the spool fails).

See also:
    L{gateway.queuefile} (envelope format), Postfix C{mail_stream.c},
    C{cleanup(8)}, C{qmgr(8)} and C{postsuper(1)} (states and recovery),
    Haraka C{fsync_writestream} (file fsync, but no directory fsync).
"""

from __future__ import annotations

import dataclasses
import errno
import collections
import io
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Final

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.queuefile import (
    Envelope,
    EnvelopeError,
    dump_envelope,
    is_queue_id,
    load_envelope,
    new_queue_id,
)

__all__ = ["STATES", "MessageWriter", "QueueError", "Spool"]

#: The state directories an envelope can be in, in the order L{Spool.load}
#: searches them.
STATES: Final = ("incoming", "active", "deferred", "hold", "corrupt")

_DIRECTORIES: Final = ("tmp", "data") + STATES
_DATA_SUFFIX: Final = ".eml"
_ENVELOPE_SUFFIX: Final = ".env"
_WRITE_BUFFER: Final = 64 * 1024
#: Content up to this size stays in memory until the commit thread writes it.
MEMORY_LIMIT: Final = 256 * 1024
_ID_ATTEMPTS: Final = 8


class QueueError(Exception):
    """
    The spool could not store or change a message.

    It wraps the L{OSError} (ENOSPC, EFBIG, EIO, EROFS, ...) as
    C{__cause__}.  The server answers it with C{452 4.3.1}: the client keeps
    the message and tries again later, and nothing was half-accepted.
    """


def _queue_error(action: str, queue_id: str, error: OSError) -> QueueError:
    reason = error.strerror or str(error)
    exc = QueueError(f"cannot {action} {queue_id}: {reason}")
    exc.__cause__ = error
    return exc


class MessageWriter:
    """
    The content of one message being received.

    Content is kept in memory until it passes C{memory_limit} (256 KiB by
    default); only a larger message gets its C{tmp/<queue_id>.eml} file
    while it streams in.  Why: creating and writing a file on the reactor
    thread can stall behind other threads' fsyncs (the journal lock), and
    most mail is small.  The memory held is bounded by the limit times the
    number of concurrent DATA phases, and a 50 MB message still streams to
    disk.  Either way the fsync that makes the content durable is done
    once, in a thread, by L{Spool.commit}.  After L{Spool.commit} the
    writer belongs to the spool; after a failed L{write} or L{flush} it is
    already aborted.

    @ivar queue_id: The id the message will be queued under.
    @ivar size: Octets written so far.
    @ivar path: The temporary file (it exists only once the content went
        past the memory limit, or after the commit step created it).
    """

    log = Logger()

    def __init__(self, queue_id: str, path: str, file: IO[bytes] | None = None,
                 memory_limit: int = MEMORY_LIMIT) -> None:
        self.queue_id = queue_id
        self.path = path
        self.size = 0
        self._file: IO[bytes] | None = file
        self._buffer: bytearray | None = None if file is not None else bytearray()
        self._memory_limit = memory_limit
        self._committing = False
        self._aborted = False

    def write(self, data: bytes) -> None:
        """
        Append C{data} to the message content.

        @param data: The next octets, already dot-unstuffed.
        @raise QueueError: If the write fails or the writer is no longer
            open; the writer is then aborted (the temporary file is gone).
        """
        self._check_open("write")
        if self._file is None:
            if len(self._buffer) + len(data) <= self._memory_limit:
                self._buffer += data
                self.size += len(data)
                return
            self._spill()
        try:
            self._file.write(data)
        except OSError as e:
            self.abort()
            raise _queue_error("write", self.queue_id, e) from e
        self.size += len(data)

    def _spill(self) -> None:
        """Move the content so far into C{tmp/}: the message is large."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            self._file = os.fdopen(fd, "wb", _WRITE_BUFFER)
            self._file.write(self._buffer)
        except OSError as e:
            self.abort()
            raise _queue_error("write", self.queue_id, e) from e
        self._buffer = None

    def flush(self) -> None:
        """
        Push buffered content to the file (when there is one).

        No fsync: durability comes from L{Spool.commit}.  End-of-data
        checks read the content with L{open_content}.

        @raise QueueError: As for L{write}.
        """
        self._check_open("flush")
        if self._file is None:
            return
        try:
            self._file.flush()
        except OSError as e:
            self.abort()
            raise _queue_error("flush", self.queue_id, e) from e

    def open_content(self) -> IO[bytes]:
        """A new binary file over the content so far (after L{flush})."""
        self._check_open("read")
        if self._file is None:
            return io.BytesIO(bytes(self._buffer))
        return open(self.path, "rb")

    def abort(self) -> None:
        """
        Throw the message away: drop the buffer, or close and unlink the
        temporary file.

        Idempotent and never raises, so it is safe in any cleanup path
        (rejected DATA, size limit, lost connection).  Once the writer was
        handed to L{Spool.commit} this does nothing: the commit decides.
        """
        if self._aborted or self._committing:
            return
        self._aborted = True
        self._buffer = None
        if self._file is None:
            return
        file, self._file = self._file, None
        try:
            # Unlink first, so a close that flushes into a full disk
            # does not matter.
            os.unlink(self.path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                self.log.warn(
                    "Cannot remove {path} of {queue_id}: {reason}",
                    path=self.path,
                    queue_id=self.queue_id,
                    reason=e.strerror,
                )
        try:
            file.close()
        except OSError:
            pass

    @property
    def closed(self) -> bool:
        """
        L{True} once the writer was aborted or handed to the spool.
        """
        return self._aborted or self._committing

    def _check_open(self, action: str) -> None:
        if self._aborted or self._committing:
            raise QueueError(f"cannot {action} {self.queue_id}: message is closed")

    def _take_for_commit(self) -> Any:
        self._check_open("commit")
        self._committing = True
        if self._file is not None:
            return self._file
        return _PendingFile(self.path, bytes(self._buffer))


class _PendingFile:
    """Content held in memory, written to its C{tmp/} file by the commit
    thread: quacks like the file object L{Spool._stage} expects."""

    def __init__(self, path: str, content: bytes) -> None:
        self.path = path
        self.content = content
        self._fd: int | None = None

    def flush(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._fd = fd
        _write_all(fd, self.content)

    def fileno(self) -> int:
        assert self._fd is not None
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class _CommitJob:
    """
    What the threads need for one message; the reactor thread does not
    touch it while a thread has it.

    @ivar discarded: Set by the thread that removed the message's files
        after a failure, so that the reactor does not do it again.
    """

    queue_id: str
    file: IO[bytes]
    envelope_bytes: bytes
    discarded: bool = False


@dataclass
class _PendingCommit:
    job: _CommitJob
    deferred: Deferred[str]


class Spool:
    """
    The queue on disk, and the only code that changes it.

    Blocking file system work on the reception path (fsync and renames of
    a commit) runs through the injected C{run_in_thread}; the small
    read/admin methods are synchronous and are meant for the scheduler
    (renames only, no fsync) or for code already in a thread.

    @ivar path: The spool directory.
    """

    log = Logger()

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        run_in_thread: Callable[..., Deferred],
        clock: IReactorTime,
        memory_limit: int = MEMORY_LIMIT,
    ) -> None:
        """
        Open the spool, creating missing directories with mode 0700.

        @param memory_limit: Content up to this many octets is held in
            memory until the commit (see L{MessageWriter}); 0 streams every
            message to C{tmp/} from its first octet.

        @param path: The spool directory; created if missing.
        @param run_in_thread: C{run_in_thread(f, *args)} returns a Deferred
            of C{f(*args)} run off the reactor thread, e.g.
            C{functools.partial(deferToThreadPool, reactor,
            reactor.getThreadPool())}.
        @param clock: Source of the time encoded in queue ids.
        @raise QueueError: If a directory cannot be created.
        """
        self.path = os.fspath(path)
        self._run_in_thread = run_in_thread
        self._clock = clock
        self._memory_limit = memory_limit
        self._staged: list[_PendingCommit] = []
        self._batch_running = False
        self._in_flight = 0
        self._idle_waiters: list[Deferred[None]] = []
        self._tmp_names = itertools.count()
        # Ids handed out recently: a duplicate within this process is
        # refused without touching the disk (across processes the random
        # part makes one vanishingly rare, and O_EXCL at commit catches it).
        self._open_ids: set[str] = set()
        self._open_order: collections.deque[str] = collections.deque(maxlen=100_000)
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            for name in _DIRECTORIES:
                os.makedirs(self._dir(name), mode=0o700, exist_ok=True)
        except OSError as e:
            raise _queue_error("create spool", self.path, e) from e

    # Reception: open, write, commit.

    def open_message(self) -> MessageWriter:
        """
        Start a new message in C{tmp/}, under a new queue id.

        Called at DATA; does not touch the disk (a stat can take as long as
        a reply on a busy disk): the content's file is made later, see
        L{MessageWriter}, and an id already in C{data/} is refused by the
        commit, which never replaces an existing message.

        @return: The writer for the content.
        @raise QueueError: If the spool is unwritable.
        """
        for _ in range(_ID_ATTEMPTS):
            queue_id = new_queue_id(self._clock.seconds())
            if queue_id in self._open_ids:
                continue
            if len(self._open_order) == self._open_order.maxlen:
                self._open_ids.discard(self._open_order[0])
            self._open_ids.add(queue_id)
            self._open_order.append(queue_id)
            writer = MessageWriter(queue_id, self._tmp_file(queue_id + _DATA_SUFFIX),
                                   memory_limit=self._memory_limit)
            if self._memory_limit <= 0:
                writer._spill()
            return writer
        error = FileExistsError(errno.EEXIST, "queue id collision")
        raise _queue_error("open message", "new id", error) from error

    def commit(self, writer: MessageWriter, envelope: Envelope) -> Deferred[str]:
        """
        Make the message durable and queue it in C{incoming/}.

        When the Deferred fires with the queue id, C{data/<id>.eml} and
        C{incoming/<id>.env} are fsync'ed, and so are both directories, so
        the 250 may be sent; neither file is in place before the final
        batch step.  The envelope is serialised now, on the calling thread
        (the caller may change its object afterwards), with C{size} set to
        C{writer.size}.

        The work has two steps, both through C{run_in_thread}:
          1. I{stage}, one thread call per message, run in parallel: flush
             and fsync C{tmp/<id>.eml}, write and fsync C{tmp/<id>.env}.
             Concurrent fsyncs are what file systems batch well (ext4
             joins them into one journal commit).
          2. I{batch}, one call at a time for every message staged so far
             (group commit): rename the contents into C{data/}, fsync
             C{data/}, rename the envelopes into C{incoming/}, fsync
             C{incoming/}.  Messages staged while a batch runs go together
             in the next one, so the directory fsyncs are paid once per
             batch, not once per message.

        @param writer: From L{open_message}; it belongs to the spool now.
        @param envelope: Its C{queue_id} must be C{writer.queue_id}.
        @return: A Deferred firing with the queue id, or failing with
            L{QueueError} (the spool failed; nothing of the message is left)
            or L{EnvelopeError} (the envelope is invalid; the writer is
            aborted).  A L{ValueError} is a caller bug (wrong id, writer
            already committed or aborted).
        """
        if envelope.queue_id != writer.queue_id:
            return fail(
                ValueError(
                    f"envelope {envelope.queue_id!r} is not for message {writer.queue_id!r}"
                )
            )
        if writer.closed:
            return fail(ValueError(f"message {writer.queue_id} is already closed"))
        try:
            envelope_bytes = dump_envelope(dataclasses.replace(envelope, size=writer.size))
        except EnvelopeError:
            writer.abort()
            return fail()
        job = _CommitJob(writer.queue_id, writer._take_for_commit(), envelope_bytes)
        pending = _PendingCommit(job, Deferred())
        self._in_flight += 1
        self._call_in_thread(self._stage, job).addCallbacks(
            self._cb_staged,
            self._eb_staged,
            callbackArgs=(pending,),
            errbackArgs=(pending,),
        )
        return pending.deferred

    def drain(self) -> Deferred[None]:
        """
        Wait until no commit is in progress.

        For C{stopService}: the reactor should not stop while a commit is
        half done in a thread, because the clients would not get their
        250 and would send the messages again.

        @return: A Deferred that fires with L{None} once idle.
        """
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        self._notify_if_idle()
        return d

    def _call_in_thread(self, f: Callable[..., object], *args: object) -> Deferred:
        try:
            return self._run_in_thread(f, *args)
        except Exception:
            return fail()

    def _cb_staged(self, _: object, pending: _PendingCommit) -> None:
        self._staged.append(pending)
        if not self._batch_running:
            self._start_batch()

    def _eb_staged(self, failure: Failure, pending: _PendingCommit) -> None:
        if not pending.job.discarded:
            # The thread runner failed before _stage could clean up.
            self._close_and_discard(pending.job)
        self._finish(pending, failure)

    def _start_batch(self) -> None:
        batch, self._staged = self._staged, []
        self._batch_running = True
        jobs = [p.job for p in batch]
        self._call_in_thread(self._commit_batch, jobs).addBoth(self._batch_done, batch)

    def _batch_done(
        self, result: list[BaseException | None] | Failure, batch: list[_PendingCommit]
    ) -> None:
        if isinstance(result, Failure):
            # Only a bug or a stopped thread pool gets here; clean up on
            # this thread rather than leave half-committed files.
            self.log.failure("Commit batch failed", result)
            for pending in batch:
                self._close_and_discard(pending.job)
            outcomes: list[BaseException | Failure | None] = [result] * len(batch)
        else:
            outcomes = list(result)
        # Fire while still marked running: messages staged from these
        # callbacks join the next batch instead of starting one each.
        for pending, outcome in zip(batch, outcomes):
            if outcome is None:
                self._finish(pending, pending.job.queue_id)
            else:
                self._finish(pending, outcome if isinstance(outcome, Failure) else Failure(outcome))
        self._batch_running = False
        if self._staged:
            self._start_batch()
        self._notify_if_idle()

    def _finish(self, pending: _PendingCommit, result: str | Failure) -> None:
        self._in_flight -= 1
        if isinstance(result, Failure):
            self.log.error(
                "Commit of {queue_id} failed: {reason}",
                queue_id=pending.job.queue_id,
                reason=str(result.value),
            )
            pending.deferred.errback(result)
        else:
            pending.deferred.callback(result)
        self._notify_if_idle()

    def _notify_if_idle(self) -> None:
        if self._in_flight == 0 and not self._batch_running:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _close_and_discard(self, job: _CommitJob) -> None:
        try:
            job.file.close()
        except OSError:
            pass
        self._discard_files(job.queue_id)
        job.discarded = True

    def _stage(self, job: _CommitJob) -> None:
        """
        Make the content and the envelope durable in C{tmp/}; runs in a
        thread, in parallel with other messages.

        @raise QueueError: After removing the message's files.
        """
        try:
            try:
                job.file.flush()
                os.fsync(job.file.fileno())
            finally:
                job.file.close()
            fd = os.open(
                self._tmp_file(job.queue_id + _ENVELOPE_SUFFIX),
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                0o600,
            )
            try:
                _write_all(fd, job.envelope_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as e:
            self._discard_files(job.queue_id)
            job.discarded = True
            if isinstance(e, OSError):
                raise _queue_error("commit", job.queue_id, e) from e
            raise

    def _commit_batch(self, jobs: list[_CommitJob]) -> list[BaseException | None]:
        """
        Move a batch of staged messages into the queue; runs in a thread,
        one batch at a time.

        All contents enter C{data/} and that directory is fsync'ed before
        any envelope enters C{incoming/}, so even a crash in the middle
        never leaves an envelope whose content could vanish.

        @return: Per job, L{None} on success or the exception; a failed job
            has had its files removed.
        """
        errors: list[BaseException | None] = [None] * len(jobs)

        def fail_job(index: int, error: OSError) -> None:
            queue_id = jobs[index].queue_id
            errors[index] = _queue_error("commit", queue_id, error)
            self._discard_files(queue_id)
            jobs[index].discarded = True

        moved = []
        for index, job in enumerate(jobs):
            try:
                if os.path.lexists(self._data_file(job.queue_id)):
                    raise FileExistsError(errno.EEXIST, "queue id already in data/")
                os.rename(
                    self._tmp_file(job.queue_id + _DATA_SUFFIX), self._data_file(job.queue_id)
                )
            except OSError as e:
                fail_job(index, e)
            else:
                moved.append(index)
        if not moved:
            return errors
        try:
            self._sync_directory("data")
        except OSError as e:
            for index in moved:
                fail_job(index, e)
            return errors
        queued = []
        for index in moved:
            queue_id = jobs[index].queue_id
            try:
                os.rename(
                    self._tmp_file(queue_id + _ENVELOPE_SUFFIX),
                    self._envelope_file("incoming", queue_id),
                )
            except OSError as e:
                fail_job(index, e)
            else:
                queued.append(index)
        if queued:
            try:
                self._sync_directory("incoming")
            except OSError as e:
                for index in queued:
                    fail_job(index, e)
        return errors

    def _discard_files(self, queue_id: str) -> None:
        """
        Remove every file of a message that was not acknowledged; the
        envelope first, so that no envelope is ever left without content.
        """
        for path in (
            self._envelope_file("incoming", queue_id),
            self._tmp_file(queue_id + _ENVELOPE_SUFFIX),
            self._data_file(queue_id),
            self._tmp_file(queue_id + _DATA_SUFFIX),
        ):
            try:
                os.unlink(path)
            except OSError:
                pass

    # Start-up.

    def recover(self) -> dict[str, int]:
        """
        Bring the spool back to a consistent state after a stop or crash.

        Call once at start-up, before listening and before the scheduler
        runs; it blocks.  It never deletes anything that was acknowledged:
          - C{active/} envelopes go back to C{incoming/} (their lease died
            with the process);
          - an envelope that fails L{load_envelope}, names another id, or
            has no content goes to C{corrupt/} with its content if any;
          - content with no envelope in any state is deleted, since it was
            never acknowledged;
          - C{tmp/} is emptied.
        Files whose names are not ours are logged and left alone.

        @return: Counts: C{requeued}, C{corrupt}, C{orphans_removed},
            C{tmp_removed}, C{ignored} and C{queued} (envelopes left in
            the live states).
        """
        counts = dict.fromkeys(
            ("requeued", "corrupt", "orphans_removed", "tmp_removed", "ignored", "queued"), 0
        )
        for name in os.listdir(self._dir("tmp")):
            path = self._tmp_file(name)
            try:
                os.unlink(path)
            except IsADirectoryError:
                self.log.warn("Ignoring directory {path} in tmp/", path=path)
                counts["ignored"] += 1
            except FileNotFoundError:
                pass
            else:
                counts["tmp_removed"] += 1

        for queue_id in self._scan("active", counts):
            if os.path.lexists(self._envelope_file("incoming", queue_id)):
                self._to_corrupt(
                    queue_id, "active", "also in incoming/", counts, with_content=False
                )
                continue
            os.rename(
                self._envelope_file("active", queue_id),
                self._envelope_file("incoming", queue_id),
            )
            counts["requeued"] += 1

        referenced: set[str] = set()
        for state in ("incoming", "deferred", "hold"):
            for queue_id in self._scan(state, counts):
                reason = self._check_envelope(state, queue_id)
                if reason is not None:
                    self._to_corrupt(queue_id, state, reason, counts)
                elif queue_id in referenced:
                    self._to_corrupt(
                        queue_id, state, "also in another state", counts, with_content=False
                    )
                else:
                    referenced.add(queue_id)
                    counts["queued"] += 1
        # Content of a corrupt envelope is kept until an operator decides.
        referenced.update(self.list("corrupt"))

        for name in os.listdir(self._dir("data")):
            queue_id, suffix = os.path.splitext(name)
            path = os.path.join(self._dir("data"), name)
            if suffix != _DATA_SUFFIX or not is_queue_id(queue_id):
                self.log.warn("Ignoring unknown file {path}", path=path)
                counts["ignored"] += 1
            elif queue_id not in referenced:
                os.unlink(path)
                self.log.info(
                    "Removed {path}: {reason}",
                    queue_id=queue_id,
                    path=path,
                    reason="content without envelope, never acknowledged",
                )
                counts["orphans_removed"] += 1

        for name in _DIRECTORIES:
            self._sync_directory(name)
        self.log.info(
            "Spool {path} recovered: {queued} queued, {requeued} requeued, "
            "{corrupt} corrupt, {orphans_removed} orphans removed, "
            "{tmp_removed} temporary files removed",
            path=self.path,
            **counts,
        )
        return counts

    def _scan(self, state: str, counts: dict[str, int]) -> list[str]:
        queue_ids = []
        for name in sorted(os.listdir(self._dir(state))):
            queue_id, suffix = os.path.splitext(name)
            if suffix == _ENVELOPE_SUFFIX and is_queue_id(queue_id):
                queue_ids.append(queue_id)
            else:
                self.log.warn(
                    "Ignoring unknown file {path}", path=os.path.join(self._dir(state), name)
                )
                counts["ignored"] += 1
        return queue_ids

    def _check_envelope(self, state: str, queue_id: str) -> str | None:
        try:
            with open(self._envelope_file(state, queue_id), "rb") as f:
                envelope = load_envelope(f.read())
        except EnvelopeError as e:
            return str(e)
        if envelope.queue_id != queue_id:
            return f"envelope names another queue id, {envelope.queue_id}"
        if not os.path.exists(self._data_file(queue_id)):
            return "content missing from data/"
        return None

    def _to_corrupt(
        self,
        queue_id: str,
        state: str,
        reason: str,
        counts: dict[str, int],
        *,
        with_content: bool = True,
    ) -> None:
        """
        Move an envelope, and unless another copy keeps using it its
        content, to C{corrupt/}, where nothing is delivered or deleted
        without an operator.
        """
        path = self._envelope_file(state, queue_id)
        target = self._envelope_file("corrupt", queue_id)
        if os.path.lexists(target):
            # Never overwrite evidence: keep this one under a name that
            # is not a queue id (logged, not listed).
            target = self._envelope_file("corrupt", f"{queue_id}.{state}")
            with_content = False
        data = self._data_file(queue_id)
        corrupt_data = self._corrupt_data_file(queue_id)
        if with_content and os.path.exists(data) and not os.path.lexists(corrupt_data):
            # Content first: a crash in between leaves an envelope without
            # content, which the next recovery treats the same way.
            os.rename(data, corrupt_data)
        os.rename(path, target)
        self.log.error(
            "Moved {path} to corrupt/: {reason}", queue_id=queue_id, path=path, reason=reason
        )
        counts["corrupt"] += 1

    # Read and admin API for the scheduler and gatewayctl.

    def list(self, state: str) -> list[str]:
        """
        The queue ids in a state, oldest first.

        For C{corrupt}, ids that have only content there are included too.

        @param state: One of L{STATES}.
        @raise ValueError: For an unknown state.
        """
        self._check_state(state)
        suffixes = (_ENVELOPE_SUFFIX, _DATA_SUFFIX) if state == "corrupt" else (_ENVELOPE_SUFFIX,)
        queue_ids = set()
        for name in os.listdir(self._dir(state)):
            queue_id, suffix = os.path.splitext(name)
            if suffix in suffixes and is_queue_id(queue_id):
                queue_ids.add(queue_id)
        return sorted(queue_ids)

    def load(self, queue_id: str) -> tuple[str, Envelope]:
        """
        Find a message and read its envelope.

        @return: The state it is in, and the envelope.
        @raise KeyError: If there is no such envelope (or the id is
            malformed).
        @raise EnvelopeError: If the envelope is damaged (normally only in
            C{corrupt/}).
        @raise QueueError: If the file cannot be read.
        """
        self._check_known_id(queue_id)
        for state in STATES:
            try:
                with open(self._envelope_file(state, queue_id), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue
            except OSError as e:
                raise _queue_error("read", queue_id, e) from e
            return state, load_envelope(data)
        raise KeyError(queue_id)

    def data_path(self, queue_id: str) -> str:
        """
        Where the content of a message is.

        That is C{data/<id>.eml}, except for a corrupt message whose
        content recovery moved along to C{corrupt/}.

        @raise ValueError: If the id is malformed.
        """
        if not is_queue_id(queue_id):
            raise ValueError(f"not a queue id: {queue_id!r}")
        path = self._data_file(queue_id)
        corrupt = self._corrupt_data_file(queue_id)
        if not os.path.exists(path) and os.path.exists(corrupt):
            return corrupt
        return path

    def move(self, queue_id: str, from_state: str, to_state: str, *, sync: bool = False) -> None:
        """
        Move an envelope between states with one atomic rename.

        Without C{sync} the move is not fsync'ed: it is cheap enough for the
        reactor thread, and a crash can only undo it (an C{active} lease
        goes back to C{incoming} anyway; at worst a message is tried again
        early).  Pass C{sync=True}, from a thread or a command-line tool,
        where undoing would matter, such as putting a message on hold.
        Moving out of C{corrupt} also brings content that recovery moved
        there back to C{data/}.

        @raise KeyError: If the envelope is not in C{from_state}.
        @raise ValueError: For an unknown state.
        @raise QueueError: If the target already holds this id, or the
            rename fails.
        """
        self._check_known_id(queue_id)
        self._check_state(from_state)
        self._check_state(to_state)
        source = self._envelope_file(from_state, queue_id)
        target = self._envelope_file(to_state, queue_id)
        if from_state == to_state:
            if not os.path.lexists(source):
                raise KeyError(queue_id)
            return
        if os.path.lexists(target):
            error = FileExistsError(errno.EEXIST, f"already in {to_state}/")
            raise _queue_error("move", queue_id, error)
        if not os.path.lexists(source):
            raise KeyError(queue_id)
        try:
            if from_state == "corrupt" and not os.path.exists(self._data_file(queue_id)):
                corrupt_data = self._corrupt_data_file(queue_id)
                if os.path.exists(corrupt_data):
                    os.rename(corrupt_data, self._data_file(queue_id))
            os.rename(source, target)
        except FileNotFoundError as e:
            raise KeyError(queue_id) from e
        except OSError as e:
            raise _queue_error("move", queue_id, e) from e
        if sync:
            try:
                self._sync_directory(to_state)
                self._sync_directory(from_state)
                if from_state == "corrupt":
                    self._sync_directory("data")
            except OSError as e:
                raise _queue_error("move", queue_id, e) from e

    def update(self, queue_id: str, state: str, envelope: Envelope) -> None:
        """
        Replace the envelope of a message in its current state.

        Written to C{tmp/}, fsync'ed, renamed over the old one and the state
        directory fsync'ed, so a crash leaves either the old envelope or the
        new one, never a mix.  Blocking: run it in a thread.  The message
        must already be in C{state}; writing it elsewhere would give one
        message two states.

        @raise KeyError: If the envelope is not in C{state}.
        @raise ValueError: If C{envelope.queue_id} is not C{queue_id}, or for
            an unknown state.
        @raise EnvelopeError: If the envelope is invalid (nothing written).
        @raise QueueError: If the spool fails (the old envelope is kept).
        """
        self._check_known_id(queue_id)
        self._check_state(state)
        if envelope.queue_id != queue_id:
            raise ValueError(f"envelope {envelope.queue_id!r} is not for {queue_id!r}")
        data = dump_envelope(envelope)
        target = self._envelope_file(state, queue_id)
        if not os.path.lexists(target):
            raise KeyError(queue_id)
        tmp = self._tmp_file(f"{queue_id}.u{next(self._tmp_names)}{_ENVELOPE_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, target)
            self._sync_directory(state)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise _queue_error("update", queue_id, e) from e

    def remove(self, queue_id: str) -> None:
        """
        Delete a message: its envelope, then its content.

        In that order so that a crash in between leaves content without an
        envelope, which recovery deletes.  Not fsync'ed: a crash can undo
        it, and then the message is delivered twice, never lost.

        @raise KeyError: If neither an envelope nor content exists.
        @raise QueueError: If a file cannot be removed.
        """
        self._check_known_id(queue_id)
        paths = [self._envelope_file(state, queue_id) for state in STATES]
        paths += [self._data_file(queue_id), self._corrupt_data_file(queue_id)]
        removed = False
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise _queue_error("remove", queue_id, e) from e
            removed = True
        if not removed:
            raise KeyError(queue_id)

    def counts(self) -> dict[str, int]:
        """
        The number of messages in each state, for metrics and C{qshape}-like
        summaries.
        """
        return {state: len(self.list(state)) for state in STATES}

    # Paths.

    def _dir(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _tmp_file(self, name: str) -> str:
        return os.path.join(self.path, "tmp", name)

    def _data_file(self, queue_id: str) -> str:
        return os.path.join(self.path, "data", queue_id + _DATA_SUFFIX)

    def _corrupt_data_file(self, queue_id: str) -> str:
        return os.path.join(self.path, "corrupt", queue_id + _DATA_SUFFIX)

    def _envelope_file(self, state: str, queue_id: str) -> str:
        return os.path.join(self.path, state, queue_id + _ENVELOPE_SUFFIX)

    def _sync_directory(self, name: str) -> None:
        """
        fsync a directory, which is what makes renames into it durable.
        """
        fd = os.open(self._dir(name), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _check_state(state: str) -> None:
        if state not in STATES:
            raise ValueError(f"unknown queue state {state!r}")

    @staticmethod
    def _check_known_id(queue_id: str) -> None:
        # A malformed id (say "../x" typed at gatewayctl) names no message.
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
