"""Acceptance tests of the spf plugin on real sockets.

The gateway runs in-process with the listener plugins
C{["relay_guard", "spf"]} and C{[dns] servers} pointed at a real
twisted.names test DNS server publishing C{v=spf1 ip4:127.0.0.5 -all} for
C{sender.test}.  The stdlib smtplib client binds its source address, so
the gateway sees the client as 127.0.0.5 (permitted) or 127.0.0.6 (not
permitted): the whole of Linux's 127.0.0.0/8 is local.
"""

from __future__ import annotations

import smtplib
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.dnsserver import TestDNS
from tests.support import base_config, in_thread, insecure_tls, queued

PERMITTED, FORBIDDEN = "127.0.0.5", "127.0.0.6"
MESSAGE = b"Subject: spf\r\n\r\nbody\r\n"


@pytest.fixture
def test_dns():
    """A test DNS server publishing the SPF policy of sender.test."""
    server = TestDNS(reactor)
    server.start()
    server.add("sender.test", "TXT", "v=spf1 ip4:127.0.0.5 -all")
    server.add("sender.test", "MX", (10, "mx.sender.test"))
    yield server
    pytest_twisted.blockon(server.stop())


def spf_config(tmp_path: Path, dns: TestDNS, **sections: Any) -> dict[str, Any]:
    """The base config with the spf plugin on the MX listener and the
    test DNS server (1 s per query)."""
    doc = base_config(tmp_path, dns={"servers": [dns.address], "timeout": 1}, **sections)
    doc["listener"][0]["plugins"] = ["relay_guard", "spf"]
    return doc


def connect(port: int, source: str) -> smtplib.SMTP:
    """An smtplib client whose connection comes from C{source}."""
    return smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0))


def send(port: int, source: str, sender: str = "alice@sender.test",
         helo: str = "client.example.org") -> tuple[int, bytes]:
    """MAIL FROM, RCPT and DATA from C{source}; the MAIL reply, or the
    DATA reply when MAIL was accepted (blocking; use in_thread)."""
    with connect(port, source) as smtp:
        smtp.ehlo(helo)
        code, text = smtp.mail(sender)
        if code != 250:
            return code, text
        smtp.rcpt("bob@example.test")
        return smtp.data(MESSAGE)


@pytest_twisted.ensureDeferred
async def test_permitted_client_is_queued_with_received_spf_pass(start_gateway, tmp_path, test_dns):
    """A client at an address the sender's policy permits gets its message
    queued, with "Received-SPF: pass" among the prepended header fields."""
    service = start_gateway(spf_config(tmp_path, test_dns))
    code, _ = await in_thread(send, service.port_of("mx"), PERMITTED)
    assert code == 250
    [(envelope, _)] = queued(tmp_path / "spool")
    [received_spf] = [h for h in envelope.prepend_headers if h.startswith("Received-SPF:")]
    assert received_spf.startswith("Received-SPF: pass (mx.example.test: domain of alice@sender.test designates")
    assert "client-ip=127.0.0.5;" in received_spf and "identity=mailfrom;" in received_spf
    assert ("sender.test", "TXT") in test_dns.queries


@pytest_twisted.ensureDeferred
async def test_forbidden_client_gets_550_5_7_23_and_nothing_is_queued(start_gateway, tmp_path, test_dns):
    """A client the policy does not permit ("-all") is refused at MAIL FROM
    with 550 5.7.23 and the explanation; nothing reaches the queue."""
    service = start_gateway(spf_config(tmp_path, test_dns))
    code, text = await in_thread(send, service.port_of("mx"), FORBIDDEN)
    assert code == 550
    assert text == b"5.7.23 SPF fail: sender.test does not designate 127.0.0.6 as a permitted sender"
    assert queued(tmp_path / "spool") == []


@pytest_twisted.ensureDeferred
async def test_dns_timeout_gives_451_4_7_24_within_the_resolver_timeout(start_gateway, tmp_path, test_dns):
    """When the DNS server never answers for the sender's domain the client
    gets 451 4.7.24 (temperror), after the 1 s resolver timeout rather than
    the 30 s plugin timeout."""
    test_dns.set_timeout("sender.test")
    service = start_gateway(spf_config(tmp_path, test_dns))
    started = reactor.seconds()
    code, text = await in_thread(send, service.port_of("mx"), PERMITTED, timeout=15)
    assert (code, text[:6]) == (451, b"4.7.24")
    assert b"sender.test" in text
    assert reactor.seconds() - started < 10
    assert queued(tmp_path / "spool") == []


@pytest_twisted.ensureDeferred
async def test_null_sender_is_checked_through_the_helo_name(start_gateway, tmp_path, test_dns):
    """For MAIL FROM:<> the HELO name is the identity (postmaster@helo):
    HELO sender.test from a forbidden address is refused with 5.7.23."""
    service = start_gateway(spf_config(tmp_path, test_dns))
    code, text = await in_thread(send, service.port_of("mx"), FORBIDDEN, "<>", "sender.test")
    assert (code, text[:6]) == (550, b"5.7.23")


@pytest_twisted.ensureDeferred
async def test_trusted_network_is_not_checked(start_gateway, tmp_path, test_dns):
    """A client in trusted_networks is not checked: its message from a
    forbidden address is queued without a Received-SPF field and without
    any SPF query."""
    doc = spf_config(tmp_path, test_dns, server={"trusted_networks": [f"{FORBIDDEN}/32"]})
    service = start_gateway(doc)
    code, _ = await in_thread(send, service.port_of("mx"), FORBIDDEN)
    assert code == 250
    [(envelope, _)] = queued(tmp_path / "spool")
    assert not [h for h in envelope.prepend_headers if h.startswith("Received-SPF:")]
    assert ("sender.test", "TXT") not in test_dns.queries


@pytest_twisted.ensureDeferred
async def test_authenticated_session_is_not_checked(start_gateway, tmp_path, test_dns):
    """An authenticated client (AUTH PLAIN after STARTTLS) from a forbidden
    address gets its message queued: SPF is not asked."""
    from gateway.credentials import UsersFile

    users_path = tmp_path / "users"
    UsersFile(str(users_path)).set("alice@sender.test", "secret", must_exist=False)
    doc = spf_config(tmp_path, test_dns, auth={"users_file": str(users_path)})
    doc["listener"][0]["auth"] = True
    service = start_gateway(doc)
    port = service.port_of("mx")

    def talk():
        with connect(port, FORBIDDEN) as smtp:
            smtp.ehlo("client.example.org")
            smtp.starttls(context=insecure_tls())
            smtp.ehlo("client.example.org")
            smtp.login("alice@sender.test", "secret")
            smtp.sendmail("alice@sender.test", ["bob@example.test"], MESSAGE)

    await in_thread(talk)
    [(envelope, _)] = queued(tmp_path / "spool")
    assert envelope.sender == "alice@sender.test"
    assert ("sender.test", "TXT") not in test_dns.queries
