"""Acceptance tests of the policy filters on real sockets: the access, helo,
dnsbl and content plugins in a running gateway on loopback, driven by the
stdlib smtplib from a thread, with DNS from the real twisted.names test
server (tests/dnsserver.py).

Every wait is bounded: client calls run in a thread with a reactor
timeout, sockets have a timeout, and the DNS resolver a short [dns]
timeout.
"""

from __future__ import annotations

import functools
import os
import smtplib
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.dnsserver import TestDNS, reverse_name
from tests.support import base_config, client, in_thread, queued

MESSAGE = b"From: a@example.org\r\nTo: b@example.test\r\nSubject: hello\r\n\r\nbody\r\n"


def gateway_with(start_gateway: Any, tmp_path: Path, plugins: dict[str, dict[str, Any]],
                 **sections: Any) -> int:
    """Start a gateway whose listener runs relay_guard and C{plugins} (in
    order) with their tables; return its port."""
    doc = base_config(tmp_path, **sections)
    doc["listener"][0]["plugins"] = ["relay_guard", *plugins]
    doc["plugins"] = {name: table for name, table in plugins.items() if table}
    return start_gateway(doc).port_of("mx")


@pytest.fixture
def test_dns():
    """A running test DNS server, stopped after the test."""
    server = TestDNS(reactor)
    server.start()
    yield server
    pytest_twisted.blockon(server.stop())


def transaction(port: int, *, helo: str = "client.example.org", sender: str = "a@example.org",
                rcpts: tuple[str, ...] = ("b@example.test",), message: bytes | None = MESSAGE) -> dict[str, Any]:
    """One SMTP session (blocking; run it with in_thread): the reply to
    each command, and to DATA when every recipient was accepted."""
    out: dict[str, Any] = {}
    with client(port) as smtp:
        out["helo"] = smtp.ehlo(helo)
        if out["helo"][0] != 250:
            return out
        out["mail"] = smtp.mail(sender)
        out["rcpt"] = [smtp.rcpt(r) for r in rcpts]
        if message is not None and any(code == 250 for code, _ in out["rcpt"]):
            out["data"] = smtp.data(message)
    return out


def session(port: int, **kwargs: Any) -> Any:
    """L{transaction} in a thread, bounded by the in_thread timeout."""
    return in_thread(functools.partial(transaction, port, **kwargs))


# -- access -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_access_client_network_is_rejected_at_rcpt(start_gateway, tmp_path):
    """A client network with REJECT is refused at RCPT (delay_reject) with
    550 5.7.1 and its text; nothing is queued."""
    port = gateway_with(start_gateway, tmp_path, {"access": {"client": ["127.0.0.0/8 REJECT Known spam source"]}})
    out = await session(port)
    assert out["mail"][0] == 250
    assert out["rcpt"] == [(550, b"5.7.1 Client host rejected: Known spam source")]
    assert queued(tmp_path / "spool") == []


@pytest_twisted.ensureDeferred
async def test_access_sender_recipient_and_dunno(start_gateway, tmp_path):
    """Sender rules refuse a domain except a DUNNO exemption; a recipient
    DEFER gives 451 4.7.1 while other recipients of the same message are
    queued."""
    port = gateway_with(start_gateway, tmp_path, {"access": {
        "sender": ["boss@spam.example DUNNO", "spam.example REJECT Spoofed sender"],
        "recipient": ["later@example.test DEFER"],
    }})
    refused = await session(port, sender="x@spam.example")
    assert refused["rcpt"] == [(550, b"5.7.1 <x@spam.example>: Sender address rejected: Spoofed sender")]
    out = await session(port, sender="boss@spam.example", rcpts=("later@example.test", "b@example.test"))
    assert out["rcpt"] == [(451, b"4.7.1 <later@example.test>: Recipient address rejected: Access temporarily denied"),
                           (250, b"2.1.5 Recipient ok")]
    assert out["data"][0] == 250
    [(envelope, _)] = queued(tmp_path / "spool")
    assert (envelope.sender, [r.address for r in envelope.recipients]) == ("boss@spam.example", ["b@example.test"])


@pytest_twisted.ensureDeferred
async def test_access_ok_never_opens_relay(start_gateway, tmp_path):
    """OK for the client and for a foreign recipient does not make the
    gateway an open relay: 554 5.7.1 Relay access denied."""
    port = gateway_with(start_gateway, tmp_path, {"access": {"client": ["127.0.0.1 OK"],
                                                             "recipient": ["elsewhere.example OK"]}})
    out = await session(port, rcpts=("x@elsewhere.example", "b@example.test"))
    assert out["rcpt"] == [(554, b"5.7.1 Relay access denied"), (250, b"2.1.5 Recipient ok")]


@pytest_twisted.ensureDeferred
async def test_access_file_is_reread_when_it_changes(start_gateway, tmp_path):
    """Rules from the file apply, and a rewrite of the file changes the
    reply without a restart."""
    rules = tmp_path / "access"
    rules.write_text("# type pattern action text\nsender spam.example REJECT From the file\n")
    port = gateway_with(start_gateway, tmp_path, {"access": {"file": str(rules), "check_interval": 0}})
    first = await session(port, sender="x@spam.example", message=None)
    assert first["rcpt"] == [(550, b"5.7.1 <x@spam.example>: Sender address rejected: From the file")]
    rules.write_text("sender spam.example DEFER Changed\n")
    info = rules.stat()
    os.utime(rules, ns=(info.st_atime_ns, info.st_mtime_ns + 10_000_000_000))
    second = await session(port, sender="x@spam.example", message=None)
    assert second["rcpt"] == [(451, b"4.7.1 <x@spam.example>: Sender address rejected: Changed")]


@pytest_twisted.ensureDeferred
async def test_access_reverse_name_at_connect(start_gateway, tmp_path, test_dns):
    """With delay_reject off, a client whose verified reverse name is
    listed gets the rejection instead of the greeting; a client name that
    is not listed gets through."""
    test_dns.add(reverse_name("127.0.0.1"), "PTR", "host.bad.example")
    test_dns.add("host.bad.example", "A", "127.0.0.1")
    port = gateway_with(start_gateway, tmp_path,
                        {"access": {"delay_reject": False, "client": ["bad.example REJECT Go away"]}},
                        dns={"servers": [test_dns.address], "timeout": 2, "reverse_lookup": True})

    def connect():
        try:
            client(port).quit()
        except smtplib.SMTPConnectError as exc:
            return exc.smtp_code, exc.smtp_error
        return None

    assert await in_thread(connect) == (550, b"5.7.1 Client host rejected: Go away")
    test_dns.remove(reverse_name("127.0.0.1"))
    test_dns.add(reverse_name("127.0.0.1"), "PTR", "host.good.example")
    test_dns.add("host.good.example", "A", "127.0.0.1")
    assert await in_thread(connect) is None


# -- helo ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_helo_checks_at_helo(start_gateway, tmp_path):
    """With delay_reject off: an invalid name is 501 5.5.2, a single label
    504 5.5.2 (require_fqdn), our hostname and the listener's address
    550 5.7.1; a proper name is greeted and its mail queued."""
    port = gateway_with(start_gateway, tmp_path, {"helo": {"delay_reject": False, "require_fqdn": True}})

    def talk():
        with client(port) as smtp:
            replies = [smtp.ehlo(name)[0] for name in ("my_pc", "localhost", "MX.example.test", "[127.0.0.1]")]
            replies.append(smtp.ehlo("client.example.org")[0])
            smtp.sendmail("a@example.org", ["b@example.test"], MESSAGE)
            return replies

    assert await in_thread(talk) == [501, 504, 550, 550, 250]
    [(envelope, _)] = queued(tmp_path / "spool")
    assert envelope.helo == "client.example.org"


@pytest_twisted.ensureDeferred
async def test_helo_default_answers_at_rcpt(start_gateway, tmp_path):
    """By default (delay_reject) a client claiming our name is greeted and
    refused at RCPT with the reason."""
    port = gateway_with(start_gateway, tmp_path, {"helo": {}})
    out = await session(port, helo="mx.example.test")
    assert out["helo"][0] == 250
    assert out["rcpt"] == [(550, b"5.7.1 <mx.example.test>: Helo command rejected: that is my own name, not yours")]


@pytest_twisted.ensureDeferred
async def test_helo_trusted_client_is_exempt(start_gateway, tmp_path):
    """A client in trusted_networks may use any HELO name."""
    port = gateway_with(start_gateway, tmp_path, {"helo": {"delay_reject": False}},
                        server={"trusted_networks": ["127.0.0.0/8"]})
    out = await session(port, helo="mx.example.test")
    assert out["data"][0] == 250


# -- dnsbl ------------------------------------------------------------------------------------


def dns_section(test_dns: TestDNS) -> dict[str, Any]:
    """[dns] pointing at the test server with a short timeout."""
    return {"servers": [test_dns.address], "timeout": 0.5}


@pytest_twisted.ensureDeferred
async def test_dnsbl_listed_client_is_refused_at_rcpt(start_gateway, tmp_path, test_dns):
    """A client listed in a zone (with a matching return code) gets 554
    5.7.1 naming itself and the list at every RCPT; nothing is queued."""
    test_dns.add("1.0.0.127.bl.test", "A", "127.0.0.2")
    port = gateway_with(start_gateway, tmp_path, {"dnsbl": {"sites": ["bl.test=127.0.0.[2..11]"]}},
                        dns=dns_section(test_dns))
    out = await session(port, rcpts=("b@example.test", "c@example.test"))
    reply = (554, b"5.7.1 Service unavailable; client [127.0.0.1] blocked using bl.test")
    assert out["rcpt"] == [reply, reply]
    assert queued(tmp_path / "spool") == []


@pytest_twisted.ensureDeferred
async def test_dnsbl_unlisted_and_allowlisted_clients_pass(start_gateway, tmp_path, test_dns):
    """A client not listed, or listed but outweighed by an allow list, has
    its mail queued."""
    test_dns.add("1.0.0.127.bl.test", "A", "127.0.0.2")
    test_dns.add("1.0.0.127.wl.test", "A", "127.0.10.2")
    port = gateway_with(start_gateway, tmp_path, {"dnsbl": {
        "sites": ["clean.test", "bl.test*2", "wl.test=127.0.[0..255].[2;3]*-5"], "threshold": 2}},
        dns=dns_section(test_dns))
    out = await session(port)
    assert out["data"][0] == 250
    assert len(queued(tmp_path / "spool")) == 1


@pytest_twisted.ensureDeferred
async def test_dnsbl_timing_out_list_never_blocks_mail(start_gateway, tmp_path, test_dns):
    """A zone that never answers counts as not listed: the mail is queued,
    within the short [dns] timeout, well before the plugin timeout."""
    test_dns.set_timeout("1.0.0.127.slow.test")
    port = gateway_with(start_gateway, tmp_path, {"dnsbl": {"sites": ["slow.test"]}}, dns=dns_section(test_dns))
    started = time.monotonic()
    out = await session(port)
    assert out["rcpt"] == [(250, b"2.1.5 Recipient ok")]
    assert out["data"][0] == 250
    assert time.monotonic() - started < 10
    assert ("1.0.0.127.slow.test", "A") in test_dns.queries


@pytest_twisted.ensureDeferred
async def test_dnsbl_connect_stage_refuses_the_greeting(start_gateway, tmp_path, test_dns):
    """With stage = "connect" a listed client gets 554 instead of 220."""
    test_dns.add("1.0.0.127.bl.test", "A", "127.0.0.2")
    port = gateway_with(start_gateway, tmp_path, {"dnsbl": {"sites": ["bl.test"], "stage": "connect"}},
                        dns=dns_section(test_dns))

    def connect():
        with pytest.raises(smtplib.SMTPConnectError) as caught:
            client(port)
        return caught.value.smtp_code, caught.value.smtp_error

    assert await in_thread(connect) == (554, b"5.7.1 Service unavailable; client [127.0.0.1] blocked using bl.test")


# -- content ------------------------------------------------------------------------------------


def with_attachment(filename: str, maintype: str = "application", subtype: str = "octet-stream") -> bytes:
    message = EmailMessage()
    message["From"] = "a@example.org"
    message["To"] = "b@example.test"
    message["Subject"] = "files"
    message.set_content("see attached")
    message.add_attachment(b"MZ\x90\x00" * 100, maintype=maintype, subtype=subtype, filename=filename)
    return message.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@pytest_twisted.ensureDeferred
async def test_content_header_rules_on_the_wire(start_gateway, tmp_path):
    """A REJECT rule refuses the message after the final dot; TAG and
    HOLD rules let it through with their header fields prepended."""
    port = gateway_with(start_gateway, tmp_path, {"content": {"header_rules": [
        r"/^Subject:.*\bviagra\b/ REJECT Looks like spam",
        "/^X-Mailer: MassMailer/ TAG X-Spam-Flag: YES",
        "/^From:.*@partner\\.example/ HOLD partner mail is reviewed",
    ]}})
    spam = b"From: a@example.org\r\nSubject: cheap VIAGRA\r\n\r\nbody\r\n"
    out = await session(port, message=spam)
    assert out["data"] == (550, b"5.7.1 Looks like spam")
    tagged = b"From: p@partner.example\r\nX-Mailer: MassMailer 2\r\nSubject: news\r\n\r\nbody\r\n"
    out = await session(port, message=tagged)
    assert out["data"][0] == 250
    [(envelope, _)] = queued(tmp_path / "spool")
    assert "X-Spam-Flag: YES" in envelope.prepend_headers
    assert "X-Hold-Reason: partner mail is reviewed" in envelope.prepend_headers


@pytest_twisted.ensureDeferred
async def test_content_dangerous_attachment_is_refused(start_gateway, tmp_path):
    """An .exe attachment is refused with 550 5.7.1 naming it; a PDF is queued."""
    port = gateway_with(start_gateway, tmp_path, {"content": {}})
    out = await session(port, message=with_attachment("invoice.pdf.exe"))
    assert out["data"] == (550, b'5.7.1 Message rejected: attachment "invoice.pdf.exe" is not allowed '
                                b'(.exe files are blocked)')
    out = await session(port, message=with_attachment("report.pdf", "application", "pdf"))
    assert out["data"][0] == 250
    assert len(queued(tmp_path / "spool")) == 1


@pytest_twisted.ensureDeferred
async def test_content_header_limits(start_gateway, tmp_path):
    """Too many header fields is 552 5.3.4."""
    port = gateway_with(start_gateway, tmp_path, {"content": {"max_headers": 20}})
    crowded = b"".join(b"X-N: %d\r\n" % i for i in range(25)) + b"\r\nbody\r\n"
    out = await session(port, message=crowded)
    assert out["data"] == (552, b"5.3.4 Message header has too many fields (limit 20)")


# -- the trust contract the filters rely on ------------------------------------------

TRUST_PROBE = '''
"""{name}: refuses MAIL unless session.trusted is set (test probe)."""

from twisted.plugin import IPlugin
from zope.interface import implementer, provider

from gateway.interfaces import IMailCheck, IPluginFactory
from gateway.verdict import CONTINUE, reject


@implementer(IMailCheck)
class Probe:
    def check_mail(self, session, transaction, sender):
        return CONTINUE if session.trusted else reject(550, "5.7.1", "session.trusted is False")


@provider(IPlugin, IPluginFactory)
class factory:
    name = "{name}"
    options_type = None
    description = "test probe"

    @staticmethod
    def build(options, context):
        return Probe()
'''


@pytest_twisted.ensureDeferred
async def test_session_trusted_is_set_for_trusted_networks(start_gateway, tmp_path):
    """Session.trusted is documented as "the client is in
    trusted_networks" (gateway/session.py, docs/plugins.md), so a plugin
    may rely on it: a client from a trusted network arrives with
    session.trusted true.  (Found unset while writing these filters;
    fixed in d28fe3e; kept as a regression test.)"""
    import uuid

    name = "trust_probe_" + uuid.uuid4().hex[:8]
    folder = tmp_path / "probes"
    folder.mkdir()
    (folder / f"{name}.py").write_text(TRUST_PROBE.format(name=name))
    doc = base_config(tmp_path, server={"plugin_dirs": [str(folder)], "trusted_networks": ["127.0.0.0/8"]})
    doc["listener"][0]["plugins"] = ["relay_guard", name]
    port = start_gateway(doc).port_of("mx")
    out = await session(port, message=None)
    assert out["mail"] == (250, b"2.1.0 Sender ok")
