"""Acceptance tests of the relay side: the gateway receives with smtplib
and delivers, by a real test DNS server's MX records or by routes, to a
real SMTP sink (aiosmtpd) on loopback."""

from __future__ import annotations

import email
import email.policy

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.dnsserver import TestDNS
from tests.sink import Sink
from tests.support import base_config, client, in_thread, queued


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


def relay_config(tmp_path, dns, sink_port, **relay):
    doc = base_config(tmp_path, server={"trusted_networks": ["127.0.0.0/8"]})
    doc["dns"] = {"servers": [dns.address], "timeout": 2}
    doc["relay"] = {"enabled": True, "port": sink_port, "tls": "none", "connection_idle": 0.2, **relay}
    doc["queue"]["scan_interval"] = 0.2
    return doc


def send(port, sender, recipients, content):
    with client(port) as smtp:
        return smtp.sendmail(sender, recipients, content)


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
