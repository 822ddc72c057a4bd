"""The delivery scheduler: takes committed messages from the spool and
delivers them, with limits, connection reuse, retries and bounces.

Why it looks like Postfix's qmgr: a message is *leased* by renaming its
envelope into C{active/}; its recipients are grouped by destination
(L{gateway.routing.Destination.key}); each destination has a queue of
jobs served by at most C{max_per_destination} connections, and all
destinations share C{max_concurrent}.  A connection carries up to
C{max_messages_per_connection} messages and is closed after
C{connection_idle} seconds without work.  When every job of a message is
done, the envelope is rewritten (per-recipient status) and the message is
removed, or moved to C{deferred/} with its next attempt, and a bounce
(RFC 3464) is queued for what failed permanently or expired.

Standards: RFC 5321 §4.5.4.1 (retry strategy), §6.1 (reliable delivery),
§5.1; RFC 3464; RFC 7505.
See also: Postfix qmgr(8), bounce(8).
"""

from __future__ import annotations

import collections
import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gateway.backoff import RetryPolicy, expired, next_delay
from gateway.config import GatewayConfig
from gateway.delivery import (Connection, DeliveryError, Outgoing, RecipientResult, ServerReply,
                              Timeouts, local_failure)
from gateway.dsn import FailedRecipient, build_dsn
from gateway.queue import QueueError, Spool
from gateway.queuefile import Envelope, EnvelopeRecipient
from gateway.mtasts import Mode
from gateway.routing import Destination, Router, RoutingError
from gateway.tls import client_context_factory, trust_root
from gateway.trace import message_id

MAX_HEADER_COPY = 64 * 1024


def _failure_status(reply: ServerReply) -> str:
    """The RFC 3463 status of a permanent failure: the reply's own when it
    is of class 5 (or 4, as for expiry), else X.0.0 from the reply code."""
    status = reply.status
    if status and status[0] in "45":
        return status
    return "5.0.0" if reply.code >= 500 or reply.code < 400 else "4.0.0"


@dataclass(frozen=True)
class _STS:
    """The MTA-STS policy in force for one delivery run."""

    domain: str
    policy: Any
    mode: Any
    reason: str


@dataclass
class _Message:
    """A leased message whose jobs are in flight."""

    queue_id: str
    envelope: Envelope
    jobs_left: int = 0
    results: dict[str, tuple[RecipientResult, str | None, bool]] = field(default_factory=dict)
    attempted: bool = False


@dataclass
class _Job:
    """The recipients of one message that go to one destination."""

    message: _Message
    destination: Destination
    recipients: list[str]


@dataclass
class _DestinationQueue:
    destination: Destination
    jobs: collections.deque = field(default_factory=collections.deque)
    workers: int = 0
    connections: set = field(default_factory=set)


class DeliveryScheduler(service.Service):
    """Delivers what the spool holds.  See the module docstring.

    @param connect: C{reactor} providing IReactorTCP (and TLS).
    @param run_in_thread: for envelope rewrites and bounce building.
    """

    log = Logger()

    def __init__(self, config: GatewayConfig, spool: Spool, router: Router, reactor: Any,
                 clock: IReactorTime, run_in_thread: Callable[..., defer.Deferred],
                 rng: random.Random | None = None, now: Callable[[], float] | None = None,
                 sts: Any = None, tls_reports: Any = None) -> None:
        self.config = config
        self.spool = spool
        self.router = router
        self.reactor = reactor
        self.clock = clock
        self.run_in_thread = run_in_thread
        self.rng = rng or random.Random()
        self.now = now or (lambda: clock.seconds())
        self.reconfigure(config, router)
        self._deferred: dict[str, float] = {}
        self._inflight: dict[str, _Message] = {}
        self._queues: dict[str, _DestinationQueue] = {}
        self._finishing: set[defer.Deferred] = set()
        self._active = 0
        self._loop: task.LoopingCall | None = None
        self._last_rescan = 0.0
        self._kick_pending = False
        self.stopping = False
        self.stats = collections.Counter()
        self.sts = sts
        self.tls_reports = tls_reports
        #: A L{gateway.metrics.GatewayMetrics}, set by the service.
        self.metrics: Any = None
        #: The last delivery errors, for C{gatewayctl status}.
        self.recent_errors: collections.deque = collections.deque(maxlen=10)
        self._sts_exempt: set[str] = set()

    # -- service -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.stopping = False
        self._rescan_deferred()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.config.queue.scan_interval, now=True)

    @defer.inlineCallbacks
    def stopService(self):
        """Stop taking work; give deliveries in flight C{shutdown_grace}
        seconds, then cut them off: what was not delivered goes back to the
        queue (deferred, due at once), nothing is lost."""
        self.stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for queue in self._queues.values():
            while queue.jobs:
                job = queue.jobs.popleft()
                self._job_done(job, [])
        deadline = self.clock.seconds() + self.config.relay.shutdown_grace
        while self._active and self.clock.seconds() < deadline:
            yield task.deferLater(self.clock, 0.05, lambda: None)
        for queue in self._queues.values():
            for connection in list(queue.connections):
                connection.abort()
        for _ in range(200):
            if not self._active and not self._finishing:
                break
            yield task.deferLater(self.clock, 0.05, lambda: None)
        if self._finishing:
            yield defer.DeferredList(list(self._finishing))
        yield defer.maybeDeferred(super().stopService)

    def message_queued(self, queue_id: str) -> None:
        """A new message was committed: look at the queue soon."""
        self.kick()

    def kick(self) -> None:
        """Run a scan on the next reactor turn (coalesced)."""
        if self._kick_pending or self.stopping or not self.running:
            return
        self._kick_pending = True

        def run() -> None:
            self._kick_pending = False
            self._tick()

        self.clock.callLater(0, run)

    # -- picking due messages -------------------------------------------------

    def reconfigure(self, config: GatewayConfig, router: Router) -> None:
        """Take a reloaded config: new routes, limits and timeouts apply to
        deliveries that start from now; those in flight keep theirs."""
        relay = config.relay
        self.config = config
        self.router = router
        self.policy = RetryPolicy(initial=config.queue.retry_initial, maximum=config.queue.retry_max,
                                  max_age=config.queue.max_age)
        self.timeouts = Timeouts(connect=relay.connect_timeout, greeting=relay.command_timeout,
                                 command=relay.command_timeout, data_end=relay.data_timeout)
        self.helo = relay.helo_name or config.server.hostname
        self._trust = None

    def _rescan_deferred(self) -> None:
        """Rebuild the index of deferred messages from disk (start-up, and
        now and then, to see what gatewayctl changed)."""
        index = {}
        for queue_id in self.spool.list("deferred"):
            if queue_id in self._inflight:
                continue
            try:
                _, envelope = self.spool.load(queue_id)
            except Exception as exc:
                self.log.warn("cannot read deferred {queue_id}: {reason}", queue_id=queue_id, reason=str(exc))
                continue
            index[queue_id] = envelope.next_attempt
        self._deferred = index
        self._last_rescan = self.clock.seconds()

    def _tick(self) -> None:
        if self.stopping:
            return
        now = self.now()
        if self.clock.seconds() - self._last_rescan > 30:
            self._rescan_deferred()
        room = 10 * self.config.relay.max_concurrent - len(self._inflight)
        if room <= 0:
            return
        due = [(q, "incoming") for q in self.spool.list("incoming") if q not in self._inflight]
        due += [(q, "deferred") for q, when in sorted(self._deferred.items(), key=lambda kv: kv[1])
                if when <= now and q not in self._inflight]
        for queue_id, state in due[:room]:
            self._lease(queue_id, state)
        self._start_workers()

    def _lease(self, queue_id: str, state: str) -> None:
        self._deferred.pop(queue_id, None)
        try:
            self.spool.move(queue_id, state, "active")
            _, envelope = self.spool.load(queue_id)
        except KeyError:
            return  # gatewayctl moved or deleted it meanwhile
        except Exception as exc:
            self.log.error("cannot lease {queue_id}: {reason}", queue_id=queue_id, reason=str(exc))
            return
        message = _Message(queue_id, envelope)
        self._inflight[queue_id] = message
        pending = [r.address for r in envelope.recipients if r.status in ("pending", "deferred")]
        by_destination: dict[str, _Job] = {}
        exempt = envelope.listener == "tlsrpt"
        for address in pending:
            domain = address.rpartition("@")[2]
            destination = self.router.destination(domain)
            if exempt:
                # RFC 8460 §5.3.1: a TLS report must not be held back by the
                # very failures it reports, so it travels outside MTA-STS
                # (on connections of its own).
                destination = dataclasses.replace(destination, key=destination.key + "|tlsrpt")
                self._sts_exempt.add(destination.key)
            job = by_destination.get(destination.key)
            if job is None:
                job = by_destination[destination.key] = _Job(message, destination, [])
            job.recipients.append(address)
        message.jobs_left = len(by_destination)
        if not by_destination:
            self._finish(message)
            return
        for job in by_destination.values():
            queue = self._queues.get(job.destination.key)
            if queue is None:
                queue = self._queues[job.destination.key] = _DestinationQueue(job.destination)
            queue.jobs.append(job)

    def _start_workers(self) -> None:
        relay = self.config.relay
        for queue in list(self._queues.values()):
            while (queue.jobs and queue.workers < relay.max_per_destination
                   and self._active < relay.max_concurrent
                   and queue.workers < len(queue.jobs) + 0):
                queue.workers += 1
                self._active += 1
                d = defer.ensureDeferred(self._worker(queue))
                d.addErrback(lambda f: self.log.failure("delivery worker failed", f))

    # -- delivering -----------------------------------------------------------

    async def _worker(self, queue: _DestinationQueue) -> None:
        destination = queue.destination
        try:
            while queue.jobs and not self.stopping:
                try:
                    hosts = await self.router.hosts(destination)
                except RoutingError as exc:
                    reply = local_failure(exc.status, exc.text)
                    if exc.permanent:
                        reply = ServerReply(550, (f"{exc.status} {exc.text}",))
                    self._fail_queued(queue, reply, None, exc.permanent)
                    return
                sts = await self._sts_policy(destination)
                if sts is not None and sts.mode is Mode.ENFORCE:
                    hosts = self._sts_filter(sts, hosts)
                    if not hosts:
                        self._sts_decision(sts, "no-matching-mx")
                        reply = local_failure("4.7.5", f"MTA-STS policy of {destination.domain} (enforce) "
                                              f"lists none of its MX hosts; not delivering ({sts.reason})")
                        self._fail_queued(queue, reply, None, False)
                        return
                connection, last_error = await self._connect(destination, hosts, sts)
                if connection is None:
                    self._fail_queued(queue, last_error.reply, None, last_error.permanent)
                    return
                queue.connections.add(connection)
                try:
                    await self._serve(queue, connection)
                finally:
                    queue.connections.discard(connection)
                    await connection.close()
        finally:
            queue.workers -= 1
            self._active -= 1
            if not queue.jobs and not queue.workers:
                self._queues.pop(destination.key, None)
            self.kick()

    async def _sts_policy(self, destination: Destination) -> "_STS | None":
        """The MTA-STS policy that applies to this destination, if any.

        Only MX delivery is subject to MTA-STS; routes and the smarthost
        are next hops the admin chose (RFC 8461 §... "MX host" semantics).
        A policy in mode none, or none at all, gives None.
        """
        if self.sts is None or destination.kind != "mx" or destination.key in self._sts_exempt:
            return None
        entry, reason = await self.sts.policy_for(destination.domain)
        if entry is None:
            return None
        policy = entry.policy
        if policy.mode is Mode.NONE:
            return None
        return _STS(destination.domain, policy, policy.mode, reason)

    def _sts_filter(self, sts: "_STS", hosts: list) -> list:
        """Enforce mode: only MX hosts the policy names (RFC 8461 §4.1)."""
        matching = []
        for host in hosts:
            if sts.policy.matches(host.name):
                matching.append(host)
            else:
                self.log.info("{domain}: MTA-STS enforce: skipping MX {host}, not in the policy",
                              domain=sts.domain, host=host.name)
                self._report(sts, False, "validation-failure", host, "mx-not-in-policy")
                self._sts_decision(sts, "mx-not-in-policy")
        return matching

    def _sts_decision(self, sts: "_STS", outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.mta_sts.labels(sts.mode.value, outcome).inc()

    def _report(self, sts: "_STS", success: bool, result_type: str | None = None,
                host: Any = None, detail: str | None = None) -> None:
        if self.tls_reports is None:
            return
        self.tls_reports.record(self.now(), sts.domain, policy=sts.policy, success=success,
                                result_type=result_type, mx=getattr(host, "name", None),
                                ip=getattr(host, "address", None), detail=detail)

    async def _connect(self, destination: Destination, hosts: list,
                       sts: "_STS | None" = None) -> tuple[Connection | None, DeliveryError]:
        """Connect to the first host that works.

        Under an MTA-STS policy every session is tried with verified TLS
        against the MX name.  In enforce mode a failure moves on to the
        next host (never a plaintext or unverified fallback); in testing
        mode the host is tried again at the route's own level, so mail
        flows while the failure is reported.
        """
        relay = self.config.relay
        auth = None
        if destination.smarthost and relay.smarthost_username is not None:
            auth = (relay.smarthost_username, relay.smarthost_password)
        last = DeliveryError(local_failure("4.4.4", f"no host to connect to for {destination.domain}"))
        for host in hosts:
            if self.stopping:
                break
            levels = [destination.tls] if sts is None else ["verify"]
            if sts is not None and sts.mode is Mode.TESTING and destination.tls != "verify":
                levels.append(destination.tls)
            for level in levels:
                try:
                    connection = await Connection.open(
                        self.reactor, self.clock, host.name, host.address, host.port, helo=self.helo,
                        tls=level, tls_context=lambda lvl, name=host.name: self._tls_context(lvl, name),
                        timeouts=self.timeouts, auth=auth)
                except DeliveryError as exc:
                    last = exc
                    outcome = ""
                    if sts is not None and level == "verify":
                        kind = exc.tls_failure
                        if kind is not None:
                            self._report(sts, False, kind, host, str(exc.reply)[:120])
                            self._sts_decision(sts, kind)
                            outcome = f" (MTA-STS {sts.mode.value}: {kind})"
                    self.log.info("{domain}: {host}[{address}]:{port} failed: {reason}{sts}",
                                  domain=destination.domain, host=host.name, address=host.address,
                                  port=host.port, reason=str(exc.reply), sts=outcome)
                    if exc.tls_failure is None:
                        break  # not a TLS problem: a second try at this host would not help
                    continue
                if sts is not None:
                    verified = level == "verify"
                    if verified:
                        self._report(sts, True, host=host)
                    connection.sts = f"{sts.mode.value}:{'verified' if verified else 'unverified'}"
                    self._sts_decision(sts, "verified" if verified else "unverified-delivery")
                return connection, last
        return None, last

    def _tls_context(self, level: str, hostname: str) -> Any:
        if level == "verify" and self._trust is None:
            self._trust = trust_root(self.config.relay.ca_file)
        return client_context_factory(level, hostname, self._trust)

    async def _serve(self, queue: _DestinationQueue, connection: Connection) -> None:
        relay = self.config.relay
        while connection.usable and not self.stopping:
            if not queue.jobs:
                await task.deferLater(self.clock, relay.connection_idle, lambda: None)
                if not queue.jobs:
                    return
                continue
            if connection.messages_sent >= relay.max_messages_per_connection:
                return
            job = queue.jobs.popleft()
            await self._deliver(job, connection)

    async def _deliver(self, job: _Job, connection: Connection) -> None:
        envelope = job.message.envelope
        prepend = "".join(h + "\r\n" for h in envelope.prepend_headers).encode("utf-8")
        outgoing = Outgoing(queue_id=envelope.queue_id, sender=envelope.sender, recipients=job.recipients,
                            prepend=prepend, content_path=self.spool.data_path(envelope.queue_id),
                            size=envelope.size, mail_params=dict(envelope.mail_params))
        started = self.clock.seconds()
        permanent_error = False
        try:
            results = await connection.send(outgoing)
        except DeliveryError as exc:
            permanent_error = exc.permanent
            results = [RecipientResult(r, exc.reply) for r in job.recipients]
        except OSError as exc:
            reply = local_failure("4.3.0", f"cannot read queued content: {exc.strerror}")
            results = [RecipientResult(r, reply) for r in job.recipients]
        remote = f"{connection.host}[{connection.address}]:{connection.port}"
        outcome = {r.address: ("sent" if r.delivered else "bounced" if (r.permanent or permanent_error)
                               else "deferred") for r in results}
        replies = {str(r.reply) for r in results}
        tls_label = "verified" if connection.tls_verified else ("tls" if connection.tls_version else "none")
        for address, result in outcome.items():
            if self.metrics is not None:
                self.metrics.deliveries.labels(result, tls_label).inc()
                if result == "sent":
                    self.metrics.delivery_seconds.observe(max(0.0, self.now() - envelope.received_at))
            if result != "sent":
                self.recent_errors.append({"time": self.now(), "queue_id": envelope.queue_id, "rcpt": address,
                                           "relay": remote, "reply": " | ".join(sorted(replies))})
        self.log.info(
            "{queue_id} relay={relay} tls={tls} verified={verified} mta_sts={mta_sts} delay={delay:.1f}s "
            "rcpt=[{rcpt}] reply=\"{reply}\"",
            queue_id=envelope.queue_id, relay=remote, tls=connection.tls_version or "no",
            mta_sts=connection.sts or "none",
            verified="yes" if connection.tls_verified else "no",
            delay=self.now() - envelope.received_at, attempt_time=self.clock.seconds() - started,
            rcpt=" ".join(f"<{a}>:{o}" for a, o in outcome.items()), reply=" | ".join(sorted(replies)))
        self._job_done(job, [(r, connection.host, permanent_error or r.permanent) for r in results])

    def _fail_queued(self, queue: _DestinationQueue, reply: ServerReply, host: str | None, permanent: bool) -> None:
        while queue.jobs:
            job = queue.jobs.popleft()
            for address in job.recipients:
                if self.metrics is not None:
                    self.metrics.deliveries.labels("bounced" if permanent else "deferred", "none").inc()
                self.recent_errors.append({"time": self.now(), "queue_id": job.message.queue_id, "rcpt": address,
                                           "relay": "none", "reply": str(reply)})
                self.log.info("{queue_id} to=<{rcpt}> relay=none result={result} reply=\"{reply}\"",
                              queue_id=job.message.queue_id, rcpt=address,
                              result="bounced" if permanent else "deferred", reply=str(reply))
            self._job_done(job, [(RecipientResult(a, reply), host, permanent) for a in job.recipients])

    # -- finishing a message --------------------------------------------------

    def _job_done(self, job: _Job, results: list[tuple[RecipientResult, str | None, bool]]) -> None:
        message = job.message
        for result, host, permanent in results:
            message.results[result.address] = (result, host, permanent)
            message.attempted = True
        message.jobs_left -= 1
        if message.jobs_left <= 0:
            self._finish(message)

    def _finish(self, message: _Message) -> None:
        d = self.run_in_thread(self._finish_blocking, message, self.now())
        self._finishing.add(d)

        def done(result: Any) -> Any:
            self._finishing.discard(d)
            self._inflight.pop(message.queue_id, None)
            if isinstance(result, tuple):
                state, next_attempt, bounce = result
                if state == "deferred":
                    self._deferred[message.queue_id] = next_attempt
                if bounce is not None:
                    self._queue_bounce(*bounce)
            return None

        def failed(failure: Any) -> None:
            self.log.failure("cannot update {queue_id} after delivery", failure, queue_id=message.queue_id)

        d.addCallbacks(done, failed)

    def _finish_blocking(self, message: _Message, now: float) -> tuple[str, float, Any]:
        """Record results; remove, or defer; return a bounce to queue.
        Runs in a thread (envelope rewrite with fsync)."""
        envelope = message.envelope
        failed: list[FailedRecipient] = []
        for recipient in envelope.recipients:
            entry = message.results.get(recipient.address)
            if entry is None or recipient.status not in ("pending", "deferred"):
                continue
            result, host, permanent = entry
            recipient.attempts += 1
            recipient.last_reply = str(result.reply)
            if result.delivered:
                recipient.status = "delivered"
            elif permanent:
                recipient.status = "bounced"
                failed.append(FailedRecipient(
                    address=recipient.address, status=_failure_status(result.reply),
                    diagnostic=str(result.reply) if host else None, remote_mta=host,
                    last_attempt=now))
            else:
                recipient.status = "deferred"
        if message.attempted:
            envelope.attempts += 1
        pending = [r for r in envelope.recipients if r.status in ("pending", "deferred")]
        if pending and expired(self.policy, envelope.received_at, now):
            for recipient in pending:
                recipient.status = "bounced"
                failed.append(FailedRecipient(
                    address=recipient.address, status="4.4.7",
                    diagnostic=recipient.last_reply, remote_mta=None, last_attempt=now))
            pending = []
        bounce = self._build_bounce(envelope, failed, now) if failed else None
        if not pending:
            self.spool.remove(message.queue_id)
            self.stats["done"] += 1
            self.log.info("{queue_id} removed: all recipients done", queue_id=message.queue_id)
            return "done", 0.0, bounce
        if self.stopping and not message.attempted:
            envelope.next_attempt = now
        else:
            envelope.next_attempt = now + next_delay(self.policy, max(envelope.attempts, 1), self.rng)
        self.spool.update(message.queue_id, "active", envelope)
        self.spool.move(message.queue_id, "active", "deferred", sync=True)
        self.log.info("{queue_id} deferred: {pending} recipient(s) left, attempt {attempts}, next attempt in {wait:.0f}s",
                      queue_id=message.queue_id, pending=len(pending), attempts=envelope.attempts,
                      wait=envelope.next_attempt - now, next_attempt=envelope.next_attempt)
        return "deferred", envelope.next_attempt, bounce

    def _build_bounce(self, envelope: Envelope, failed: list[FailedRecipient], now: float) -> tuple[Envelope, bytes] | None:
        sender = envelope.sender
        if not sender:
            if not self.config.queue.double_bounce_to:
                self.log.warn("{queue_id}: double bounce dropped (null sender) for {rcpt}",
                              queue_id=envelope.queue_id, rcpt=",".join(f.address for f in failed))
                return None
            sender = self.config.queue.double_bounce_to
            envelope = dataclasses.replace(envelope, sender=sender)
        headers = self._original_headers(envelope)
        hostname = self.config.server.hostname
        body = build_dsn(reporting_mta=hostname, original=envelope, failed=failed,
                         original_headers=headers, now=now,
                         message_id=message_id(envelope.queue_id, hostname))
        return envelope, body

    def _original_headers(self, envelope: Envelope) -> bytes:
        prepend = "".join(h + "\r\n" for h in envelope.prepend_headers).encode("utf-8")
        try:
            with open(self.spool.data_path(envelope.queue_id), "rb") as content:
                block = content.read(MAX_HEADER_COPY)
        except OSError:
            block = b""
        end = block.find(b"\r\n\r\n")
        block = block[:end + 2] if end >= 0 else block
        return prepend + block

    def inject(self, sender: str, recipients: list[str], body: bytes, listener: str = "local") -> defer.Deferred:
        """Queue a message the gateway writes itself (bounces, TLS reports):
        spooled and committed like any received message, then delivered.

        @return: a Deferred firing with the queue id.
        """
        try:
            writer = self.spool.open_message()
            writer.write(body)
        except QueueError as exc:
            return defer.fail(exc)
        now = self.now()
        envelope = Envelope(
            queue_id=writer.queue_id, sender=sender, received_at=now,
            recipients=[EnvelopeRecipient(address=r) for r in recipients],
            listener=listener, client_address="127.0.0.1", protocol="LOCAL",
            size=len(body), next_attempt=now,
        )
        d = self.spool.commit(writer, envelope)
        d.addCallback(lambda queue_id: (self.kick(), queue_id)[1])
        return d

    def _queue_bounce(self, original: Envelope, body: bytes) -> None:
        """Commit a DSN to the spool (group commit like any message)."""
        d = self.inject("", [original.sender], body, listener="bounce")

        def committed(queue_id: str) -> None:
            self.log.info("{queue_id}: bounce {bounce_id} queued for <{sender}>",
                          queue_id=original.queue_id, bounce_id=queue_id, sender=original.sender)

        d.addCallbacks(committed, lambda f: self.log.failure(
            "cannot queue bounce for {queue_id}", f, queue_id=original.queue_id))
