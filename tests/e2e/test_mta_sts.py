"""Acceptance tests of MTA-STS (RFC 8461) and TLS reporting (RFC 8460) on
the relay side: the real gateway (C{start_gateway}) delivers to aiosmtpd
sinks with STARTTLS, fetches the policy from a real twisted.web HTTPS
server, and asks a real DNS server (L{tests.dnsserver.TestDNS}) for MX, A
and TXT records.

The world of these tests, all on 127.0.0.0/8:

  - C{sts.test} publishes C{_mta-sts.sts.test TXT "v=STSv1; id=1"} and
    C{mta-sts.sts.test A 127.0.0.1}, where L{HTTPSServer} serves the
    policy with a certificate for C{mta-sts.sts.test} from the test CA;
  - its MX hosts (C{mx1.sts.test}, ...) resolve to 127.0.0.1 (a second
    one to 127.0.0.2: MX hosts share the one C{[relay] port}, so two
    sinks differ by address) and present certificates from the same CA:
    good, for the wrong name, expired or self-signed;
  - C{[relay] ca_file} and C{[mta_sts] ca_file} are that CA.

What the gateway did is read from the sinks (what arrived, over TLS or
not), the spool (deferred, with the last reply), the log (the delivery
line's C{mta_sts=} field, through a twisted.logger observer) and the
TLS-RPT counters (C{service.mta_sts.reports}).

Every wait is bounded: L{wait_until} polls for at most a few seconds of
real time, sinks are waited for with a timeout, subprocesses run with one.
"""

from __future__ import annotations

import calendar
import email
import email.policy
import functools
import gzip
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web import resource, server

from gateway.mtasts import POLICY_PATH, CachedPolicy, FilePolicyCache, Mode, Policy
from gateway.tlsrpt import day_of
from tests.certs import TestCA, self_signed
from tests.dnsserver import TestDNS
from tests.httpsserver import HTTPSServer, Route
from tests.sink import Received, Sink, free_port
from tests.support import REPO, base_config, client, in_thread, queued, subprocess_env

DOMAIN = "sts.test"
POLICY_HOST = "mta-sts.sts.test"
TXT_NAME = "_mta-sts.sts.test"
MX1 = "mx1.sts.test"
MX2 = "mx2.sts.test"
ROGUE = "rogue.sts.test"
RCPT = "rcpt@sts.test"
SENDER = "a@example.test"
STATES = ("incoming", "active", "deferred")
WAIT = 20.0


def policy_text(mode: str = "enforce", mx: tuple[str, ...] = (MX1,), max_age: int = 86400) -> bytes:
    """An RFC 8461 §3.2 policy file."""
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> TestCA:
    """One CA for the module: it signs the policy host's and the MX hosts'
    certificates, and is the gateway's trust store."""
    return TestCA()


@pytest.fixture
def ca_path(ca: TestCA, tmp_path: Path) -> str:
    return str(ca.write(tmp_path / "ca" / "ca.pem"))


@pytest.fixture
def test_dns():
    """The authoritative DNS server the gateway asks ([dns] servers)."""
    server_ = TestDNS()
    server_.start()
    yield server_
    pytest_twisted.blockon(server_.stop())


@pytest.fixture
def https(ca: TestCA):
    """The policy host mta-sts.sts.test (certificate from the test CA)."""
    server_ = HTTPSServer(ca.issue(POLICY_HOST))
    server_.start()
    yield server_
    pytest_twisted.blockon(server_.stop())


@pytest.fixture
def sinks():
    """Start sinks: C{sinks(**Sink kwargs)}; all stopped afterwards."""
    started: list[Sink] = []

    def start(**kwargs: Any) -> Sink:
        sink = Sink(**kwargs).start()
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.stop()


@pytest.fixture
def log_events():
    """Every twisted.logger event emitted during the test."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


# -- helpers ----------------------------------------------------------------------


def shared_port(*hosts: str) -> int:
    """A port free on every one of C{hosts} a moment ago: MX hosts of one
    domain are all reached on the one C{[relay] port}."""
    for _ in range(50):
        port = free_port(hosts[0])
        try:
            for host in hosts[1:]:
                with socket.socket() as probe:
                    probe.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on all of {hosts}")


def publish(dns: TestDNS, mx: list[tuple[str, str]], txt: str | None = "v=STSv1; id=1",
            domain: str = DOMAIN) -> None:
    """MX records (preference 10, 20, ... in order) with their A records,
    the policy host's address, and the _mta-sts TXT record (if any)."""
    for index, (name, address) in enumerate(mx):
        dns.add(domain, "MX", (10 * (index + 1), name))
        dns.add(name, "A", address)
    dns.add(f"mta-sts.{domain}", "A", "127.0.0.1")
    if txt is not None:
        dns.add(f"_mta-sts.{domain}", "TXT", txt)


def set_mx(dns: TestDNS, mx: list[tuple[str, str]], domain: str = DOMAIN) -> None:
    """Replace the MX records of C{domain} (the "attacker" changes DNS)."""
    dns.remove(domain, "MX")
    for index, (name, address) in enumerate(mx):
        dns.add(domain, "MX", (10 * (index + 1), name))
        dns.remove(name, "A")
        dns.add(name, "A", address)


def sts_config(tmp_path: Path, dns: TestDNS, https: HTTPSServer, port: int, ca_path: str,
               *, relay: dict[str, Any] | None = None, mta_sts: dict[str, Any] | None = None) -> dict[str, Any]:
    """A relaying gateway whose MX port is C{port}, trusting the test CA
    for MX certificates and the policy fetch.

    One message per connection: the scheduler consults the policy when it
    opens a connection, so a later message must not ride on a connection
    made under an earlier policy or DNS state."""
    doc = base_config(tmp_path, server={"trusted_networks": ["127.0.0.0/8"]})
    doc["dns"] = {"servers": [dns.address], "timeout": 2, "reverse_lookup": False}
    doc["relay"] = {"enabled": True, "port": port, "ca_file": ca_path, "connection_idle": 0.2,
                    "max_messages_per_connection": 1, "connect_timeout": 5, "command_timeout": 10,
                    **(relay or {})}
    doc["queue"]["scan_interval"] = 0.2
    doc["mta_sts"] = {"cache": str(tmp_path / "mta-sts"), "port": https.port, "fetch_timeout": 5,
                      "report_organization": "mx.example.test", "report_contact": "tlsrpt@example.test",
                      **(mta_sts or {})}
    return doc


def send(port: int, recipients: list[str], content: bytes, sender: str = SENDER) -> Any:
    with client(port) as smtp:
        return smtp.sendmail(sender, recipients, content)


async def submit(service: Any, content: bytes, recipients: list[str] | None = None) -> None:
    """Hand a message to the gateway's listener (smtplib, in a thread)."""
    await in_thread(send, service.port_of("mx"), recipients or [RCPT], content)


async def wait_until(predicate: Callable[[], Any], what: str, timeout: float = WAIT,
                     interval: float = 0.05) -> Any:
    """Poll C{predicate} every C{interval}s of real time until it returns
    something true (returned), for at most C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await task.deferLater(reactor, interval, lambda: None)


def snapshot(tmp_path: Path, state: str) -> list[tuple[Any, bytes]]:
    """L{queued}, retried when the scheduler moves a file while we read."""
    spool = tmp_path / "spool"
    for _ in range(50):
        try:
            return queued(spool, state)
        except FileNotFoundError:
            time.sleep(0.01)
    return queued(spool, state)


def deferred_to(tmp_path: Path, recipient: str = RCPT) -> list[Any]:
    """The deferred envelopes whose C{recipient} has been tried."""
    return [envelope for envelope, _ in snapshot(tmp_path, "deferred")
            for r in envelope.recipients if r.address == recipient and r.last_reply]


async def wait_deferred(tmp_path: Path, recipient: str = RCPT) -> Any:
    """The recipient entry once its message is deferred after an attempt."""
    envelopes = await wait_until(lambda: deferred_to(tmp_path, recipient), f"a deferral for {recipient}")
    envelope = envelopes[0]
    return next(r for r in envelope.recipients if r.address == recipient)


async def wait_message(sink: Sink, count: int = 1, timeout: float = WAIT) -> list[Received]:
    messages = await in_thread(sink.wait_for, count, timeout, timeout=timeout + 5)
    assert len(messages) >= count, f"the sink got {len(messages)} message(s), expected {count}"
    return messages


def delivery_lines(events: list[dict[str, Any]]) -> list[str]:
    """The scheduler's per-delivery log lines (those with C{mta_sts=})."""
    return [formatEvent(e) for e in events if "mta_sts" in e and "relay" in e]


def counts(service: Any, domain: str = DOMAIN) -> tuple[int, dict[tuple[str, str], int], set[str]]:
    """TLS-RPT counters for C{domain} over every day held in memory:
    (successes, {(result type, receiving MX): count}, policy types)."""
    successes = 0
    failures: dict[tuple[str, str], int] = {}
    types: set[str] = set()
    for entries in service.mta_sts.reports.days.values():
        entry = entries.get(domain)
        if entry is None:
            continue
        successes += entry.successes
        types.add(entry.policy_type)
        for key, count in entry.failures.items():
            result_type, _ip, mx, _detail = key.split("|", 3)
            failures[(result_type, mx)] = failures.get((result_type, mx), 0) + count
    return successes, failures, types


async def run_ctl(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """C{python -m gateway.ctl ARGS} in a thread (the reactor keeps serving
    DNS, HTTPS and the sinks meanwhile)."""
    run = functools.partial(subprocess.run, [sys.executable, "-m", "gateway.ctl", *args],
                            cwd=str(REPO), env=subprocess_env(), capture_output=True, text=True,
                            timeout=timeout)
    return await in_thread(run, timeout=timeout + 10)


def mx_sink(sinks: Callable[..., Sink], ca: TestCA, kind: str, name: str = MX1, **kwargs: Any) -> Sink:
    """A STARTTLS sink presenting a certificate of C{kind} for C{name}:
    good, wrong-name, expired, self-signed; C{plain} offers no STARTTLS."""
    if kind == "plain":
        return sinks(**kwargs)
    cert = {"good": lambda: ca.issue(name), "wrong-name": lambda: ca.wrong_name(name),
            "expired": lambda: ca.expired(name), "self-signed": lambda: self_signed(name)}[kind]()
    return sinks(tls_context=cert.server_context(), **kwargs)


# -- enforce ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_enforce_valid_mx_delivers_over_verified_tls(start_gateway, tmp_path, test_dns, https, sinks,
                                                           ca, ca_path, log_events):
    """Enforce mode, the MX is in the policy and presents a valid
    certificate for its name: the message is delivered over TLS, the
    delivery log line says mta_sts=enforce:verified, the policy was
    fetched once over HTTPS (with SNI mta-sts.sts.test) and cached, and
    TLS-RPT counts one successful session under an sts policy."""
    sink = mx_sink(sinks, ca, "good")
    publish(test_dns, [(MX1, "127.0.0.1")])
    https.serve(POLICY_PATH, policy_text())
    service = start_gateway(sts_config(tmp_path, test_dns, https, sink.port, ca_path))
    await submit(service, b"Subject: enforce ok\r\n\r\nhello\r\n")
    got = (await wait_message(sink))[0]
    assert got.tls and got.recipients == [RCPT]
    await wait_until(lambda: [line for line in delivery_lines(log_events) if "sent" in line], "the delivery line")
    lines = delivery_lines(log_events)
    assert any("mta_sts=enforce:verified" in line and "verified=yes" in line for line in lines), lines
    assert https.paths() == [POLICY_PATH]
    assert https.server_names == [POLICY_HOST]
    assert https.requests[0].host == f"{POLICY_HOST}:{https.port}"
    entry = service.mta_sts.cache.get(DOMAIN)
    assert entry is not None and entry.policy_id == "1" and entry.policy.mode is Mode.ENFORCE
    successes, failures, types = counts(service)
    assert (successes, failures, types) == (1, {}, {"sts"})


@pytest_twisted.ensureDeferred
async def test_enforce_mx_not_in_policy_is_deferred(start_gateway, tmp_path, test_dns, https, sinks,
                                                    ca, ca_path):
    """Enforce mode, the only MX host is not listed in the policy: no
    connection is made, the message stays queued (deferred, 4.7.x, the
    reply names MTA-STS), never bounced; TLS-RPT records a
    validation-failure for that MX host."""
    sink = mx_sink(sinks, ca, "good", name=ROGUE)
    idle = sink.connections  # aiosmtpd's own start-up probe
    publish(test_dns, [(ROGUE, "127.0.0.1")])
    https.serve(POLICY_PATH, policy_text(mx=(MX1,)))
    service = start_gateway(sts_config(tmp_path, test_dns, https, sink.port, ca_path))
    await submit(service, b"Subject: not in policy\r\n\r\nhello\r\n")
    recipient = await wait_deferred(tmp_path)
    assert recipient.status == "deferred"
    assert recipient.last_reply.startswith("4") and "4.7." in recipient.last_reply
    assert "MTA-STS" in recipient.last_reply
    assert sink.connections == idle and sink.messages == []
    successes, failures, _ = counts(service)
    assert successes == 0 and failures == {("validation-failure", ROGUE): 1}


#: RFC 8460 §4.3.1: the result types of a failed TLS negotiation.
NEGOTIATION_FAILURES = {"starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
                        "certificate-not-trusted", "validation-failure"}

CLASSIFY_BUG = ("gateway/delivery.py Connection._starttls() reads getHandle().get_verify_result(), which "
                "pyOpenSSL (26.4) does not have: the AttributeError is swallowed, classify_tls_failure() falls "
                "back to the error text, which only says 'certificate verify failed', so expired and "
                "untrusted certificates are reported as validation-failure")

BAD_CERTIFICATES = [
    pytest.param("wrong-name", "certificate-host-mismatch", id="wrong-name"),
    pytest.param("expired", "certificate-expired", id="expired"),
    pytest.param("self-signed", "certificate-not-trusted", id="self-signed"),
]


async def deliver_to_bad_certificate(start_gateway, tmp_path, test_dns, https, sinks, ca, ca_path, kind):
    """Enforce policy, one MX with a C{kind} certificate: wait for the
    deferral; (service, sink, recipient entry, connections before)."""
    sink = mx_sink(sinks, ca, kind)
    idle = sink.connections  # aiosmtpd's own start-up probe
    publish(test_dns, [(MX1, "127.0.0.1")])
    https.serve(POLICY_PATH, policy_text())
    service = start_gateway(sts_config(tmp_path, test_dns, https, sink.port, ca_path))
    await submit(service, b"Subject: bad cert\r\n\r\nhello\r\n")
    recipient = await wait_deferred(tmp_path)
    return service, sink, recipient, idle


@pytest.mark.parametrize("kind", ["wrong-name", "expired", "self-signed"])
@pytest_twisted.ensureDeferred
async def test_enforce_bad_certificate_is_deferred_and_reported(start_gateway, tmp_path, test_dns, https,
                                                                sinks, ca, ca_path, kind):
    """Enforce mode, the MX is in the policy but its certificate is bad
    (wrong name, expired, or self-signed): the TLS handshake is tried and
    the message is not sent (no plaintext or unverified fallback); it
    stays queued as a 4.7.5 deferral, never bounced, and TLS-RPT records
    one negotiation failure (RFC 8460 §4.3.1) for that MX host."""
    service, sink, recipient, idle = await deliver_to_bad_certificate(
        start_gateway, tmp_path, test_dns, https, sinks, ca, ca_path, kind)
    assert recipient.status == "deferred"
    assert recipient.last_reply.startswith("421 4.7.5"), recipient.last_reply
    assert sink.connections > idle and sink.messages == []
    successes, failures, types = counts(service)
    assert successes == 0 and types == {"sts"}
    assert sum(failures.values()) == 1, failures
    (result_type, mx), = failures
    assert mx == MX1 and result_type in NEGOTIATION_FAILURES


@pytest.mark.parametrize("kind, result_type", BAD_CERTIFICATES)
@pytest_twisted.ensureDeferred
async def test_bad_certificate_result_type(start_gateway, tmp_path, test_dns, https, sinks, ca, ca_path,
                                           kind, result_type):
    """The TLS-RPT result type names the defect (RFC 8460 §4.3.1): a
    wrong name is certificate-host-mismatch, an expired certificate
    certificate-expired, a self-signed one certificate-not-trusted."""
    service, _sink, _recipient, _ = await deliver_to_bad_certificate(
        start_gateway, tmp_path, test_dns, https, sinks, ca, ca_path, kind)
    _, failures, _ = counts(service)
    assert list(failures) == [(result_type, MX1)]


@pytest_twisted.ensureDeferred
async def test_enforce_without_starttls_is_deferred(start_gateway, tmp_path, test_dns, https, sinks,
                                                    ca, ca_path, log_events):
    """Enforce mode, the MX does not offer STARTTLS: nothing is sent in
    plaintext; the message is deferred (4.7.4) and TLS-RPT records
    starttls-not-supported for that MX host."""
    sink = mx_sink(sinks, ca, "plain")
    publish(test_dns, [(MX1, "127.0.0.1")])
    https.serve(POLICY_PATH, policy_text())
    service = start_gateway(sts_config(tmp_path, test_dns, https, sink.port, ca_path))
    await submit(service, b"Subject: no starttls\r\n\r\nhello\r\n")
    recipient = await wait_deferred(tmp_path)
    assert recipient.status == "deferred" and "4.7.4" in recipient.last_reply
    assert "STARTTLS" in recipient.last_reply
    assert sink.messages == []
    successes, failures, _ = counts(service)
    assert successes == 0 and failures == {("starttls-not-supported", MX1): 1}
    assert not any("sent" in line for line in delivery_lines(log_events))


@pytest_twisted.ensureDeferred
async def test_enforce_moves_on_to_next_policy_mx(start_gateway, tmp_path, test_dns, https, sinks,
                                                  ca, ca_path, log_events):
    """Enforce mode, two MX hosts in the policy (one by a wildcard
    pattern): the first presents an expired certificate, so the gateway
    moves to the second, which is valid, and delivers there over verified
    TLS.  TLS-RPT counts one failure for the first and one success."""
    port = shared_port("127.0.0.1", "127.0.0.2")
    bad = mx_sink(sinks, ca, "expired", name=MX1, host="127.0.0.1", port=port)
    good = mx_sink(sinks, ca, "good", name=MX2, host="127.0.0.2", port=port)
    publish(test_dns, [(MX1, "127.0.0.1"), (MX2, "127.0.0.2")])
    https.serve(POLICY_PATH, policy_text(mx=(MX1, "*.sts.test")))
    service = start_gateway(sts_config(tmp_path, test_dns, https, port, ca_path))
    await submit(service, b"Subject: second mx\r\n\r\nhello\r\n")
    got = (await wait_message(good))[0]
    assert got.tls and bad.messages == []
    await wait_until(lambda: [line for line in delivery_lines(log_events) if "sent" in line], "the delivery line")
    assert any(f"relay={MX2}[127.0.0.2]" in line and "mta_sts=enforce:verified" in line
               for line in delivery_lines(log_events))
    successes, failures, _ = counts(service)
    assert successes == 1 and sum(failures.values()) == 1
    assert [mx for _, mx in failures] == [MX1]


# -- testing mode -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["self-signed", "wrong-name", "plain"])
@pytest_twisted.ensureDeferred
async def test_testing_mode_delivers_and_reports(start_gateway, tmp_path, test_dns, https, sinks,
                                                 ca, ca_path, log_events, kind):
    """Testing mode, the MX fails verification (self-signed or wrong-name
    certificate, or no STARTTLS at all): the gateway retries the same
    host at the route's own level ([relay] tls = "may") and delivers, the
    log says mta_sts=testing:unverified, and TLS-RPT records the failure."""
    sink = mx_sink(sinks, ca, kind)
    publish(test_dns, [(MX1, "127.0.0.1")])
    https.serve(POLICY_PATH, policy_text(mode="testing"))
    service = start_gateway(sts_config(tmp_path, test_dns, https, sink.port, ca_path))
    await submit(service, b"Subject: testing\r\n\r\nhello\r\n")
    got = (await wait_message(sink))[0]
    assert got.recipients == [RCPT]
    assert got.tls is (kind != "plain")
    await wait_until(lambda: [line for line in delivery_lines(log_events) if "sent" in line], "the delivery line")
    lines = delivery_lines(log_events)
    assert any("mta_sts=testing:unverified" in line and "verified=no" in line for line in lines), lines
    successes, failures, types = counts(service)
    assert successes == 0 and sum(failures.values()) == 1 and types == {"sts"}
    (result_type, mx), = failures
    assert mx == MX1 and result_type in NEGOTIATION_FAILURES
    if kind == "plain":
        assert result_type == "starttls-not-supported"


@pytest_twisted.ensureDeferred
async def test_testing_mode_valid_mx_is_verified(start_gateway, tmp_path, test_dns, https, sinks,
                                                 ca, ca_path, log_events):
    """Testing mode with a valid MX certificate: delivered over verified
    TLS at the first try, logged as mta_sts=testing:verified, counted as
    a success."""
    sink = mx_sink(sinks, ca, "good")
    publish(test_dns, [(MX1, "127.0.0.1")])
    https.serve(POLICY_PATH, policy_text(mode="testing"))
    service = start_gateway(sts_config(tmp_path, test_dns, https, sink.port, ca_path))
    await submit(service, b"Subject: testing ok\r\n\r\nhello\r\n")
    assert (await wait_message(sink))[0].tls
    await wait_until(lambda: [line for line in delivery_lines(log_events) if "sent" in line], "the delivery line")
    assert any("mta_sts=testing:verified" in line for line in delivery_lines(log_events))
    assert counts(service)[:2] == (1, {})


# -- the policy cache ---------------------------------------------------------------


async def deliver_once(service: Any, sink: Sink, count: int, subject: str) -> None:
    await submit(service, f"Subject: {subject}\r\n\r\nhello\r\n".encode())
    await wait_message(sink, count)


@pytest.mark.parametrize("new_txt", [None, "v=STSv1; id=2"], ids=["txt-unchanged", "txt-id-changed"])
@pytest_twisted.ensureDeferred
async def test_cached_policy_enforced_while_policy_host_is_down(start_gateway, tmp_path, test_dns, https,
                                                                sinks, ca, ca_path, new_txt):
    """A policy fetched once stays in force when the policy host goes
    down (RFC 8461 §5.1): after the first delivery the HTTPS server is
    stopped and the MX record now names a host the policy does not list.
    With the TXT id unchanged the cache answers without a fetch; with a
    new id the fetch fails (reported as sts-policy-fetch-error) and the
    cached policy still applies.  Either way the message is refused
    (deferred, MTA-STS in the reply), not delivered to the new MX."""
    sink = mx_sink(sinks, ca, "good", name=MX1)
    publish(test_dns, [(MX1, "127.0.0.1")])
    https.serve(POLICY_PATH, policy_text(mx=(MX1,)))
    service = start_gateway(sts_config(tmp_path, test_dns, https, sink.port, ca_path))
    await deliver_once(service, sink, 1, "first")
    assert len(https.requests) == 1
    await https.stop()
    set_mx(test_dns, [(ROGUE, "127.0.0.1")])
    if new_txt is not None:
        test_dns.remove(TXT_NAME, "TXT")
        test_dns.add(TXT_NAME, "TXT", new_txt)
    await submit(service, b"Subject: second\r\n\r\nhello\r\n")
    recipient = await wait_deferred(tmp_path)
    assert "MTA-STS" in recipient.last_reply and "4.7." in recipient.last_reply
    assert len(sink.messages) == 1 and len(https.requests) == 1
    _, failures, _ = counts(service)
    assert failures.get(("validation-failure", ROGUE)) == 1
    fetch_errors = failures.get(("sts-policy-fetch-error", ""), 0)
    assert fetch_errors == (0 if new_txt is None else 1)
    entry = service.mta_sts.cache.get(DOMAIN)
    assert entry is not None and entry.policy_id == "1"


@pytest_twisted.ensureDeferred
async def test_txt_id_change_refetches(start_gateway, tmp_path, test_dns, https, sinks, ca, ca_path):
    """The policy is fetched again only when the TXT id changes (RFC 8461
    §5): two deliveries under id=1 cost one HTTPS request; after the id
    becomes 2 the next delivery fetches again and the new policy (a new
    max_age) replaces the cached one."""
    sink = mx_sink(sinks, ca, "good")
    publish(test_dns, [(MX1, "127.0.0.1")])
    https.serve(POLICY_PATH, policy_text(max_age=86400))
    service = start_gateway(sts_config(tmp_path, test_dns, https, sink.port, ca_path))
    await deliver_once(service, sink, 1, "one")
    await deliver_once(service, sink, 2, "two")
    assert len(https.requests) == 1
    test_dns.remove(TXT_NAME, "TXT")
    test_dns.add(TXT_NAME, "TXT", "v=STSv1; id=2")
    https.serve(POLICY_PATH, policy_text(max_age=172800))
    await deliver_once(service, sink, 3, "three")
    assert len(https.requests) == 2 and https.paths() == [POLICY_PATH, POLICY_PATH]
    entry = service.mta_sts.cache.get(DOMAIN)
    assert entry.policy_id == "2" and entry.policy.max_age == 172800
    saved = json.loads((tmp_path / "mta-sts" / "policies" / "sts.test.json").read_text())
    assert saved["policy_id"] == "2" and saved["policy"]["max_age"] == 172800


def seed_cache(tmp_path: Path, *, expired: bool) -> None:
    """Put an enforce policy for sts.test (listing mx1 only) in the
    gateway's cache directory before it starts."""
    now = time.time()
    expires = now - 3600 if expired else now + 86400
    cache = FilePolicyCache(tmp_path / "mta-sts" / "policies")
    cache.put(CachedPolicy(domain=DOMAIN, policy_id="1",
                           policy=Policy("STSv1", Mode.ENFORCE, (MX1,), 86400),
                           fetched_at=expires - 86400, expires_at=expires))


@pytest_twisted.ensureDeferred
async def test_expired_cache_and_no_txt_means_no_policy(start_gateway, tmp_path, test_dns, https, sinks,
                                                        ca, ca_path, log_events):
    """An expired cached policy and no TXT record: there is no policy, so
    delivery proceeds as "may" — to an MX the old policy did not list,
    without STARTTLS — and nothing is fetched (mta_sts=none)."""
    seed_cache(tmp_path, expired=True)
    sink = mx_sink(sinks, ca, "plain")
    publish(test_dns, [(ROGUE, "127.0.0.1")], txt=None)
    https.serve(POLICY_PATH, policy_text())
    service = start_gateway(sts_config(tmp_path, test_dns, https, sink.port, ca_path))
    await submit(service, b"Subject: expired cache\r\n\r\nhello\r\n")
    got = (await wait_message(sink))[0]
    assert not got.tls
    await wait_until(lambda: [line for line in delivery_lines(log_events) if "sent" in line], "the delivery line")
    assert any("mta_sts=none" in line for line in delivery_lines(log_events))
    assert https.requests == []
    assert counts(service) == (0, {}, set())


@pytest_twisted.ensureDeferred
async def test_unexpired_cache_applies_without_txt(start_gateway, tmp_path, test_dns, https, sinks,
                                                   ca, ca_path):
    """A cached policy that has not expired still applies when the TXT
    record disappears (RFC 8461 §5: the absence of the record never
    removes a cached policy): an MX outside it is refused."""
    seed_cache(tmp_path, expired=False)
    sink = mx_sink(sinks, ca, "plain")
    publish(test_dns, [(ROGUE, "127.0.0.1")], txt=None)
    service = start_gateway(sts_config(tmp_path, test_dns, https, sink.port, ca_path))
    await submit(service, b"Subject: cached\r\n\r\nhello\r\n")
    recipient = await wait_deferred(tmp_path)
    assert "MTA-STS" in recipient.last_reply
    assert sink.messages == [] and https.requests == []


# -- refused policy fetches -------------------------------------------------------


OVERSIZED = policy_text() + b"#" * (64 * 1024)

FETCH_ERRORS = [
    pytest.param(Route(redirect=f"https://{POLICY_HOST}/elsewhere.txt"), "sts-policy-fetch-error", id="redirect"),
    pytest.param(Route(body=OVERSIZED), "sts-policy-fetch-error", id="oversized"),
    pytest.param(Route(body=policy_text(), stream=128 * 1024), "sts-policy-fetch-error", id="oversized-chunked"),
    pytest.param(Route(body=policy_text(), content_type="text/html"), "sts-policy-fetch-error",
                 id="wrong-content-type"),
    pytest.param(Route(body=policy_text(), content_type=None), "sts-policy-fetch-error", id="no-content-type"),
    pytest.param(Route(status=404, body=b"gone\n"), "sts-policy-fetch-error", id="http-404"),
    pytest.param(Route(body=b"version: STSv1\r\nmode: enforce\r\n"), "sts-policy-invalid", id="malformed"),
    pytest.param(Route(body=policy_text().replace(b"STSv1", b"STSv2")), "sts-policy-invalid", id="wrong-version"),
]


@pytest.mark.parametrize("route, result_type", FETCH_ERRORS)
@pytest_twisted.ensureDeferred
async def test_refused_policy_means_no_policy(start_gateway, tmp_path, test_dns, https, sinks, ca, ca_path,
                                              log_events, route, result_type):
    """A policy that must be refused (RFC 8461 §3.3: a redirect, a body
    over the size limit, a Content-Type other than text/plain, a status
    other than 200; §3.2: a malformed policy) gives no policy, since none
    was cached: the message is delivered normally — to an MX the policy
    would not allow, without STARTTLS — and TLS-RPT records the fetch
    failure (sts-policy-fetch-error or sts-policy-invalid)."""
    sink = mx_sink(sinks, ca, "plain")
    publish(test_dns, [(ROGUE, "127.0.0.1")])
    https.routes[POLICY_PATH] = route
    service = start_gateway(sts_config(tmp_path, test_dns, https, sink.port, ca_path))
    await submit(service, b"Subject: refused policy\r\n\r\nhello\r\n")
    got = (await wait_message(sink))[0]
    assert not got.tls and got.recipients == [RCPT]
    await wait_until(lambda: [line for line in delivery_lines(log_events) if "sent" in line], "the delivery line")
    assert any("mta_sts=none" in line for line in delivery_lines(log_events))
    assert https.paths() == [POLICY_PATH]
    assert service.mta_sts.cache.get(DOMAIN) is None
    successes, failures, types = counts(service)
    assert successes == 0 and failures == {(result_type, ""): 1} and types == {"no-policy-found"}


@pytest_twisted.ensureDeferred
async def test_policy_host_with_untrusted_certificate(start_gateway, tmp_path, test_dns, https, sinks, ca,
                                                      ca_path):
    """The policy host presents a certificate for another name: the
    policy is not used (WebPKI, RFC 8461 §3.3), delivery proceeds without
    a policy, and TLS-RPT records sts-webpki-invalid."""
    https.use(ca.wrong_name(POLICY_HOST))
    sink = mx_sink(sinks, ca, "plain")
    publish(test_dns, [(ROGUE, "127.0.0.1")])
    https.serve(POLICY_PATH, policy_text())
    service = start_gateway(sts_config(tmp_path, test_dns, https, sink.port, ca_path))
    await submit(service, b"Subject: webpki\r\n\r\nhello\r\n")
    await wait_message(sink)
    assert counts(service)[1] == {("sts-webpki-invalid", ""): 1}


# -- TLS-RPT reports (RFC 8460) -----------------------------------------------------


YESTERDAY_POLICY = Policy("STSv1", Mode.ENFORCE, (MX1, "*.backup.sts.test"), 86400)


def record_yesterday(service: Any, domain: str = DOMAIN) -> str:
    """Counts for a finished day, straight into the gateway's store:
    3 successes, 2 certificate-expired at mx1, 1 starttls-not-supported
    at mx2.  Returns that day (YYYY-MM-DD)."""
    moment = time.time() - 86400
    store = service.mta_sts.reports
    for _ in range(3):
        store.record(moment, domain, policy=YESTERDAY_POLICY, success=True, mx=MX1, ip="127.0.0.1")
    for _ in range(2):
        store.record(moment, domain, policy=YESTERDAY_POLICY, success=False, result_type="certificate-expired",
                     mx=MX1, ip="127.0.0.1", detail="certificate has expired")
    store.record(moment, domain, policy=YESTERDAY_POLICY, success=False, result_type="starttls-not-supported",
                 mx=MX2, ip="127.0.0.2")
    return day_of(moment)


def check_report_json(report: dict[str, Any], day: str) -> None:
    """The RFC 8460 §4.4 fields of the report L{record_yesterday} makes."""
    assert report["organization-name"] == "mx.example.test"
    assert report["date-range"] == {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"}
    assert report["contact-info"] == "tlsrpt@example.test"
    assert isinstance(report["report-id"], str) and report["report-id"]
    assert isinstance(report["policies"], list) and len(report["policies"]) == 1
    entry = report["policies"][0]
    policy = entry["policy"]
    assert policy["policy-type"] == "sts"
    assert policy["policy-domain"] == DOMAIN
    assert policy["mx-host"] == [MX1, "*.backup.sts.test"]
    assert policy["policy-string"] == ["version: STSv1", "mode: enforce", f"mx: {MX1}",
                                       "mx: *.backup.sts.test", "max_age: 86400"]
    assert entry["summary"] == {"total-successful-session-count": 3, "total-failure-session-count": 3}
    details = {(d["result-type"], d["receiving-mx-hostname"]): d for d in entry["failure-details"]}
    assert set(details) == {("certificate-expired", MX1), ("starttls-not-supported", MX2)}
    assert details[("certificate-expired", MX1)]["failed-session-count"] == 2
    assert details[("starttls-not-supported", MX2)]["failed-session-count"] == 1
    assert details[("certificate-expired", MX1)]["failure-reason-code"] == "certificate has expired"


def publish_tlsrpt(dns: TestDNS, rua: str, domain: str = DOMAIN) -> None:
    dns.add(f"_smtp._tls.{domain}", "TXT", f"v=TLSRPTv1; rua={rua}")


@pytest_twisted.ensureDeferred
async def test_tlsrpt_report_by_mail(start_gateway, tmp_path, test_dns, https, sinks, ca, ca_path):
    """send_due() mails the report of each finished day to the mailto:
    rua of _smtp._tls.sts.test, through the gateway's own queue to the MX
    of reports.test: an RFC 8460 §5.3 multipart/report;
    report-type="tlsrpt" message with TLS-Report-Domain and
    TLS-Report-Submitter headers and an application/tlsrpt+gzip
    attachment (named as in §5.1) whose JSON carries the §4.4 fields.
    Today's counts (a real verified delivery) are kept for tomorrow; the
    sent day is forgotten, so a second call sends nothing."""
    sink = mx_sink(sinks, ca, "good")
    publish(test_dns, [(MX1, "127.0.0.1")])
    test_dns.add("reports.test", "MX", (10, "mx.reports.test"))
    test_dns.add("mx.reports.test", "A", "127.0.0.1")
    publish_tlsrpt(test_dns, "mailto:tlsrpt@reports.test")
    https.serve(POLICY_PATH, policy_text())
    service = start_gateway(sts_config(tmp_path, test_dns, https, sink.port, ca_path))
    await deliver_once(service, sink, 1, "today")
    day = record_yesterday(service)

    assert await service.mta_sts.send_due() == 1
    messages = await wait_message(sink, 2)
    got = next(m for m in messages if m.recipients == ["tlsrpt@reports.test"])
    assert got.sender == "tlsrpt@example.test"
    message = email.message_from_bytes(got.content, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    assert message["TLS-Report-Domain"] == DOMAIN
    assert message["TLS-Report-Submitter"] == "mx.example.test"
    assert message["Subject"].startswith(f"Report Domain: {DOMAIN} Submitter: mx.example.test Report-ID: <")
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "application/tlsrpt+gzip"]
    attachment = parts[1]
    start = calendar.timegm(time.strptime(day, "%Y-%m-%d"))  # that day's 00:00 UTC
    assert attachment.get_filename().startswith(f"mx.example.test!{DOMAIN}!{start}!{start + 86399}!")
    assert attachment.get_filename().endswith(".json.gz")
    report = json.loads(gzip.decompress(attachment.get_payload(decode=True)))
    check_report_json(report, day)
    assert report["report-id"] in message["Subject"]

    assert not (tmp_path / "mta-sts" / "tlsrpt" / f"{day}.json").exists()
    assert service.mta_sts.reports.day(day_of(time.time()))[DOMAIN].successes == 1
    assert await service.mta_sts.send_due() == 0


class _ReportCollector(resource.Resource):
    """An https: rua endpoint: records each POST (path, Content-Type, body)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[tuple[str, str | None, bytes]] = []

    def render_POST(self, request: server.Request) -> bytes:
        content_type = request.getHeader(b"content-type")
        self.posts.append((request.path.decode("ascii"), content_type.decode("latin-1") if content_type else None,
                           request.content.read()))
        request.setResponseCode(200)
        return b"thanks\n"


@pytest.fixture
def report_endpoint(ca: TestCA):
    """An HTTPS server on 127.0.0.1 (certificate for that IP from the test
    CA) collecting TLS-RPT POSTs; yields (collector, port)."""
    collector = _ReportCollector()
    site = server.Site(collector)
    port = reactor.listenSSL(0, site, ca.issue("127.0.0.1").server_options(), interface="127.0.0.1")
    yield collector, port.getHost().port
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest_twisted.ensureDeferred
async def test_tlsrpt_report_by_https_post(start_gateway, tmp_path, test_dns, https, sinks, ca, ca_path,
                                           report_endpoint):
    """An https: rua receives the report as a POST (RFC 8460 §5.2) with
    Content-Type application/tlsrpt+gzip; the gunzipped body is the same
    RFC 8460 §4.4 JSON."""
    collector, port = report_endpoint
    sink = mx_sink(sinks, ca, "good")
    publish(test_dns, [(MX1, "127.0.0.1")])
    publish_tlsrpt(test_dns, f"https://127.0.0.1:{port}/v1/tlsrpt")
    service = start_gateway(sts_config(tmp_path, test_dns, https, sink.port, ca_path))
    day = record_yesterday(service)
    assert await service.mta_sts.send_due() == 1
    assert len(collector.posts) == 1
    path, content_type, body = collector.posts[0]
    assert path == "/v1/tlsrpt" and content_type == "application/tlsrpt+gzip"
    check_report_json(json.loads(gzip.decompress(body)), day)
    assert sink.messages == []


@pytest_twisted.ensureDeferred
async def test_tlsrpt_no_record_no_report(start_gateway, tmp_path, test_dns, https, sinks, ca, ca_path):
    """A domain without a _smtp._tls TXT record gets no report; its
    finished day is dropped all the same."""
    sink = mx_sink(sinks, ca, "good")
    publish(test_dns, [(MX1, "127.0.0.1")])
    service = start_gateway(sts_config(tmp_path, test_dns, https, sink.port, ca_path))
    day = record_yesterday(service)
    assert await service.mta_sts.send_due() == 0
    assert not (tmp_path / "mta-sts" / "tlsrpt" / f"{day}.json").exists()
    await task.deferLater(reactor, 0.5, lambda: None)
    assert sink.messages == [] and snapshot(tmp_path, "incoming") == []


@pytest_twisted.ensureDeferred
async def test_tlsrpt_report_ignores_mta_sts_of_rua_domain(start_gateway, tmp_path, test_dns, https, sinks,
                                                           ca, ca_path):
    """The report about sts.test goes to tlsrpt@sts.test, whose MX fails
    MTA-STS (expired certificate, enforce): RFC 8460 §5.3.1 says the
    report must be delivered anyway (here at the route's level, "may"),
    precisely because it reports that failure.  Ordinary mail to the same
    domain is still refused."""
    sink = mx_sink(sinks, ca, "expired")
    publish(test_dns, [(MX1, "127.0.0.1")])
    publish_tlsrpt(test_dns, "mailto:tlsrpt@sts.test")
    https.serve(POLICY_PATH, policy_text())
    service = start_gateway(sts_config(tmp_path, test_dns, https, sink.port, ca_path))
    record_yesterday(service)
    assert await service.mta_sts.send_due() == 1
    await wait_until(lambda: sink.messages or deferred_to(tmp_path, "tlsrpt@sts.test"),
                     "the report delivered or deferred")
    assert [m.recipients for m in sink.messages] == [["tlsrpt@sts.test"]]
    report = email.message_from_bytes(sink.messages[0].content, policy=email.policy.default)
    assert report["TLS-Report-Domain"] == DOMAIN and sink.messages[0].tls
    # Ordinary mail to the same domain is still held to the policy.
    await submit(service, b"Subject: still enforced\r\n\r\nhello\r\n")
    recipient = await wait_deferred(tmp_path)
    assert recipient.last_reply.startswith("421 4.7.5")
    assert len(sink.messages) == 1


@pytest_twisted.ensureDeferred
async def test_tlsrpt_failure_details_name_receiving_ip(start_gateway, tmp_path, test_dns, https, sinks,
                                                        ca, ca_path):
    """A failed session with an MX at 127.0.0.2 (the gateway connects
    from 127.0.0.1) is reported with receiving-ip 127.0.0.2 and not with
    the MX's address as sending-mta-ip (RFC 8460 §4.4)."""
    from gateway.tlsrpt import build_report

    port = shared_port("127.0.0.2")
    sink = mx_sink(sinks, ca, "wrong-name", host="127.0.0.2", port=port)
    publish(test_dns, [(MX1, "127.0.0.2")])
    https.serve(POLICY_PATH, policy_text())
    service = start_gateway(sts_config(tmp_path, test_dns, https, sink.port, ca_path))
    await submit(service, b"Subject: receiving ip\r\n\r\nhello\r\n")
    await wait_deferred(tmp_path)
    entries = [e[DOMAIN] for e in service.mta_sts.reports.days.values() if DOMAIN in e]
    report = build_report(organization="o", contact="c", day=day_of(time.time()), domain=DOMAIN,
                          entry=entries[0], report_id="r")
    detail, = report["policies"][0]["failure-details"]
    assert detail["receiving-mx-hostname"] == MX1
    assert detail.get("receiving-ip") == "127.0.0.2"
    assert detail.get("sending-mta-ip") != "127.0.0.2"


# -- gatewayctl mta-sts ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_gatewayctl_mta_sts_check_and_cache(start_gateway, tmp_path, test_dns, https, sinks, ca, ca_path):
    """C{gatewayctl mta-sts check sts.test --json}, run against the
    loopback DNS, HTTPS and MX hosts, shows the TXT record and id, the
    fetched policy, and each MX host with whether the policy allows it
    and whether its certificate is valid (mx1: allowed, valid; mx2: not
    allowed, wrong name).  The text form says the same.  C{mta-sts cache
    --json} lists nothing before the first delivery and the cached
    policy after it."""
    port = shared_port("127.0.0.1", "127.0.0.2")
    sink = mx_sink(sinks, ca, "good", name=MX1, host="127.0.0.1", port=port)
    mx_sink(sinks, ca, "wrong-name", name=MX2, host="127.0.0.2", port=port)
    publish(test_dns, [(MX1, "127.0.0.1"), (MX2, "127.0.0.2")])
    https.serve(POLICY_PATH, policy_text(mx=(MX1,)))
    service = start_gateway(sts_config(tmp_path, test_dns, https, port, ca_path))
    config = str(tmp_path / "gateway.toml")

    done = await run_ctl("mta-sts", "check", DOMAIN, "-c", config, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["domain"] == DOMAIN and result["txt_name"] == TXT_NAME
    assert result["txt_records"] == ["v=STSv1; id=1"] and result["policy_id"] == "1"
    assert result["txt_error"] is None and result["error"] is None
    assert result["policy_url"] == f"https://{POLICY_HOST}:{https.port}{POLICY_PATH}"
    assert result["policy"] == {"version": "STSv1", "mode": "enforce", "mx": [MX1], "max_age": 86400}
    rows = {row["host"]: row for row in result["mx"]}
    assert set(rows) == {MX1, MX2}
    assert rows[MX1]["address"] == "127.0.0.1" and rows[MX1]["port"] == port
    assert rows[MX1]["in_policy"] is True and rows[MX1]["certificate"] == "valid"
    assert rows[MX2]["address"] == "127.0.0.2"
    assert rows[MX2]["in_policy"] is False and rows[MX2]["certificate"] == "invalid"
    assert rows[MX2]["tls_failure"] == "certificate-host-mismatch"

    text = await run_ctl("mta-sts", "check", DOMAIN, "-c", config)
    assert text.returncode == 0, text.stderr
    assert "id=1" in text.stdout and "mode=enforce" in text.stdout
    assert any(MX1 in line and "in policy" in line and "certificate valid" in line
               for line in text.stdout.splitlines()), text.stdout
    assert any(MX2 in line and "NOT in policy" in line and "certificate invalid" in line
               for line in text.stdout.splitlines()), text.stdout

    empty = await run_ctl("mta-sts", "cache", "-c", config, "--json")
    assert empty.returncode == 0 and json.loads(empty.stdout) == []
    await deliver_once(service, sink, 1, "cache")
    cached = await run_ctl("mta-sts", "cache", "-c", config, "--json")
    assert cached.returncode == 0, cached.stderr
    row, = json.loads(cached.stdout)
    assert row["domain"] == DOMAIN and row["id"] == "1" and row["mode"] == "enforce"
    assert row["mx"] == [MX1] and row["max_age"] == 86400 and row["expired"] is False
    assert row["expires_at"] - row["fetched_at"] == pytest.approx(86400)


@pytest_twisted.ensureDeferred
async def test_gatewayctl_mta_sts_check_reports_refused_policy(start_gateway, tmp_path, test_dns, https,
                                                               sinks, ca, ca_path):
    """C{gatewayctl mta-sts check} with a policy host answering text/html:
    no policy, the error and its TLS-RPT result type are shown, and MX
    hosts are listed with in_policy null."""
    sink = mx_sink(sinks, ca, "good")
    publish(test_dns, [(MX1, "127.0.0.1")])
    https.serve(POLICY_PATH, policy_text(), content_type="text/html")
    start_gateway(sts_config(tmp_path, test_dns, https, sink.port, ca_path))
    done = await run_ctl("mta-sts", "check", DOMAIN, "-c", str(tmp_path / "gateway.toml"), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["policy"] is None and result["policy_id"] == "1"
    assert result["error_kind"] == "content-type" and result["result_type"] == "sts-policy-fetch-error"
    assert "text/html" in result["error"]
    row, = result["mx"]
    assert row["host"] == MX1 and row["in_policy"] is None and row["certificate"] == "valid"
