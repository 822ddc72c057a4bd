"""Prometheus metrics: what the gateway counts, and the twisted.web
resource that serves them.

Why a registry per service rather than prometheus_client's global one:
tests run several gateways in one process, and a reload must not
re-register anything.  Label sets are bounded by design: listener names,
plugin names, reply classes, result words, TLS versions — never a sender,
a recipient or a client address.

Standards: Prometheus text exposition format 0.0.4.
See also: etc/grafana/mailgateway-dashboard.json; docs/operators-guide.md.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web import resource

from gateway.queuefile import queue_id_time

_FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SLOW = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)


class GatewayMetrics:
    """Every metric the gateway exports, on one registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.connections_open = Gauge("mailgateway_connections_open", "Open SMTP connections", ["listener"], registry=r)
        self.connections = Counter("mailgateway_connections", "SMTP connections accepted", ["listener"], registry=r)
        self.transactions = Counter("mailgateway_transactions", "Mail transactions by outcome (accepted, rejected, tempfailed)",
                                    ["listener", "outcome"], registry=r)
        self.replies = Counter("mailgateway_replies", "Replies sent by class (2xx..5xx)", ["listener", "class"], registry=r)
        self.plugin_verdicts = Counter("mailgateway_plugin_verdicts", "Plugin verdicts by action",
                                       ["plugin", "action"], registry=r)
        self.messages_accepted = Counter("mailgateway_messages_accepted", "Messages queued", ["listener"], registry=r)
        self.bytes_accepted = Counter("mailgateway_bytes_accepted", "Content bytes queued", ["listener"], registry=r)
        self.deliveries = Counter("mailgateway_deliveries", "Delivery results per recipient",
                                  ["result", "tls"], registry=r)
        self.tls_sessions = Counter("mailgateway_tls_sessions", "Inbound TLS sessions by protocol version",
                                    ["listener", "version"], registry=r)
        self.auth = Counter("mailgateway_auth", "SMTP AUTH attempts by result", ["result"], registry=r)
        self.auth_results = Counter("mailgateway_auth_results", "SPF, DKIM and DMARC results",
                                    ["method", "result"], registry=r)
        self.dkim_signatures = Counter("mailgateway_dkim_signatures", "DKIM signatures made", registry=r)
        self.mta_sts = Counter("mailgateway_mta_sts_decisions", "MTA-STS decisions by mode and outcome",
                               ["mode", "outcome"], registry=r)
        self.transaction_seconds = Histogram("mailgateway_transaction_seconds", "MAIL FROM to the final reply",
                                             buckets=_FAST, registry=r)
        self.commit_seconds = Histogram("mailgateway_commit_seconds", "Queue commit (fsync) time",
                                        buckets=_FAST, registry=r)
        self.delivery_seconds = Histogram("mailgateway_delivery_seconds", "Arrival to delivery, per recipient",
                                          buckets=_SLOW, registry=r)
        self._queue_collector: _QueueCollector | None = None

    def watch_queue(self, spool: Any, clock: Any) -> None:
        """Export the queue's length per state and the oldest entry's age,
        read from the spool directories at scrape time."""
        if self._queue_collector is None:
            self._queue_collector = _QueueCollector(spool, clock)
            self.registry.register(self._queue_collector)

    def record_transaction_notes(self, notes: Any, added: list[tuple[str, str]]) -> None:
        """Count SPF/DKIM/DMARC results and DKIM signatures of one message."""
        if "spf" in notes and notes["spf"]:
            self.auth_results.labels("spf", str(notes["spf"].get("result", "none"))).inc()
        if "dkim" in notes:
            dkim = notes["dkim"]
            for signature in (dkim.get("signatures", []) if isinstance(dkim, dict) else dkim or []):
                self.auth_results.labels("dkim", str(signature.get("result", "none"))).inc()
        if "dmarc" in notes and notes["dmarc"]:
            self.auth_results.labels("dmarc", str(notes["dmarc"].get("result", "none"))).inc()
        signatures = sum(1 for name, _ in added if name.lower() == "dkim-signature")
        if signatures:
            self.dkim_signatures.inc(signatures)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _QueueCollector:
    """Queue gauges computed from the spool when Prometheus scrapes."""

    def __init__(self, spool: Any, clock: Any) -> None:
        self.spool = spool
        self.clock = clock

    def collect(self):
        from gateway.queue import STATES

        length = GaugeMetricFamily("mailgateway_queue_messages", "Messages in the queue by state", labels=["state"])
        oldest = None
        for state in STATES:
            try:
                ids = self.spool.list(state)
            except OSError:
                ids = []
            length.add_metric([state], len(ids))
            if ids and state != "corrupt":
                first = queue_id_time(ids[0])
                oldest = first if oldest is None else min(oldest, first)
        yield length
        age = GaugeMetricFamily("mailgateway_queue_oldest_age_seconds", "Age of the oldest queued message")
        age.add_metric([], 0.0 if oldest is None else max(0.0, self.clock.seconds() - oldest))
        yield age

    def describe(self):
        return []


class MetricsResource(resource.Resource):
    """Serves the registry in Prometheus' text format (GET only)."""

    isLeaf = True

    def __init__(self, metrics: GatewayMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metrics.render()


def metrics_site(metrics: GatewayMetrics, path: str) -> Any:
    """A twisted.web Site with the metrics at C{path} and 404 elsewhere."""
    from twisted.web.server import Site

    root = resource.Resource()
    node = root
    parts = [p for p in path.strip("/").split("/") if p]
    for part in parts[:-1]:
        child = resource.Resource()
        node.putChild(part.encode(), child)
        node = child
    node.putChild((parts[-1] if parts else "metrics").encode(), MetricsResource(metrics))
    site = Site(root)
    site.noisy = False
    site.log = lambda request: None
    return site


def now() -> float:
    return time.monotonic()


