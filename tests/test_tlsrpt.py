"""Unit tests of L{gateway.tlsrpt}: the C{_smtp._tls} TXT parser, the
per-day counters and their files, the RFC 8460 §4.4 report, the §5.3
message (read back with the stdlib C{email} package), the §5.1 file name,
and L{TLSReporter} with its I/O replaced by recording fakes.

Nothing here touches the network; L{TLSReporter} is driven with
synchronous fakes, so each coroutine finishes within the call.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import re
from pathlib import Path
from typing import Any, Coroutine

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gateway.mtasts import Mode, Policy
from gateway.tlsrpt import (RESULT_TYPES, DomainDay, TLSReporter, TLSReportStore, build_report, day_of,
                            parse_txt, report_email, report_filename)

DAY = "2024-03-01"
#: 2024-03-01 00:00:00 UTC and 23:59:59 UTC.
DAY_START = 1709251200
DAY_END = DAY_START + 86399
NOON = DAY_START + 12 * 3600
POLICY = Policy("STSv1", Mode.ENFORCE, ("mx1.example.test", "*.mail.example.test"), 604800)


def result_of(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine whose awaits all complete at once; its result."""
    d = defer.Deferred.fromCoroutine(coroutine)
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the coroutine waited for something"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


# -- parse_txt (RFC 8460 §3) ------------------------------------------------------


@pytest.mark.parametrize("records, expected", [
    (["v=TLSRPTv1; rua=mailto:tlsrpt@example.test"], ["mailto:tlsrpt@example.test"]),
    (["v=TLSRPTv1;rua=mailto:a@example.test"], ["mailto:a@example.test"]),
    (["  v=TLSRPTv1 ; rua = mailto:a@example.test ; "], ["mailto:a@example.test"]),
    (["v=TLSRPTv1; rua=mailto:a@example.test,https://reports.example.test/v1/tlsrpt"],
     ["mailto:a@example.test", "https://reports.example.test/v1/tlsrpt"]),
    (["v=TLSRPTv1; rua=mailto:a@example.test, https://r.example.test/x"],
     ["mailto:a@example.test", "https://r.example.test/x"]),
    (["v=spf1 -all", "v=TLSRPTv1; rua=mailto:a@example.test", "google-site-verification=x"],
     ["mailto:a@example.test"]),
    (["v=TLSRPTv1; rua=mailto:a@example.test; ext=1"], ["mailto:a@example.test"]),
], ids=["plain", "no-space", "spaces", "two-uris", "space-after-comma", "among-others", "extension"])
def test_parse_txt_valid(records, expected):
    """A single v=TLSRPTv1 record yields its mailto: and https: rua URIs,
    in order, whatever the spacing around ';', '=' and ','."""
    assert parse_txt(records) == expected


@pytest.mark.parametrize("records", [
    [],
    ["v=spf1 -all"],
    ["v=TLSRPTv1; rua=mailto:a@example.test", "v=TLSRPTv1; rua=mailto:b@example.test"],
    ["v=TLSRPTv1"],
    ["v=TLSRPTv1; ruf=mailto:a@example.test"],
    ["v=TLSRPTv1; rua=mailto:a@example.test; garbage"],
    ["v=TLSRPTv10; rua=mailto:a@example.test"],
    ["rua=mailto:a@example.test; v=TLSRPTv1"],
    ["v=TLSRPTv1; rua=http://reports.example.test/x,ftp://reports.example.test/x"],
    ["v=TLSRPTv1; rua="],
], ids=["none", "other-record", "two-records", "no-rua", "ruf-only", "field-without-value",
        "wrong-version", "version-not-first", "unsupported-schemes", "empty-rua"])
def test_parse_txt_no_reporting(records):
    """No record, several TLSRPTv1 records, a record without rua, a
    malformed one, a version that is not first or not TLSRPTv1, and URIs
    that are neither mailto: nor https: all mean no reporting."""
    assert parse_txt(records) == []


def test_parse_txt_keeps_supported_schemes_only():
    """Of several rua URIs, only the mailto: and https: ones are kept."""
    records = ["v=TLSRPTv1; rua=http://r.example.test/,mailto:a@example.test,https://r.example.test/x"]
    assert parse_txt(records) == ["mailto:a@example.test", "https://r.example.test/x"]


def test_day_of_is_utc():
    """day_of gives the UTC day of a unix time, whatever the local zone."""
    assert day_of(DAY_START) == DAY
    assert day_of(DAY_END) == DAY
    assert day_of(DAY_START - 1) == "2024-02-29"


# -- TLSReportStore ---------------------------------------------------------------


def fill(store: TLSReportStore, moment: float = NOON) -> None:
    """Two successes, three failures of two kinds, one policy fetch error."""
    store.record(moment, "example.test", policy=POLICY, success=True, mx="mx1.example.test", ip="192.0.2.1")
    store.record(moment, "example.test", policy=POLICY, success=True, mx="mx1.example.test", ip="192.0.2.1")
    for _ in range(2):
        store.record(moment, "example.test", policy=POLICY, success=False, result_type="certificate-expired",
                     mx="mx2.mail.example.test", ip="192.0.2.2", detail="certificate has expired")
    store.record(moment, "example.test", policy=POLICY, success=False, result_type="starttls-not-supported",
                 mx="mx1.example.test", ip="192.0.2.1")
    store.record(moment, "other.test", success=False, result_type="sts-policy-fetch-error",
                 detail="connection refused")


def test_record_counts_per_day_and_domain(tmp_path):
    """record() counts successes and failures per UTC day and policy
    domain; a policy makes the entry an sts one with its policy string
    and MX patterns; without a policy the type stays no-policy-found."""
    store = TLSReportStore(str(tmp_path / "tlsrpt"))
    fill(store)
    store.record(NOON + 86400, "example.test", policy=POLICY, success=True)
    day = store.day(DAY)
    entry = day["example.test"]
    assert entry.policy_type == "sts"
    assert entry.policy_string == ["version: STSv1", "mode: enforce", "mx: mx1.example.test",
                                   "mx: *.mail.example.test", "max_age: 604800"]
    assert entry.mx_host == ["mx1.example.test", "*.mail.example.test"]
    assert entry.successes == 2 and entry.failure_total == 3
    assert day["other.test"].policy_type == "no-policy-found"
    assert day["other.test"].failure_total == 1 and day["other.test"].successes == 0
    assert store.day("2024-03-02")["example.test"].successes == 1


def test_save_load_round_trip_across_instances(tmp_path):
    """What one store saved, a new store over the same directory reads
    back (a restart); its own counts for that day add to the saved ones,
    and a third instance sees the sum."""
    directory = str(tmp_path / "tlsrpt")
    first = TLSReportStore(directory)
    fill(first)
    first.save()
    assert sorted(p.name for p in Path(directory).iterdir()) == [f"{DAY}.json"]

    second = TLSReportStore(directory)
    loaded = second.day(DAY)
    assert set(loaded) == {"example.test", "other.test"}
    original = first.day(DAY)["example.test"]
    again = loaded["example.test"]
    assert isinstance(again, DomainDay)
    assert (again.policy_type, again.policy_string, again.mx_host, again.successes, again.failures) == \
        (original.policy_type, original.policy_string, original.mx_host, original.successes, original.failures)

    second.record(NOON, "example.test", policy=POLICY, success=True)
    second.record(NOON, "example.test", policy=POLICY, success=False, result_type="certificate-expired",
                  mx="mx2.mail.example.test", ip="192.0.2.2", detail="certificate has expired")
    second.save()
    third = TLSReportStore(directory).day(DAY)["example.test"]
    assert third.successes == 3 and third.failure_total == 4
    assert sorted(third.failures.values()) == [1, 3]


def test_record_after_restart_merges_saved_counts(tmp_path):
    """A store that records before reading the day still merges the
    saved file into its counts (nothing saved is lost by a restart)."""
    directory = str(tmp_path / "tlsrpt")
    first = TLSReportStore(directory)
    fill(first)
    first.save()
    second = TLSReportStore(directory)
    second.record(NOON, "example.test", policy=POLICY, success=True)
    assert second.day(DAY)["example.test"].successes == 3
    second.save()
    assert json.loads((Path(directory) / f"{DAY}.json").read_text())["example.test"]["successes"] == 3


def test_forget_drops_day_from_memory_and_disk(tmp_path):
    """forget() removes a reported day; other days stay."""
    directory = tmp_path / "tlsrpt"
    store = TLSReportStore(str(directory))
    fill(store)
    store.record(NOON + 86400, "example.test", policy=POLICY, success=True)
    store.save()
    store.forget(DAY)
    assert sorted(p.name for p in directory.iterdir()) == ["2024-03-02.json"]
    assert DAY not in store.days
    store.forget("2020-01-01")  # nothing to forget: no error


def test_save_writes_only_changed_days_atomically(tmp_path):
    """save() leaves no temporary files behind and, with nothing
    recorded since, writes nothing."""
    directory = tmp_path / "tlsrpt"
    store = TLSReportStore(str(directory))
    fill(store)
    store.save()
    path = directory / f"{DAY}.json"
    path.write_text("{}")  # a later save without changes must not rewrite it
    store.save()
    assert path.read_text() == "{}"
    assert [p.name for p in directory.iterdir()] == [f"{DAY}.json"]


# -- build_report (RFC 8460 §4.4) ------------------------------------------------------


def test_build_report_fields(tmp_path):
    """The report has the RFC 8460 §4.4 top-level fields, one policy
    entry with policy-type sts, policy-string, policy-domain and mx-host,
    the summary counts, and one failure-details entry per distinct
    failure with result-type, receiving-mx-hostname, failed-session-count
    and the reason as failure-reason-code."""
    store = TLSReportStore(str(tmp_path))
    fill(store)
    report = build_report(organization="Example Org", contact="tlsrpt@sender.test", day=DAY,
                          domain="example.test", entry=store.day(DAY)["example.test"], report_id="abc123")
    assert set(report) == {"organization-name", "date-range", "contact-info", "report-id", "policies"}
    assert report["organization-name"] == "Example Org"
    assert report["contact-info"] == "tlsrpt@sender.test"
    assert report["report-id"] == "abc123"
    assert report["date-range"] == {"start-datetime": "2024-03-01T00:00:00Z", "end-datetime": "2024-03-01T23:59:59Z"}
    entry, = report["policies"]
    assert entry["policy"] == {
        "policy-type": "sts", "policy-domain": "example.test",
        "policy-string": ["version: STSv1", "mode: enforce", "mx: mx1.example.test", "mx: *.mail.example.test",
                          "max_age: 604800"],
        "mx-host": ["mx1.example.test", "*.mail.example.test"],
    }
    assert entry["summary"] == {"total-successful-session-count": 2, "total-failure-session-count": 3}
    details = sorted(entry["failure-details"], key=lambda d: d["result-type"])
    assert [d["result-type"] for d in details] == ["certificate-expired", "starttls-not-supported"]
    assert all(d["result-type"] in RESULT_TYPES for d in details)
    assert details[0]["receiving-mx-hostname"] == "mx2.mail.example.test"
    assert details[0]["failed-session-count"] == 2
    assert details[0]["failure-reason-code"] == "certificate has expired"
    assert details[1]["receiving-mx-hostname"] == "mx1.example.test"
    assert details[1]["failed-session-count"] == 1
    assert "failure-reason-code" not in details[1]
    json.dumps(report)  # JSON-ready


def test_build_report_without_policy(tmp_path):
    """A domain whose policy could not be had is reported with
    policy-type no-policy-found, no policy-string or mx-host, and its
    fetch failure."""
    store = TLSReportStore(str(tmp_path))
    fill(store)
    report = build_report(organization="o", contact="c@o.test", day=DAY, domain="other.test",
                          entry=store.day(DAY)["other.test"], report_id="x")
    entry, = report["policies"]
    assert entry["policy"] == {"policy-type": "no-policy-found", "policy-domain": "other.test"}
    assert entry["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
    detail, = entry["failure-details"]
    assert detail["result-type"] == "sts-policy-fetch-error" and detail["failed-session-count"] == 1
    assert "receiving-mx-hostname" not in detail


def test_build_report_keeps_pipes_in_reason(tmp_path):
    """A failure reason containing '|' (the key separator) comes out whole."""
    store = TLSReportStore(str(tmp_path))
    store.record(NOON, "example.test", policy=POLICY, success=False, result_type="validation-failure",
                 mx="mx1.example.test", detail="a|b|c")
    report = build_report(organization="o", contact="c", day=DAY, domain="example.test",
                          entry=store.day(DAY)["example.test"], report_id="x")
    assert report["policies"][0]["failure-details"][0]["failure-reason-code"] == "a|b|c"


# -- report_filename (RFC 8460 §5.1) and report_email (§5.3) -------------------------


def test_report_filename_format():
    """submitter!policy-domain!begin!end!unique-id.json.gz with the UTC
    day's first and last second as unix times."""
    assert report_filename("mx.sender.test", "example.test", DAY, "abc123") == \
        f"mx.sender.test!example.test!{DAY_START}!{DAY_END}!abc123.json.gz"


def make_email(report_id: str = "2024-03-01.example.test.0a1b2c@mx.sender.test") -> tuple[bytes, dict]:
    report = build_report(organization="mx.sender.test", contact="tlsrpt@sender.test", day=DAY,
                          domain="example.test", entry=DomainDay(policy_type="sts", successes=5),
                          report_id=report_id)
    body = report_email(report=report, organization="mx.sender.test", sender="tlsrpt@sender.test",
                        recipient="reports@example.test", domain="example.test", day=DAY,
                        now=DAY_END + 3600, hostname="mx.sender.test")
    return body, report


def test_report_email_parses_back():
    """The message reads back with the stdlib email package as RFC 8460
    §5.3 requires: multipart/report; report-type="tlsrpt", the
    TLS-Report-Domain and TLS-Report-Submitter headers, the Subject
    format, a text/plain part and an application/tlsrpt+gzip attachment
    named by report_filename whose gunzipped JSON is the report."""
    body, report = make_email()
    assert b"\r\n" in body and b"\n" not in body.replace(b"\r\n", b"")
    message = email.message_from_bytes(body, policy=email.policy.default)
    assert not message.defects
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    assert message["From"] == "tlsrpt@sender.test"
    assert message["To"] == "reports@example.test"
    assert message["TLS-Report-Domain"] == "example.test"
    assert message["TLS-Report-Submitter"] == "mx.sender.test"
    assert message["Subject"] == ("Report Domain: example.test Submitter: mx.sender.test "
                                  f"Report-ID: <{report['report-id']}>")
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["Date"].datetime.timestamp() == DAY_END + 3600
    text, attachment = message.iter_parts()
    assert text.get_content_type() == "text/plain" and "example.test" in text.get_content()
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    assert attachment.get_content_disposition() == "attachment"
    assert attachment.get_filename() == report_filename("mx.sender.test", "example.test", DAY, report["report-id"])
    assert json.loads(gzip.decompress(attachment.get_payload(decode=True))) == report


MESSAGE_ID_BUG = ("gateway/tlsrpt.py report_email() writes Message-ID <{report_id}@{hostname}> but "
                  "TLSReporter.send_day() already makes report_id end in '@hostname': two '@' in one msg-id "
                  "(RFC 5322 §3.6.4)")

FILENAME_BUG = ("gateway/tlsrpt.py TLSReporter.send_day() makes report ids like "
                "'2024-03-01.example.test.<hex>@host' and report_filename() uses them as the unique-id, "
                "which RFC 8460 §5.1 limits to 1*(ALPHA / DIGIT)")


def reporter_outbox(tmp_path: Path, records: dict[str, list[str]] | None = None,
                    post_status: int = 200) -> tuple[TLSReporter, TLSReportStore, dict[str, list]]:
    """A TLSReporter over a filled store, whose DNS, queue and POST are
    recording fakes.  C{records}: name -> TXT records (a missing name
    raises, as NXDOMAIN does)."""
    store = TLSReportStore(str(tmp_path / "tlsrpt"))
    fill(store)
    store.save()
    outbox: dict[str, list] = {"queued": [], "posted": [], "lookups": [], "logged": []}
    records = records if records is not None else {
        "_smtp._tls.example.test": ["v=TLSRPTv1; rua=mailto:reports@example.test,https://r.example.test/tlsrpt"],
    }

    async def lookup_txt(name: str) -> list[str]:
        outbox["lookups"].append(name)
        if name not in records:
            raise LookupError(f"{name}: NXDOMAIN")
        return records[name]

    async def queue_message(sender: str, recipient: str, body: bytes) -> None:
        outbox["queued"].append((sender, recipient, body))

    async def post(url: str, body: bytes) -> int:
        outbox["posted"].append((url, body))
        return post_status

    class Log:
        def info(self, text: str, **fields: Any) -> None:
            outbox["logged"].append(text.format(**fields))

    clock = Clock()
    clock.advance(DAY_END + 7200)
    reporter = TLSReporter(store, organization="mx.sender.test", contact="tlsrpt@sender.test",
                           hostname="mx.sender.test", lookup_txt=lookup_txt, queue_message=queue_message,
                           post=post, clock=clock, run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a),
                           log=Log())
    return reporter, store, outbox


def test_reporter_sends_to_every_rua_and_forgets_the_day(tmp_path):
    """send_day() looks up _smtp._tls.<domain> for each domain with
    counts, queues a report message to each mailto: rua (from the
    contact address) and POSTs the gzip'ed JSON to each https: rua;
    domains without a record get nothing; the day is then forgotten."""
    reporter, store, outbox = reporter_outbox(tmp_path)
    assert result_of(reporter.send_day(DAY)) == 2
    assert sorted(outbox["lookups"]) == ["_smtp._tls.example.test", "_smtp._tls.other.test"]
    (sender, recipient, body), = outbox["queued"]
    assert (sender, recipient) == ("tlsrpt@sender.test", "reports@example.test")
    message = email.message_from_bytes(body, policy=email.policy.default)
    assert message["TLS-Report-Domain"] == "example.test"
    (url, payload), = outbox["posted"]
    assert url == "https://r.example.test/tlsrpt"
    report = json.loads(gzip.decompress(payload))
    assert report["policies"][0]["summary"] == {"total-successful-session-count": 2,
                                                "total-failure-session-count": 3}
    attachment = list(message.iter_parts())[1]
    assert json.loads(gzip.decompress(attachment.get_payload(decode=True))) == report
    assert report["report-id"].startswith(DAY.replace("-", "")) and report["report-id"].isalnum()
    assert [s[1:] for s in reporter.sent] == [("example.test", "mailto:reports@example.test"),
                                             ("example.test", "https://r.example.test/tlsrpt")]
    assert not (tmp_path / "tlsrpt" / f"{DAY}.json").exists() and store.days.get(DAY) is None


def test_reporter_mailto_query_is_dropped(tmp_path):
    """A mailto: URI with ?query sends to the address alone."""
    reporter, _, outbox = reporter_outbox(tmp_path, {
        "_smtp._tls.example.test": ["v=TLSRPTv1; rua=mailto:reports@example.test?subject=tlsrpt"]})
    assert result_of(reporter.send_day(DAY)) == 1
    assert [q[1] for q in outbox["queued"]] == ["reports@example.test"]


def test_reporter_failed_post_is_not_counted(tmp_path):
    """An https: rua answering a non-2xx status is logged and not counted
    as sent; the mailto: rua of the same record is still sent."""
    reporter, _, outbox = reporter_outbox(tmp_path, post_status=503)
    assert result_of(reporter.send_day(DAY)) == 1
    assert len(outbox["posted"]) == 1 and len(outbox["queued"]) == 1
    assert any("HTTP 503" in line for line in outbox["logged"])
    assert [s[2] for s in reporter.sent] == ["mailto:reports@example.test"]


def test_reporter_keeps_day_after_failed_post(tmp_path):
    """After a failed https: POST the day's counts are kept so a later
    send_due() can try again (RFC 8460 §5.5)."""
    reporter, store, _ = reporter_outbox(tmp_path, {
        "_smtp._tls.example.test": ["v=TLSRPTv1; rua=https://r.example.test/tlsrpt"]}, post_status=503)
    assert result_of(reporter.send_day(DAY)) == 0
    assert "example.test" in store.day(DAY)


def test_reporter_message_id_is_valid(tmp_path):
    """The report message's Message-ID is one msg-id: <left@right> with
    exactly one '@' (RFC 5322 §3.6.4)."""
    reporter, _, outbox = reporter_outbox(tmp_path)
    result_of(reporter.send_day(DAY))
    body = outbox["queued"][0][2]
    raw = re.search(rb"^Message-ID: *(.*?)\r$", body, re.M | re.I).group(1).decode("ascii")
    assert re.fullmatch(r"<[^<>@\s]+@[^<>@\s]+>", raw), raw
    message = email.message_from_bytes(body, policy=email.policy.default)
    assert not message["Message-ID"].defects, message["Message-ID"].defects


def test_reporter_filename_matches_rfc8460_abnf(tmp_path):
    """The attachment's name follows RFC 8460 §5.1: sender "!"
    policy-domain "!" begin "!" end [ "!" unique-id ] "." extension,
    with unique-id = 1*(ALPHA / DIGIT)."""
    reporter, _, outbox = reporter_outbox(tmp_path)
    result_of(reporter.send_day(DAY))
    message = email.message_from_bytes(outbox["queued"][0][2], policy=email.policy.default)
    filename = list(message.iter_parts())[1].get_filename()
    assert re.fullmatch(rf"[A-Za-z0-9.-]+!example\.test!{DAY_START}!{DAY_END}(![A-Za-z0-9]+)?\.json\.gz",
                        filename), filename
