"""SMTP TLS Reporting (RFC 8460): count TLS outcomes per policy domain and
send each domain that asks for it one aggregate JSON report a day.

Why in the gateway: the receiving domain can only learn that senders fail
to validate its MX certificates (or cannot fetch its MTA-STS policy) from
the senders.  The relay client records every session it attempted under a
policy; once a day the reporter looks up C{_smtp._tls.<domain>} and sends
the report to each C{rua}: C{mailto:} as a gzip'ed
C{application/tlsrpt+gzip} attachment through our own queue, C{https:} as
a POST.

The store is a small JSON file per UTC day (written in a thread), so a
restart loses nothing of the day's counts that were saved.

Standards: RFC 8460 §3 (TXT record), §4 (report JSON), §5 (delivery).
See also: L{gateway.mtasts}; Google's and Microsoft's TLS-RPT senders.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import gzip
import json
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable

#: Result types of RFC 8460 §4.3 (negotiation and policy failures).
RESULT_TYPES = frozenset({
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
    "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
})


def parse_txt(records: Iterable[str]) -> list[str]:
    """The C{rua} URIs from exactly one C{v=TLSRPTv1} record (RFC 8460 §3).

    Several TLSRPTv1 records, or a malformed one, mean no reporting.
    Only C{mailto:} and C{https:} URIs are kept.
    """
    found = [r.strip() for r in records if r.strip().startswith("v=TLSRPTv1")]
    if len(found) != 1:
        return []
    fields: dict[str, str] = {}
    for part in found[0].split(";"):
        key, sep, value = part.strip().partition("=")
        if not sep:
            if part.strip():
                return []
            continue
        fields[key.strip()] = value.strip()
    if fields.get("v") != "TLSRPTv1" or "rua" not in fields:
        return []
    uris = [u.strip() for u in fields["rua"].split(",")]
    return [u for u in uris if u.startswith(("mailto:", "https:")) and len(u) > 8]


def _day_end(day: str) -> float:
    start = datetime.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=datetime.timezone.utc)
    return start.timestamp() + 86400


def day_of(moment: float) -> str:
    """The UTC day (YYYY-MM-DD) a unix time falls in."""
    return datetime.datetime.fromtimestamp(moment, datetime.timezone.utc).strftime("%Y-%m-%d")


@dataclass
class DomainDay:
    """One policy domain's counts for one day."""

    policy_type: str = "no-policy-found"
    policy_string: list[str] = field(default_factory=list)
    mx_host: list[str] = field(default_factory=list)
    successes: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # "type|ip|mx|detail" -> count

    @property
    def failure_total(self) -> int:
        return sum(self.failures.values())


class TLSReportStore:
    """Per-day, per-domain TLS session counts, saved as JSON files.

    L{record} runs on the reactor thread (memory only); L{save} writes the
    files (blocking: call it in a thread).
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.days: dict[str, dict[str, DomainDay]] = {}
        self._dirty: set[str] = set()

    def record(self, moment: float, domain: str, *, policy: Any = None, success: bool,
               result_type: str | None = None, mx: str | None = None, ip: str | None = None,
               detail: str | None = None) -> None:
        """Count one session (or one policy fetch failure) for C{domain}.

        @param policy: an object with C{mode}, C{mx}, C{max_age} and
            C{version} (an MTA-STS policy), or None when none was found.
        """
        day = day_of(moment)
        entries = self.days.setdefault(day, {})
        if day not in self._loaded_days():
            self._load(day)
            entries = self.days[day]
        entry = entries.get(domain)
        if entry is None:
            entry = entries[domain] = DomainDay()
        if policy is not None:
            entry.policy_type = "sts"
            entry.policy_string = [f"version: {getattr(policy, 'version', 'STSv1')}",
                                   f"mode: {getattr(policy.mode, 'value', policy.mode)}"]
            entry.policy_string += [f"mx: {m}" for m in policy.mx]
            entry.policy_string.append(f"max_age: {policy.max_age}")
            entry.mx_host = list(policy.mx)
        if success:
            entry.successes += 1
        else:
            key = "|".join([result_type or "validation-failure", ip or "", mx or "", (detail or "")[:200]])
            entry.failures[key] = entry.failures.get(key, 0) + 1
        self._dirty.add(day)

    def _loaded_days(self) -> set[str]:
        return getattr(self, "_loaded", set())

    def _load(self, day: str) -> None:
        loaded = self._loaded_days()
        loaded.add(day)
        self._loaded = loaded
        path = os.path.join(self.directory, f"{day}.json")
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError):
            return
        entries = self.days.setdefault(day, {})
        for domain, raw in data.items():
            saved = DomainDay(**raw)
            current = entries.get(domain)
            if current is None:
                entries[domain] = saved
            else:
                current.successes += saved.successes
                for key, count in saved.failures.items():
                    current.failures[key] = current.failures.get(key, 0) + count

    def save(self) -> None:
        """Write the changed days (atomic replace).  Blocking."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        for day in sorted(self._dirty):
            data = {d: e.__dict__ for d, e in self.days.get(day, {}).items()}
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{day}.")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, os.path.join(self.directory, f"{day}.json"))
        self._dirty.clear()

    def day(self, day: str) -> dict[str, DomainDay]:
        """All domains' counts for C{day} (loading the saved file)."""
        if day not in self._loaded_days():
            self._load(day)
        return self.days.get(day, {})

    def forget(self, day: str) -> None:
        """Drop a reported day from memory and disk.  Blocking."""
        self.days.pop(day, None)
        try:
            os.unlink(os.path.join(self.directory, f"{day}.json"))
        except FileNotFoundError:
            pass


def build_report(*, organization: str, contact: str, day: str, domain: str, entry: DomainDay,
                 report_id: str) -> dict[str, Any]:
    """The RFC 8460 §4 aggregate report for one domain and one UTC day."""
    details = []
    for key, count in sorted(entry.failures.items()):
        result_type, ip, mx, detail = key.split("|", 3)
        item: dict[str, Any] = {"result-type": result_type, "failed-session-count": count}
        if ip:
            item["receiving-ip"] = ip
        if mx:
            item["receiving-mx-hostname"] = mx
        if detail:
            item["failure-reason-code"] = detail
        details.append(item)
    policy: dict[str, Any] = {"policy-type": entry.policy_type, "policy-domain": domain}
    if entry.policy_type == "sts":
        policy["policy-string"] = entry.policy_string
        policy["mx-host"] = entry.mx_host
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"},
        "contact-info": contact,
        "report-id": report_id,
        "policies": [{
            "policy": policy,
            "summary": {"total-successful-session-count": entry.successes,
                        "total-failure-session-count": entry.failure_total},
            "failure-details": details,
        }],
    }


def report_filename(organization: str, domain: str, day: str, report_id: str) -> str:
    """RFC 8460 §5.1: submitter!policy-domain!begin!end!unique-id.json.gz."""
    start = int(datetime.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=datetime.timezone.utc).timestamp())
    return f"{organization}!{domain}!{start}!{start + 86399}!{report_id}.json.gz"


def report_email(*, report: dict[str, Any], organization: str, sender: str, recipient: str,
                 domain: str, day: str, now: float, hostname: str) -> bytes:
    """The report as an RFC 8460 §5.3 message: multipart/report;
    report-type="tlsrpt" with a text part and the gzip'ed JSON."""
    report_id = report["report-id"]
    compressed = gzip.compress(json.dumps(report, indent=1).encode("utf-8"), mtime=0)
    boundary = "tlsrpt-" + secrets.token_hex(8)
    filename = report_filename(organization, domain, day, report_id)
    encoded = base64.encodebytes(compressed).decode("ascii").replace("\n", "\r\n")
    lines = [
        f"From: {sender}",
        f"To: {recipient}",
        f"Subject: Report Domain: {domain} Submitter: {organization} Report-ID: <{report_id}>",
        f"Date: {email.utils.formatdate(now)}",
        f"Message-ID: <tlsrpt.{report_id}@{hostname}>",
        f"TLS-Report-Domain: {domain}",
        f"TLS-Report-Submitter: {organization}",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type="tlsrpt"; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"This is an aggregate TLS report from {organization} for {domain}, {day} (UTC).",
        "",
        f"--{boundary}",
        "Content-Type: application/tlsrpt+gzip",
        "Content-Transfer-Encoding: base64",
        f'Content-Disposition: attachment; filename="{filename}"',
        "",
        encoded.rstrip("\r\n"),
        f"--{boundary}--",
        "",
    ]
    return "\r\n".join(lines).encode("ascii")


class TLSReporter:
    """Sends yesterday's reports once a day (RFC 8460 §5).

    @param lookup_txt: C{async f(name) -> list[str]} (twisted.names).
    @param queue_message: C{f(sender, recipient, body_bytes)} queues a
        message through the gateway's own spool.
    @param post: C{async f(url, body_bytes) -> int} (HTTP status), a
        twisted.web POST of C{application/tlsrpt+gzip}.
    """

    def __init__(self, store: TLSReportStore, *, organization: str, contact: str, hostname: str,
                 lookup_txt: Any, queue_message: Any, post: Any, clock: Any, run_in_thread: Any,
                 log: Any = None) -> None:
        self.store = store
        self.organization = organization
        self.contact = contact
        self.hostname = hostname
        self.lookup_txt = lookup_txt
        self.queue_message = queue_message
        self.post = post
        self.clock = clock
        self.run_in_thread = run_in_thread
        self.log = log
        self.sent: list[tuple[str, str, str]] = []

    async def send_day(self, day: str) -> int:
        """Send the reports for C{day}; returns how many were handed over.
        Domains that publish no C{_smtp._tls} record get none."""
        entries = self.store.day(day)
        count = 0
        failed = False
        for domain, entry in sorted(entries.items()):
            try:
                records = await self.lookup_txt(f"_smtp._tls.{domain}")
            except Exception as exc:
                self._log("no TLS-RPT record for {domain}: {reason}", domain=domain, reason=str(exc))
                continue
            uris = parse_txt(records)
            if not uris:
                continue
            report_id = f"{day.replace('-', '')}{secrets.token_hex(8)}"
            report = build_report(organization=self.organization, contact=self.contact, day=day,
                                  domain=domain, entry=entry, report_id=report_id)
            for uri in uris:
                try:
                    if uri.startswith("mailto:"):
                        recipient = uri[len("mailto:"):].split("?", 1)[0]
                        body = report_email(report=report, organization=self.organization,
                                            sender=self.contact, recipient=recipient, domain=domain,
                                            day=day, now=self.clock.seconds(), hostname=self.hostname)
                        await self.queue_message(self.contact, recipient, body)
                    else:
                        payload = gzip.compress(json.dumps(report).encode("utf-8"), mtime=0)
                        status = await self.post(uri, payload)
                        if not 200 <= status < 300:
                            raise RuntimeError(f"HTTP {status}")
                except Exception as exc:
                    self._log("TLS-RPT report for {domain} to {uri} failed: {reason}",
                              domain=domain, uri=uri, reason=str(exc))
                    failed = True
                    continue
                self.sent.append((day, domain, uri))
                count += 1
                self._log("TLS-RPT report for {domain} ({day}) sent to {uri}", domain=domain, day=day, uri=uri)
        # RFC 8460 §5.5: a failed delivery is retried (on the next run) for
        # up to a day after the period; then the day is dropped.
        too_old = self.clock.seconds() - _day_end(day) > 86400
        if not failed or too_old:
            await self.run_in_thread(self.store.forget, day)
        return count

    def _log(self, text: str, **fields: Any) -> None:
        if self.log is not None:
            self.log.info(text, **fields)
