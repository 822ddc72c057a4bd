"""Acceptance tests of the relay side: the gateway receives with smtplib
and delivers, by a real test DNS server's MX records or by routes, to a
real SMTP sink (aiosmtpd) on loopback.

Most tests start the whole gateway in-process (C{start_gateway}).  The
retry test builds spool, router and scheduler by hand instead, so that the
scheduler runs on a C{task.Clock} and a five-minute retry takes no time.

Every wait is bounded: C{Sink.wait_for} has a timeout, L{wait_until} polls
for at most C{timeout} seconds of real time.
"""

from __future__ import annotations

import collections
import datetime
import email
import ipaddress
import random
import ssl
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads
from twisted.python.failure import Failure

from tests.dnsserver import TestDNS
from tests.sink import Received, Sink
from tests.support import base_config, client, in_thread, queued

STATES = ("incoming", "active", "deferred")


@pytest.fixture
def test_dns():
    server = TestDNS()
    server.start()
    yield server
    pytest_twisted.blockon(server.stop())


@pytest.fixture
def sink():
    server = Sink().start()
    yield server
    server.stop()


@pytest.fixture
def sinks():
    """Start more sinks: C{sinks(**Sink kwargs)}; all stopped afterwards."""
    started: list[Sink] = []

    def start(**kwargs: Any) -> Sink:
        server = Sink(**kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def relay_config(tmp_path, dns, sink_port, **relay):
    doc = base_config(tmp_path, server={"trusted_networks": ["127.0.0.0/8"]})
    doc["dns"] = {"servers": [dns.address], "timeout": 2, "reverse_lookup": False}
    doc["relay"] = {"enabled": True, "port": sink_port, "tls": "none", "connection_idle": 0.2, **relay}
    doc["queue"]["scan_interval"] = 0.2
    return doc


def send(port, sender, recipients, content):
    with client(port) as smtp:
        return smtp.sendmail(sender, recipients, content)


def send_many(port, sender, recipients, contents):
    """Several transactions on one SMTP connection."""
    with client(port) as smtp:
        return [smtp.sendmail(sender, recipients, content) for content in contents]


# -- helpers ------------------------------------------------------------------


async def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 20.0,
                     interval: float = 0.05, tick: Callable[[], Any] | None = None) -> Any:
    """Poll C{predicate} on the reactor every C{interval} seconds of real
    time until it returns something true (returned), for at most
    C{timeout} seconds; C{tick} runs between polls (to move a fake clock)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        if tick is not None:
            tick()
        await task.deferLater(reactor, interval, lambda: None)


def snapshot(spool_path: Path | str, state: str) -> list[tuple[Any, bytes]]:
    """L{queued}, retried when the scheduler moves a file while we read."""
    for _ in range(50):
        try:
            return queued(spool_path, state)
        except FileNotFoundError:
            time.sleep(0.01)
    return queued(spool_path, state)


def spool_empty(spool_path: Path | str) -> bool:
    return all(snapshot(spool_path, state) == [] for state in STATES)


def in_state_with(spool_path: Path | str, state: str, predicate: Callable[[Any], bool]) -> list:
    """The envelopes in C{state} for which C{predicate(envelope)} holds."""
    return [envelope for envelope, _ in snapshot(spool_path, state) if predicate(envelope)]


def parse_dsn(content: bytes) -> tuple[Any, list[Any], Any]:
    """Parse a DSN with the stdlib: (message, delivery-status blocks,
    the text/rfc822-headers part).  Checks the RFC 3464 / RFC 6522 shape."""
    report = email.message_from_bytes(content)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = report.get_payload()
    assert len(parts) == 3, [p.get_content_type() for p in parts]
    text, status, headers = parts
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    blocks = status.get_payload()
    assert isinstance(blocks, list) and len(blocks) >= 2
    return report, blocks, headers


def field_value(block: Any, name: str) -> str:
    """A delivery-status field with its folding and spacing normalised."""
    value = block[name]
    assert value is not None, f"no {name} in {dict(block.items())}"
    return " ".join(str(value).split())


def is_null_sender(sender: str) -> bool:
    """aiosmtpd records MAIL FROM:<> as "<>"."""
    return sender in ("", "<>")


def bounces(messages: list[Received]) -> list[Received]:
    return [m for m in messages if is_null_sender(m.sender)]


# -- TLS material made in the test (cryptography) ------------------------------


def _pem_write(path: Path, *blobs: bytes) -> str:
    path.write_bytes(b"".join(blobs))
    return str(path)


def make_ca(directory: Path) -> tuple[Any, Any, str]:
    """A test CA: (key, certificate, path of its PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailgateway test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    path = _pem_write(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def issue_leaf(ca_key: Any, ca_cert: Any, directory: Path, stem: str, *,
               dns_names: tuple[str, ...] = (), ip_addresses: tuple[str, ...] = ()) -> ssl.SSLContext:
    """A server certificate signed by the test CA with the given SANs; the
    returned server context (for aiosmtpd) presents it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(n) for n in dns_names] + [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (dns_names or ip_addresses)[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path = _pem_write(directory / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM))
    key_path = _pem_write(directory / f"{stem}.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context


def self_signed_server_context(directory: Path) -> ssl.SSLContext:
    """A server context with a self-signed certificate (gateway.tls makes it)."""
    from gateway.tls import ensure_certificate

    cert, key = str(directory / "sink-cert.pem"), str(directory / "sink-key.pem")
    ensure_certificate(cert, key, "localhost")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


# -- tests ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_delivery_by_mx(start_gateway, tmp_path, test_dns, sink):
    """Mail for a remote domain goes to its MX host: the sink gets the
    message with our Received header first, and the spool is emptied."""
    test_dns.add("example.net", "MX", (10, "mx1.example.net"))
    test_dns.add("mx1.example.net", "A", "127.0.0.1")
    service = start_gateway(relay_config(tmp_path, test_dns, sink.port))
    body = b"Subject: by mx\r\n\r\n.leading dot\r\nbody\r\n"
    await in_thread(send, service.port_of("mx"), "a@example.org", ["rcpt@example.net"], body)
    [got] = await in_thread(sink.wait_for, 1)
    assert got.sender == "a@example.org" and got.recipients == ["rcpt@example.net"]
    assert got.content.startswith(b"Received: from ")
    assert got.content.endswith(body)
    assert ("example.net", "MX") in test_dns.queries
    for _ in range(50):
        if not any(queued(tmp_path / "spool", s) for s in ("incoming", "active", "deferred")):
            break
        await in_thread(lambda: __import__("time").sleep(0.05))
    assert all(queued(tmp_path / "spool", s) == [] for s in ("incoming", "active", "deferred"))


@pytest_twisted.ensureDeferred
async def test_delivery_by_transport_map(start_gateway, tmp_path, test_dns, sink):
    """A [routes] entry "routed.test" = "[127.0.0.1]:PORT" sends the mail
    straight to that host and port: it arrives, and the DNS server is never
    asked anything about routed.test (no MX, no A look-up)."""
    doc = relay_config(tmp_path, test_dns, 1)  # the MX port is wrong on purpose
    doc["routes"] = {"routed.test": f"[127.0.0.1]:{sink.port}"}
    service = start_gateway(doc)
    body = b"Subject: routed\r\n\r\nvia the transport map\r\n"
    await in_thread(send, service.port_of("mx"), "a@example.org", ["rcpt@routed.test"], body)
    [got] = await in_thread(sink.wait_for, 1)
    assert got.recipients == ["rcpt@routed.test"]
    assert got.content.endswith(body)
    await wait_until(lambda: spool_empty(tmp_path / "spool"), "the spool to be empty")
    assert not [q for q in test_dns.queries if q[0].endswith("routed.test")], test_dns.queries


@pytest_twisted.ensureDeferred
async def test_fallback_to_second_mx(start_gateway, tmp_path, test_dns, sink):
    """When the most preferred MX refuses the connection (127.0.0.2: nothing
    listens there), the next MX by preference (127.0.0.1) gets the mail."""
    test_dns.add("example.net", "MX", (10, "mx1.example.net"))
    test_dns.add("example.net", "MX", (20, "mx2.example.net"))
    test_dns.add("mx1.example.net", "A", "127.0.0.2")
    test_dns.add("mx2.example.net", "A", "127.0.0.1")
    service = start_gateway(relay_config(tmp_path, test_dns, sink.port))
    before = sink.connections  # aiosmtpd's own start-up probe counts as one
    await in_thread(send, service.port_of("mx"), "a@example.org", ["rcpt@example.net"],
                    b"Subject: fallback\r\n\r\nbody\r\n")
    [got] = await in_thread(sink.wait_for, 1)
    assert got.recipients == ["rcpt@example.net"]
    await wait_until(lambda: spool_empty(tmp_path / "spool"), "the spool to be empty")
    # Both exchanges were resolved: the first was tried and refused.
    assert ("mx1.example.net", "A") in test_dns.queries
    assert ("mx2.example.net", "A") in test_dns.queries
    assert sink.connections - before == 1
    assert len(sink.messages) == 1


@pytest_twisted.ensureDeferred
async def test_temporary_failure_is_retried_after_backoff(tmp_path, test_dns, sink):
    """A 451 for the recipient defers the message: it goes to deferred/ with
    the recipient "deferred", one attempt, and next_attempt retry_initial
    (300 s) +-10 % jitter after now; once the (fake) clock passes that time
    the message is retried, delivered, and removed from the spool."""
    from gateway.config import parse_config
    from gateway.dns import make_resolver
    from gateway.queue import Spool
    from gateway.queuefile import Envelope, EnvelopeRecipient
    from gateway.routing import Router
    from gateway.scheduler import DeliveryScheduler

    test_dns.add("example.net", "MX", (10, "mx1.example.net"))
    test_dns.add("mx1.example.net", "A", "127.0.0.1")
    doc = relay_config(tmp_path, test_dns, sink.port)
    doc["queue"]["retry_initial"] = 300
    config = parse_config(doc, str(tmp_path / "gateway.toml"))
    clock = task.Clock()
    clock.advance(time.time())  # a realistic "now" for received_at and queue ids

    def run_in_thread(f, *args):
        return threads.deferToThread(f, *args)

    spool = Spool(config.queue.path, run_in_thread=run_in_thread, clock=clock)
    router = Router(config, make_resolver(config.dns, reactor), tls_default=config.relay.tls,
                    route_tls=config.route_tls)
    scheduler = DeliveryScheduler(config, spool, router, reactor, clock=clock,
                                  run_in_thread=run_in_thread, rng=random.Random(1))

    body = b"Subject: retry me\r\n\r\nbody\r\n"
    writer = spool.open_message()
    writer.write(body)
    queue_id = await spool.commit(writer, Envelope(
        queue_id=writer.queue_id, sender="a@example.org", received_at=clock.seconds(),
        recipients=[EnvelopeRecipient("rcpt@example.net")], listener="test",
        client_address="127.0.0.1", size=len(body)))
    sink.handler.rcpt_replies = {"rcpt@example.net": ["451 4.7.1 try later", "250 ok"]}

    started = clock.seconds()
    scheduler.startService()
    try:
        clock.advance(0)

        def deferred_envelope():
            found = in_state_with(config.queue.path, "deferred", lambda e: e.queue_id == queue_id)
            return found and found[0]

        envelope = await wait_until(deferred_envelope, "the message to be deferred")
        [recipient] = envelope.recipients
        assert recipient.status == "deferred"
        assert recipient.attempts == 1 and envelope.attempts == 1
        assert "451" in recipient.last_reply and "4.7.1" in recipient.last_reply
        assert clock.seconds() == started  # no fake time has passed
        assert 270 <= envelope.next_attempt - started <= 330, envelope.next_attempt - started
        assert sink.messages == []
        # The file moves in a thread before the reactor-side bookkeeping
        # runs; wait for that (a private attribute, but the only signal) so
        # that the next scan knows the message's retry time.
        await wait_until(lambda: queue_id not in scheduler._inflight, "the attempt to be finished")

        # Not yet due: a scan just before the earliest possible retry time leaves it alone.
        clock.advance(269)
        await task.deferLater(reactor, 0.3, lambda: None)
        assert sink.messages == []
        assert in_state_with(config.queue.path, "deferred", lambda e: e.queue_id == queue_id)

        clock.advance(331 - 269)
        [got] = await in_thread(sink.wait_for, 1)
        assert got.recipients == ["rcpt@example.net"] and got.content.endswith(body)
        await wait_until(lambda: spool_empty(config.queue.path), "the spool to be empty")
    finally:
        await stop_on_clock(scheduler, clock)


async def stop_on_clock(scheduler: Any, clock: task.Clock) -> None:
    """Stop a scheduler that runs on a fake clock: its stopService waits on
    that clock, so move it along (bounded) until the stop completes."""
    d = scheduler.stopService()
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    await wait_until(lambda: outcome, "the scheduler to stop", timeout=20,
                     tick=lambda: clock.advance(0.5))
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()


@pytest_twisted.ensureDeferred
async def test_permanent_failure_sends_rfc3464_dsn(start_gateway, tmp_path, test_dns, sink):
    """A 550 5.1.1 for the recipient bounces it: a DSN from <> reaches the
    sender's MX, and the stdlib parses it as multipart/report with a
    message/delivery-status (Reporting-MTA, Final-Recipient, Action failed,
    Status 5.1.1, Diagnostic-Code with the reply, Remote-MTA) and the
    original headers as text/rfc822-headers."""
    test_dns.add("example.net", "MX", (10, "mx1.example.net"))
    test_dns.add("mx1.example.net", "A", "127.0.0.1")
    test_dns.add("sender.test", "MX", (10, "mx.sender.test"))
    test_dns.add("mx.sender.test", "A", "127.0.0.1")
    sink.handler.rcpt_replies = {"rcpt@example.net": ["550 5.1.1 no such user"]}
    service = start_gateway(relay_config(tmp_path, test_dns, sink.port))
    body = b"Subject: will bounce 1234\r\nMessage-ID: <orig@sender.test>\r\n\r\nthe body stays here\r\n"
    await in_thread(send, service.port_of("mx"), "a@sender.test", ["rcpt@example.net"], body)
    [dsn] = await in_thread(sink.wait_for, 1)
    assert is_null_sender(dsn.sender) and dsn.recipients == ["a@sender.test"]

    report, blocks, headers = parse_dsn(dsn.content)
    assert report["To"] == "<a@sender.test>"
    per_message, *per_recipient = blocks
    assert field_value(per_message, "Reporting-MTA") == "dns; mx.example.test"
    [block] = per_recipient
    assert field_value(block, "Final-Recipient").replace(" ", "").lower() == "rfc822;rcpt@example.net"
    assert field_value(block, "Action") == "failed"
    assert field_value(block, "Status") == "5.1.1"
    diagnostic = field_value(block, "Diagnostic-Code")
    assert diagnostic.lower().startswith("smtp;") and "550 5.1.1" in diagnostic
    assert field_value(block, "Remote-MTA") == "dns; mx1.example.net"
    original = headers.get_payload(decode=True)
    assert b"Subject: will bounce 1234" in original
    assert b"the body stays here" not in dsn.content  # headers only, never the body

    await wait_until(lambda: spool_empty(tmp_path / "spool"), "the spool to be empty")
    assert len(sink.messages) == 1  # the original never arrived


@pytest_twisted.ensureDeferred
async def test_null_mx_bounces_with_5_1_10(start_gateway, tmp_path, test_dns, sink):
    """A domain with a null MX (RFC 7505, MX 0 ".") accepts no mail: the
    sender gets a DSN with Status 5.1.10, and nothing connects anywhere for
    the message itself (the sink's only connection is the DSN's)."""
    test_dns.add("nomail.test", "MX", (0, "."))
    test_dns.add("sender.test", "MX", (10, "mx.sender.test"))
    test_dns.add("mx.sender.test", "A", "127.0.0.1")
    service = start_gateway(relay_config(tmp_path, test_dns, sink.port))
    before = sink.connections  # aiosmtpd's own start-up probe counts as one
    await in_thread(send, service.port_of("mx"), "a@sender.test", ["rcpt@nomail.test"],
                    b"Subject: to a null mx\r\n\r\nbody\r\n")
    [dsn] = await in_thread(sink.wait_for, 1)
    assert is_null_sender(dsn.sender) and dsn.recipients == ["a@sender.test"]
    _, [_, block], headers = parse_dsn(dsn.content)
    assert field_value(block, "Final-Recipient").replace(" ", "").lower() == "rfc822;rcpt@nomail.test"
    assert field_value(block, "Action") == "failed"
    assert field_value(block, "Status") == "5.1.10"
    assert b"Subject: to a null mx" in headers.get_payload(decode=True)
    await wait_until(lambda: spool_empty(tmp_path / "spool"), "the spool to be empty")
    assert len(sink.messages) == 1
    assert sink.connections - before == 1
    assert not [q for q in test_dns.queries if q[1] in ("A", "AAAA") and q[0].endswith("nomail.test")]


@pytest_twisted.ensureDeferred
async def test_partial_failure_bounces_only_the_failed_recipient(start_gateway, tmp_path, test_dns, sink):
    """One message to a good and a bad recipient (550 5.1.1 for bad): the
    good one gets the message exactly once, and the sender gets a DSN that
    reports only the bad recipient (one per-recipient block)."""
    test_dns.add("example.net", "MX", (10, "mx1.example.net"))
    test_dns.add("mx1.example.net", "A", "127.0.0.1")
    test_dns.add("sender.test", "MX", (10, "mx.sender.test"))
    test_dns.add("mx.sender.test", "A", "127.0.0.1")
    sink.handler.rcpt_replies = {"bad@example.net": ["550 5.1.1 no such user"]}
    service = start_gateway(relay_config(tmp_path, test_dns, sink.port))
    await in_thread(send, service.port_of("mx"), "a@sender.test", ["good@example.net", "bad@example.net"],
                    b"Subject: half good\r\n\r\nbody\r\n")
    await in_thread(sink.wait_for, 2)
    await wait_until(lambda: spool_empty(tmp_path / "spool"), "the spool to be empty")
    messages = list(sink.messages)
    delivered = [m for m in messages if m.sender == "a@sender.test"]
    assert [m.recipients for m in delivered] == [["good@example.net"]]
    [dsn] = bounces(messages)
    assert dsn.recipients == ["a@sender.test"]
    _, blocks, _ = parse_dsn(dsn.content)
    assert len(blocks) == 2  # per-message block + exactly one recipient
    assert field_value(blocks[1], "Final-Recipient").replace(" ", "").lower() == "rfc822;bad@example.net"
    assert field_value(blocks[1], "Status") == "5.1.1"
    assert len(messages) == 2


@pytest_twisted.ensureDeferred
async def test_connection_reuse(start_gateway, tmp_path, test_dns, sink):
    """With max_per_destination = 1 and connection_idle = 2 s, five
    messages for one domain sent in quick succession travel over one
    connection to the next hop, one transaction each.

    Why exactly one is expected: the single worker for the destination keeps
    its connection open for 2 s without work, and smtplib hands the five
    messages over in milliseconds, so a second connection would mean the
    connection was not reused."""
    test_dns.add("example.net", "MX", (10, "mx1.example.net"))
    test_dns.add("mx1.example.net", "A", "127.0.0.1")
    service = start_gateway(relay_config(tmp_path, test_dns, sink.port, max_per_destination=1,
                                         connection_idle=2))
    contents = [f"Subject: reuse {i}\r\n\r\nbody {i}\r\n".encode() for i in range(5)]
    before = sink.connections  # aiosmtpd's own start-up probe counts as one
    await in_thread(send_many, service.port_of("mx"), "a@example.org", ["rcpt@example.net"], contents)
    got = await in_thread(sink.wait_for, 5)
    assert len(got) == 5
    assert sorted(m.content.split(b"Subject: ")[1].split(b"\r\n")[0] for m in got) == \
        [f"reuse {i}".encode() for i in range(5)]
    await wait_until(lambda: spool_empty(tmp_path / "spool"), "the spool to be empty")
    assert sink.connections - before == 1


@pytest_twisted.ensureDeferred
async def test_smarthost_auth_over_starttls(start_gateway, tmp_path, test_dns, sinks):
    """With [relay] smarthost, smarthost_username/password and smarthost_tls
    = "encrypt", mail goes to the smarthost over STARTTLS and logs in there
    (the sink requires STARTTLS and only allows AUTH over TLS)."""
    smarthost = sinks(tls_context=self_signed_server_context(tmp_path), require_starttls=True,
                      users={"relayuser": "s3cret"})
    doc = relay_config(tmp_path, test_dns, 1, smarthost=f"[127.0.0.1]:{smarthost.port}",
                       smarthost_username="relayuser", smarthost_password="s3cret",
                       smarthost_tls="encrypt")
    service = start_gateway(doc)
    body = b"Subject: via smarthost\r\n\r\nbody\r\n"
    await in_thread(send, service.port_of("mx"), "a@example.org", ["rcpt@example.net"], body)
    [got] = await in_thread(smarthost.wait_for, 1)
    assert got.recipients == ["rcpt@example.net"] and got.content.endswith(body)
    assert got.tls
    assert smarthost.logins == ["relayuser"]
    await wait_until(lambda: spool_empty(tmp_path / "spool"), "the spool to be empty")
    assert test_dns.queries == []  # the smarthost is an address: no DNS at all


@pytest_twisted.ensureDeferred
async def test_smarthost_wrong_password_defers(start_gateway, tmp_path, test_dns, sinks):
    """A smarthost that refuses the login (535) defers the mail, never
    bounces it: the message waits in deferred/ with last_reply naming the
    535, and no message and no DSN arrives anywhere."""
    smarthost = sinks(tls_context=self_signed_server_context(tmp_path), require_starttls=True,
                      users={"relayuser": "s3cret"})
    doc = relay_config(tmp_path, test_dns, 1, smarthost=f"[127.0.0.1]:{smarthost.port}",
                       smarthost_username="relayuser", smarthost_password="wrong",
                       smarthost_tls="encrypt")
    service = start_gateway(doc)
    await in_thread(send, service.port_of("mx"), "a@example.org", ["rcpt@example.net"],
                    b"Subject: bad login\r\n\r\nbody\r\n")
    spool = tmp_path / "spool"

    def original_settled():
        """The original is deferred after an attempt, or gone from the spool."""
        mine = [e for state in STATES for e, _ in snapshot(spool, state) if e.sender == "a@example.org"]
        if not mine:
            return ["gone"]
        return [e for e in in_state_with(spool, "deferred", lambda e: e.sender == "a@example.org")
                if e.recipients[0].attempts >= 1]

    settled = await wait_until(original_settled, "the first attempt to be recorded")
    assert settled != ["gone"], "the message was removed from the spool instead of deferred"
    [envelope] = settled
    [recipient] = envelope.recipients
    assert recipient.status == "deferred"
    assert "535" in recipient.last_reply, recipient.last_reply
    assert smarthost.logins == []
    assert smarthost.messages == []
    # Only the original is in the spool: no bounce was queued.
    assert sum(len(snapshot(spool, s)) for s in STATES) == 1


def verify_route_config(tmp_path, test_dns, port, ca_path):
    doc = relay_config(tmp_path, test_dns, 1, ca_file=ca_path)
    # render_toml writes nested dicts as [routes.KEY] tables; the quotes keep
    # the dotted domain one key: [routes."secure.test"], which is TOML for
    # "secure.test" = { next_hop = ..., tls = "verify" }.
    doc["routes"] = {'"secure.test"': {"next_hop": f"[127.0.0.1]:{port}", "tls": "verify"}}
    return doc


@pytest_twisted.ensureDeferred
async def test_tls_verify_route_delivers_to_trusted_certificate(start_gateway, tmp_path, test_dns, sinks):
    """A route with tls = "verify" to a STARTTLS sink whose certificate is
    issued by the CA in [relay] ca_file for IP 127.0.0.1 delivers, over TLS."""
    ca_key, ca_cert, ca_path = make_ca(tmp_path / "pki")
    context = issue_leaf(ca_key, ca_cert, tmp_path / "pki", "good", dns_names=("localhost",),
                         ip_addresses=("127.0.0.1",))
    secure = sinks(tls_context=context, require_starttls=True)
    service = start_gateway(verify_route_config(tmp_path, test_dns, secure.port, ca_path))
    body = b"Subject: verified\r\n\r\nbody\r\n"
    await in_thread(send, service.port_of("mx"), "a@example.org", ["rcpt@secure.test"], body)
    [got] = await in_thread(secure.wait_for, 1)
    assert got.tls and got.recipients == ["rcpt@secure.test"] and got.content.endswith(body)
    await wait_until(lambda: spool_empty(tmp_path / "spool"), "the spool to be empty")


@pytest_twisted.ensureDeferred
async def test_tls_verify_route_refuses_wrong_name(start_gateway, tmp_path, test_dns, sinks):
    """A route with tls = "verify" to a sink whose certificate (from the
    trusted CA) names only other.test does not deliver: the message stays
    deferred with a TLS reason and nothing arrives."""
    ca_key, ca_cert, ca_path = make_ca(tmp_path / "pki")
    context = issue_leaf(ca_key, ca_cert, tmp_path / "pki", "other", dns_names=("other.test",))
    secure = sinks(tls_context=context, require_starttls=True)
    service = start_gateway(verify_route_config(tmp_path, test_dns, secure.port, ca_path))
    await in_thread(send, service.port_of("mx"), "a@example.org", ["rcpt@secure.test"],
                    b"Subject: not verified\r\n\r\nbody\r\n")
    spool = tmp_path / "spool"
    [envelope] = await wait_until(
        lambda: in_state_with(spool, "deferred", lambda e: e.recipients[0].attempts >= 1),
        "the message to be deferred")
    [recipient] = envelope.recipients
    assert recipient.status == "deferred"
    # 4.7.5: the handshake failed (the certificate does not name 127.0.0.1).
    assert recipient.last_reply.startswith("421 4.7.5 TLS handshake"), recipient.last_reply
    await task.deferLater(reactor, 0.3, lambda: None)
    assert secure.messages == []
    assert sum(len(snapshot(spool, s)) for s in STATES) == 1  # no bounce either


@pytest_twisted.ensureDeferred
async def test_stop_during_deliveries_loses_nothing(start_gateway, tmp_path, test_dns):
    """Stopping the service (what SIGTERM does) while deliveries are in
    flight loses no message: afterwards each of 20 messages is at the next
    hop or back in incoming/ or deferred/, none is left in active/, and a
    message is both delivered and still queued only if its last reply shows
    the connection was cut (the unavoidable duplicate of RFC 5321 §6.1)."""
    test_dns.add("example.net", "MX", (10, "mx1.example.net"))
    test_dns.add("mx1.example.net", "A", "127.0.0.1")
    sink = Sink()  # not started yet: the first attempts are refused
    sink.handler.data_delay = 1.0  # a slow next hop: each DATA takes a second
    doc = relay_config(tmp_path, test_dns, sink.port, shutdown_grace=0.3, max_per_destination=4)
    doc["queue"].update(retry_initial=2, retry_max=2)
    service = start_gateway(doc)
    spool = tmp_path / "spool"
    count = 20
    contents = [f"Subject: msg {i}\r\n\r\nbody {i}\r\n".encode() for i in range(count)]
    try:
        await in_thread(send_many, service.port_of("mx"), "a@example.org", ["rcpt@example.net"], contents)
        await wait_until(
            lambda: len(in_state_with(spool, "deferred", lambda e: e.attempts >= 1)) == count,
            "every message to be deferred once")
        sink.start()
        await in_thread(sink.wait_for, 1)
        at_stop = len(sink.messages)
        await service.stopService()
    finally:
        sink.stop()

    def subject(content: bytes) -> str:
        return email.message_from_bytes(content)["Subject"]

    assert snapshot(spool, "active") == []
    delivered = collections.Counter(subject(m.content) for m in sink.messages)
    waiting = {subject(content): envelope for state in ("incoming", "deferred")
               for envelope, content in snapshot(spool, state)}
    assert at_stop < count and len(delivered) < count, "the stop came too late to test anything"
    for i in range(count):
        name = f"msg {i}"
        assert delivered[name] + (name in waiting) >= 1, f"{name} was lost"
        assert delivered[name] <= 1, f"{name} was delivered {delivered[name]} times"
        if delivered[name] and name in waiting:
            [recipient] = waiting[name].recipients
            assert "lost connection" in (recipient.last_reply or ""), recipient.last_reply
    for envelope in waiting.values():
        assert [r.status for r in envelope.recipients] in (["pending"], ["deferred"])
