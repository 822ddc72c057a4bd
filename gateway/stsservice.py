"""Assembles MTA-STS and TLS reporting for a running gateway: the policy
resolver the delivery scheduler consults, the on-disk policy cache, the
TLS-RPT counters, and the timers that refresh policies and send reports.

Why a module of its own: L{gateway.mtasts} and L{gateway.tlsrpt} are
protocol logic with injected I/O; this is the one place that decides
which resolver, trust store, spool and HTTP client they use.

Standards: RFC 8461 (MTA-STS), RFC 8460 (TLS-RPT).
See also: L{gateway.scheduler} (enforcement), C{gatewayctl mta-sts}.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from gateway.config import GatewayConfig
from gateway.dns import lookup_addresses
from gateway.mtasts import FilePolicyCache, PolicyFetcher, PolicyResolver, lookup_txt
from gateway.tlsrpt import TLSReporter, TLSReportStore, day_of

log = Logger()


def make_fetcher(config: GatewayConfig, reactor: Any, resolver: Any) -> PolicyFetcher:
    """The HTTPS policy fetcher: C{[mta_sts]} trust store, port and
    timeout; the policy host is resolved through twisted.names."""
    sts = config.mta_sts
    return PolicyFetcher(reactor, reactor, trust_root=sts.ca_file, timeout=sts.fetch_timeout,
                         port=sts.port, resolve_host=lambda host: lookup_addresses(resolver, host))


class MTASTS:
    """The MTA-STS side of one gateway process.

    @ivar resolver: the L{PolicyResolver} for the scheduler.
    @ivar reports: the L{TLSReportStore}, or None when reporting is off.
    """

    def __init__(self, config: GatewayConfig, reactor: Any, resolver: Any, run_in_thread: Any) -> None:
        sts = config.mta_sts
        self.config = config
        self.reactor = reactor
        self.run_in_thread = run_in_thread
        os.makedirs(sts.cache, mode=0o700, exist_ok=True)
        self.cache = FilePolicyCache(os.path.join(sts.cache, "policies"))
        self.reports = TLSReportStore(os.path.join(sts.cache, "tlsrpt")) if sts.report else None
        self.fetcher = make_fetcher(config, reactor, resolver)
        self.resolver = PolicyResolver(resolver, self.fetcher, self.cache, reactor,
                                       run_in_thread=run_in_thread, on_fetch_error=self._fetch_failed)
        self.dns = resolver
        self._loops: list[task.LoopingCall] = []
        self.reporter: TLSReporter | None = None

    def _fetch_failed(self, domain: str, error: Any) -> None:
        log.info("MTA-STS policy fetch for {domain} failed: {reason}", domain=domain, reason=str(error))
        if self.reports is not None:
            self.reports.record(self.reactor.seconds(), domain, success=False,
                                result_type=getattr(error, "result_type", "sts-policy-fetch-error"),
                                detail=str(error)[:120])

    def start(self, scheduler: Any) -> None:
        """Start the refresh and report timers; C{scheduler.inject} queues
        the mailto: reports."""
        sts = self.config.mta_sts
        refresh = task.LoopingCall(lambda: defer.ensureDeferred(self.resolver.refresh_due()))
        refresh.clock = self.reactor
        refresh.start(3600, now=False).addErrback(lambda f: log.failure("MTA-STS refresh stopped", f))
        self._loops.append(refresh)
        if self.reports is None:
            return

        async def queue_message(sender: str, recipient: str, body: bytes) -> None:
            await scheduler.inject(sender, [recipient], body, listener="tlsrpt")

        self.reporter = TLSReporter(
            self.reports, organization=sts.report_organization, contact=sts.report_contact,
            hostname=self.config.server.hostname, lookup_txt=lambda name: lookup_txt(self.dns, name),
            queue_message=queue_message, post=self._post, clock=self.reactor,
            run_in_thread=self.run_in_thread, log=log)
        save = task.LoopingCall(self.save)
        save.clock = self.reactor
        save.start(60, now=False).addErrback(lambda f: log.failure("TLS-RPT save stopped", f))
        report = task.LoopingCall(lambda: defer.ensureDeferred(self.send_due()))
        report.clock = self.reactor
        report.start(sts.report_interval, now=False).addErrback(lambda f: log.failure("TLS-RPT stopped", f))
        self._loops += [save, report]

    async def send_due(self) -> int:
        """Send the reports of every finished day still held."""
        if self.reporter is None:
            return 0
        await self.save()
        today = day_of(self.reactor.seconds())
        days = sorted(name[:-5] for name in os.listdir(self.reports.directory)
                      if name.endswith(".json") and name[:-5] < today) if os.path.isdir(self.reports.directory) else []
        sent = 0
        for day in days:
            sent += await self.reporter.send_day(day)
        return sent

    def save(self) -> defer.Deferred:
        """Write the TLS-RPT counters (in a thread)."""
        if self.reports is None:
            return defer.succeed(None)
        return self.run_in_thread(self.reports.save)

    async def _post(self, url: str, body: bytes) -> int:
        """POST a gzip'ed report (RFC 8460 §5.2) with twisted.web."""
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, readBody
        from twisted.web.http_headers import Headers
        import io

        from gateway.tls import trust_root

        agent = Agent(self.reactor, BrowserLikePolicyForHTTPS(trust_root(self.config.mta_sts.ca_file)),
                      connectTimeout=self.config.mta_sts.fetch_timeout)
        d = agent.request(b"POST", url.encode("ascii"),
                          Headers({b"Content-Type": [b"application/tlsrpt+gzip"]}),
                          FileBodyProducer(io.BytesIO(body)))
        d.addTimeout(self.config.mta_sts.fetch_timeout, self.reactor)
        response = await d
        await readBody(response)
        return response.code

    def stop(self) -> defer.Deferred:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        return self.save()
