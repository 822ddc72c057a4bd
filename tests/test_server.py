"""Protocol units for L{gateway.server}: a real L{GatewaySMTP} built by
L{GatewaySMTPFactory}, with a real pipeline (relay_guard built by its own
factory, plus fakes), a real spool in tmp_path committed synchronously, a
L{Clock} and a L{StringTransport}.  Replies are compared byte for byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from zope.interface import implementer

import plugins.relay_guard
from gateway.config import GatewayConfig, parse_config
from gateway.interfaces import IMailCheck, IRcptCheck
from gateway.pipeline import Pipeline, PluginSlot
from gateway.queue import Spool
from gateway.registry import PluginContext
from gateway.server import ConnectionLimiter, GatewaySMTP, GatewaySMTPFactory
from gateway.verdict import CONTINUE, cont, reject
from tests.support import queued

HOST = "mx.example.test"
PEER = "192.0.2.1"
MAX_SIZE = 4000
GREETING = b"220 mx.example.test ESMTP mailgateway\r\n"
EHLO_REPLY = (
    b"250-mx.example.test Hello client.example [192.0.2.1]\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 4000\r\n"
    b"250-8BITMIME\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250 SMTPUTF8\r\n"
)
SENDER_OK = b"250 2.1.0 Sender ok\r\n"
RCPT_OK = b"250 2.1.5 Recipient ok\r\n"
START_DATA = b"354 End data with <CR><LF>.<CR><LF>\r\n"
QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as ([0-9A-V]{16})\r\n")
ENVELOPE = b"MAIL FROM:<alice@client.example>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
MESSAGE = b"Subject: test\r\n\r\nHello.\r\n"


def run_now(f, *args):
    """A synchronous run_in_thread."""
    return defer.maybeDeferred(f, *args)


# -- harness ------------------------------------------------------------------


@dataclass
class Client:
    """One connection: the protocol, its transport and what it was sent."""

    protocol: GatewaySMTP
    transport: StringTransport

    def send(self, data: bytes) -> bytes:
        """Deliver C{data} and return what the server wrote in response."""
        self.transport.clear()
        self.protocol.dataReceived(data)
        return self.output()

    def output(self) -> bytes:
        """What the server wrote since the last send (and clear it)."""
        value = self.transport.value()
        self.transport.clear()
        return value


@dataclass
class Gateway:
    """A factory with its config, clock and spool."""

    config: GatewayConfig
    factory: GatewaySMTPFactory
    clock: Clock
    spool_path: Path

    def connect(self, peer: str = PEER) -> Client:
        transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 1234))
        protocol = self.factory.buildProtocol(transport.getPeer())
        protocol.makeConnection(transport)
        return Client(protocol, transport)

    def files(self, state: str) -> list[str]:
        return sorted(p.name for p in (self.spool_path / state).iterdir())

    def nothing_stored(self) -> bool:
        return not (self.files("tmp") or self.files("data") or self.files("incoming"))


class HeldRunner:
    """A run_in_thread that holds every call until the test runs it, so a
    commit can be caught half way."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple, defer.Deferred]] = []

    def __call__(self, f, *args) -> defer.Deferred:
        d = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def run_all(self) -> None:
        while self.calls:
            f, args, d = self.calls.pop(0)
            d.callback(f(*args))


def make_gateway(tmp_path: Path, *, server: dict | None = None, limits: dict | None = None,
                 listener: dict | None = None, extra: tuple = (), limiter: ConnectionLimiter | None = None,
                 tls_context: Any = None, run_in_thread: Any = run_now) -> Gateway:
    """A gateway for one listener; C{extra} (name, object) or PluginSlot
    come after relay_guard."""
    document = {
        "server": {"hostname": HOST, "local_domains": ["example.test"],
                   "max_message_size": MAX_SIZE, **(server or {})},
        "listener": [{"name": "mx", "port": 25, **(listener or {})}],
        "queue": {"path": str(tmp_path / "spool")},
        "limits": dict(limits or {}),
    }
    config = parse_config(document, str(tmp_path / "gateway.toml"))
    clock = Clock()
    context = PluginContext("relay_guard", clock, None, config, run_now)
    guard = plugins.relay_guard.factory.build(None, context)
    slots = [PluginSlot("relay_guard", guard, timeout=config.limits.plugin_timeout)]
    for item in extra:
        slots.append(item if isinstance(item, PluginSlot)
                     else PluginSlot(item[0], item[1], timeout=config.limits.plugin_timeout))
    pipeline = Pipeline("mx", slots, clock, config.server.soft_bounce)
    spool = Spool(config.queue.path, run_in_thread=run_in_thread, clock=clock)
    if limiter is None:
        limiter = ConnectionLimiter(config.limits.max_connections, config.limits.max_connections_per_ip)
    factory = GatewaySMTPFactory(config.listeners[0], config, pipeline, spool, clock, limiter,
                                 tls_context=tls_context)
    return Gateway(config, factory, clock, Path(config.queue.path))


@pytest.fixture
def gateway(tmp_path):
    return make_gateway(tmp_path)


@pytest.fixture
def client(gateway):
    """A connected client that has been greeted."""
    c = gateway.connect()
    assert c.output() == GREETING
    return c


@pytest.fixture
def ehlo(client):
    """A connected client after EHLO."""
    assert client.send(b"EHLO client.example\r\n") == EHLO_REPLY
    return client


@implementer(IMailCheck)
class HeldMail:
    """A MAIL check whose verdicts the test gives by firing Deferreds."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred] = []

    def check_mail(self, session, transaction, sender):
        d = defer.Deferred()
        self.pending.append(d)
        return d


@implementer(IRcptCheck)
class FlakyRcpt:
    """A RCPT check that raises the first time and says CONTINUE after."""

    def __init__(self) -> None:
        self.calls = 0

    def check_rcpt(self, session, transaction, recipient):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("plugin bug")
        return CONTINUE


# -- greeting, EHLO, HELO -------------------------------------------------------


def test_greeting(gateway):
    """On connect the server greets with 220, its host name and ESMTP."""
    c = gateway.connect()
    assert c.transport.value() == GREETING


def test_ehlo_keywords(client):
    """EHLO answers with the greeting line and the extension keywords."""
    assert client.send(b"EHLO client.example\r\n") == EHLO_REPLY


def test_ehlo_advertises_starttls_with_context(tmp_path):
    """With a TLS context on a starttls listener, EHLO adds STARTTLS."""
    gw = make_gateway(tmp_path, listener={"tls": "starttls"}, tls_context=object())
    c = gw.connect()
    c.output()
    assert c.send(b"EHLO client.example\r\n") == EHLO_REPLY.replace(
        b"250 SMTPUTF8\r\n", b"250-SMTPUTF8\r\n250 STARTTLS\r\n")


def test_starttls_required_refuses_mail_in_plaintext(tmp_path):
    """On a starttls-required listener MAIL before STARTTLS gets 530 5.7.0."""
    gw = make_gateway(tmp_path, listener={"tls": "starttls-required"}, tls_context=object())
    c = gw.connect()
    c.send(b"EHLO client.example\r\n")
    assert c.send(b"MAIL FROM:<a@client.example>\r\n") == b"530 5.7.0 Must issue a STARTTLS command first\r\n"


def test_helo(client):
    """HELO answers with one 250 line and no extensions."""
    assert client.send(b"HELO client.example\r\n") == b"250 mx.example.test Hello client.example [192.0.2.1]\r\n"


def test_lower_case_commands(client):
    """Command verbs are case-insensitive."""
    assert client.send(b"ehlo client.example\r\n") == EHLO_REPLY
    assert client.send(b"mail from:<a@client.example>\r\n") == SENDER_OK


@pytest.mark.parametrize("command", [b"EHLO", b"EHLO \r", b"HELO a b"])
def test_hello_without_name(client, command):
    """EHLO/HELO without exactly one name argument gets 501 5.5.4."""
    reply = client.send(command + b"\r\n")
    assert re.fullmatch(rb"501 5\.5\.4 Syntax: (EHLO|HELO) hostname\r\n", reply)


def test_ehlo_name_with_bare_cr_not_echoed(client):
    """A HELO/EHLO name with a bare CR or other control characters is
    refused (501) or cleaned; it never puts a bare CR into a reply."""
    out = client.send(b"EHLO evil\rinjected\r\n")
    assert b"\r" not in out.replace(b"\r\n", b"")


@pytest.mark.parametrize("command, reply", [
    (b"MAIL FROM:<a@client.example>", b"503 5.5.1 Send HELO/EHLO first\r\n"),
    (b"RCPT TO:<bob@example.test>", b"503 5.5.1 Need MAIL command\r\n"),
    (b"DATA", b"503 5.5.1 Need MAIL command\r\n"),
])
def test_commands_before_ehlo(client, command, reply):
    """Transaction commands before EHLO/HELO get 503 5.5.1."""
    assert client.send(command + b"\r\n") == reply


def test_rcpt_and_data_out_of_sequence(ehlo):
    """RCPT without MAIL, DATA without RCPT and a nested MAIL get 503 5.5.1."""
    assert ehlo.send(b"RCPT TO:<bob@example.test>\r\n") == b"503 5.5.1 Need MAIL command\r\n"
    assert ehlo.send(b"MAIL FROM:<a@client.example>\r\n") == SENDER_OK
    assert ehlo.send(b"DATA\r\n") == b"503 5.5.1 Need RCPT command\r\n"
    assert ehlo.send(b"MAIL FROM:<a@client.example>\r\n") == b"503 5.5.1 Nested MAIL command\r\n"


# -- a whole transaction ----------------------------------------------------------


def test_transaction_queues_message(gateway, ehlo):
    """MAIL, RCPT, DATA and the content give 250 2.0.0 queued as ID, and
    the spool holds exactly the content plus an envelope."""
    assert ehlo.send(b"MAIL FROM:<alice@client.example>\r\n") == SENDER_OK
    assert ehlo.send(b"RCPT TO:<bob@example.test>\r\n") == RCPT_OK
    assert ehlo.send(b"DATA\r\n") == START_DATA
    reply = ehlo.send(MESSAGE + b".\r\n")
    match = QUEUED.fullmatch(reply)
    assert match, reply
    queue_id = match.group(1).decode()
    [(envelope, content)] = queued(gateway.spool_path)
    assert envelope.queue_id == queue_id
    assert content == MESSAGE
    assert envelope.sender == "alice@client.example"
    assert [r.address for r in envelope.recipients] == ["bob@example.test"]
    assert envelope.helo == "client.example"
    assert envelope.client_address == PEER
    assert envelope.listener == "mx"
    assert envelope.protocol == "ESMTP"
    assert envelope.size == len(MESSAGE)
    received = envelope.prepend_headers[0]
    assert received.startswith(
        "Received: from client.example (unknown [192.0.2.1])\r\n"
        "\tby mx.example.test (mailgateway)\r\n"
        f"\twith ESMTP id {queue_id}\r\n"
        "\tfor <bob@example.test>; ")
    assert gateway.files("tmp") == []


def test_content_is_dot_unstuffed(gateway, ehlo):
    """A leading dot added for transparency is removed before storing."""
    ehlo.send(ENVELOPE)
    assert QUEUED.fullmatch(ehlo.send(b"Subject: x\r\n\r\n..dot\r\n.\r\n"))
    [(_, content)] = queued(gateway.spool_path)
    assert content == b"Subject: x\r\n\r\n.dot\r\n"


def test_content_split_over_many_chunks(gateway, ehlo):
    """Content and terminator arriving one octet at a time still queue
    exactly one message."""
    ehlo.send(ENVELOPE)
    out = b"".join(ehlo.send(bytes([octet])) for octet in MESSAGE + b".\r\n")
    assert QUEUED.fullmatch(out)
    [(_, content)] = queued(gateway.spool_path)
    assert content == MESSAGE


def test_two_transactions_on_one_connection(gateway, ehlo):
    """After a queued message the transaction is reset and a new one works."""
    ehlo.send(ENVELOPE)
    assert QUEUED.fullmatch(ehlo.send(MESSAGE + b".\r\n"))
    assert ehlo.send(b"RCPT TO:<bob@example.test>\r\n") == b"503 5.5.1 Need MAIL command\r\n"
    ehlo.send(ENVELOPE)
    assert QUEUED.fullmatch(ehlo.send(b"Subject: second\r\n\r\nx\r\n.\r\n"))
    assert len(queued(gateway.spool_path)) == 2


def test_pipelined_commands_in_one_packet(gateway, client):
    """Pipelined commands in one dataReceived are answered in order."""
    out = client.send(b"EHLO client.example\r\n" + ENVELOPE + MESSAGE + b".\r\n"
                      + b"NOOP\r\nMAIL FROM:<>\r\nRCPT TO:<x@other.example>\r\nRSET\r\nQUIT\r\n")
    match = re.fullmatch(
        re.escape(EHLO_REPLY + SENDER_OK + RCPT_OK + START_DATA) + QUEUED.pattern
        + re.escape(b"250 2.0.0 Ok\r\n" + SENDER_OK + b"554 5.7.1 Relay access denied\r\n"
                    b"250 2.0.0 Reset ok\r\n221 2.0.0 Bye\r\n"), out)
    assert match, out
    assert client.transport.disconnecting
    assert len(queued(gateway.spool_path)) == 1


def test_relay_denied_for_foreign_domain(ehlo):
    """A recipient outside the local domains from an untrusted client gets
    554 5.7.1."""
    ehlo.send(b"MAIL FROM:<a@client.example>\r\n")
    assert ehlo.send(b"RCPT TO:<x@other.example>\r\n") == b"554 5.7.1 Relay access denied\r\n"


def test_relay_permitted_for_trusted_network(tmp_path):
    """A client in trusted_networks may relay to any domain."""
    gw = make_gateway(tmp_path, server={"trusted_networks": ["192.0.2.0/24"]})
    c = gw.connect()
    c.send(b"EHLO client.example\r\nMAIL FROM:<a@client.example>\r\n")
    assert c.send(b"RCPT TO:<x@other.example>\r\n") == RCPT_OK


# -- plugins that wait, buffering and pausing --------------------------------------


def test_pending_plugin_holds_later_replies_and_pauses(tmp_path):
    """While a plugin's verdict is pending, later commands are only
    buffered (no reply); past [limits] input_buffer the transport is
    paused; when the verdict comes, every reply follows in order and the
    transport produces again."""
    held = HeldMail()
    gw = make_gateway(tmp_path, limits={"input_buffer": 64}, extra=(("held", held),))
    c = gw.connect()
    c.send(b"EHLO client.example\r\n")
    assert c.send(b"MAIL FROM:<a@client.example>\r\n") == b""
    assert len(held.pending) == 1
    assert c.send(b"RCPT TO:<bob@example.test>\r\n") == b""
    assert c.transport.producerState == "producing"
    assert c.send(b"NOOP\r\n" * 10) == b""
    assert c.transport.producerState == "paused"
    held.pending[0].callback(CONTINUE)
    assert c.output() == SENDER_OK + RCPT_OK + b"250 2.0.0 Ok\r\n" * 10
    assert c.transport.producerState == "producing"


def test_pending_rejection_applies_to_pipelined_commands(tmp_path):
    """A MAIL rejected after a wait makes the pipelined RCPT fail with 503,
    in order."""
    held = HeldMail()
    gw = make_gateway(tmp_path, extra=(("held", held),))
    c = gw.connect()
    c.send(b"EHLO client.example\r\n")
    assert c.send(b"MAIL FROM:<a@client.example>\r\nRCPT TO:<bob@example.test>\r\nNOOP\r\n") == b""
    held.pending[0].callback(reject(550, "5.7.1", "Sender refused"))
    assert c.output() == (b"550 5.7.1 Sender refused\r\n"
                          b"503 5.5.1 Need MAIL command\r\n"
                          b"250 2.0.0 Ok\r\n")


def test_plugin_timeout_gives_451_445_and_connection_goes_on(tmp_path):
    """A plugin that never answers gets 451 4.4.5 after its timeout (on the
    clock), then buffered commands are answered; a late verdict is
    ignored."""
    held = HeldMail()
    gw = make_gateway(tmp_path, extra=(PluginSlot("held", held, timeout=10.0),))
    c = gw.connect()
    c.send(b"EHLO client.example\r\n")
    with capturedLogs():
        c.send(b"MAIL FROM:<a@client.example>\r\nNOOP\r\n")
        gw.clock.advance(9.9)
        assert c.output() == b""
        gw.clock.advance(0.1)
        assert c.output() == (b"451 4.4.5 Temporary local problem (check timed out), please try again later\r\n"
                              b"250 2.0.0 Ok\r\n")
        held.pending[0].callback(CONTINUE)
    assert c.output() == b""
    assert c.send(b"RCPT TO:<bob@example.test>\r\n") == b"503 5.5.1 Need MAIL command\r\n"


def test_plugin_raising_in_rcpt_gives_451_430_then_rset_works(tmp_path):
    """A plugin raising in check_rcpt answers 451 4.3.0, is logged, and the
    connection stays usable: RSET and a new transaction work."""
    flaky = FlakyRcpt()
    gw = make_gateway(tmp_path, extra=(("flaky", flaky),))
    c = gw.connect()
    c.send(b"EHLO client.example\r\nMAIL FROM:<a@client.example>\r\n")
    with capturedLogs() as events:
        assert c.send(b"RCPT TO:<bob@example.test>\r\n") == (
            b"451 4.3.0 Temporary local problem, please try again later\r\n")
    assert [e["log_failure"].type for e in events if "log_failure" in e] == [RuntimeError]
    assert c.send(b"RSET\r\n") == b"250 2.0.0 Reset ok\r\n"
    c.send(ENVELOPE)
    assert QUEUED.fullmatch(c.send(MESSAGE + b".\r\n"))
    assert not c.transport.disconnecting


def test_reply_waits_for_durable_commit(tmp_path):
    """The 250 is sent only once the commit has run, and a command
    pipelined behind the final dot is answered after it."""
    runner = HeldRunner()
    gw = make_gateway(tmp_path, run_in_thread=runner)
    c = gw.connect()
    c.send(b"EHLO client.example\r\n" + ENVELOPE)
    assert c.send(MESSAGE + b".\r\nNOOP\r\n") == b""
    assert runner.calls
    assert gw.files("incoming") == []
    runner.run_all()
    out = c.output()
    assert re.fullmatch(QUEUED.pattern + re.escape(b"250 2.0.0 Ok\r\n"), out), out
    assert len(queued(gw.spool_path)) == 1


def test_plugin_headers_reach_the_envelope(tmp_path):
    """Header fields added by plugins are prepended after Received:, in
    order."""
    @implementer(IMailCheck, IRcptCheck)
    class Tagger:
        def check_mail(self, session, transaction, sender):
            return cont((("X-Mail-Check", "pass"),))

        def check_rcpt(self, session, transaction, recipient):
            return cont((("X-Rcpt-Check", recipient.address),))

    gw = make_gateway(tmp_path, extra=(("tagger", Tagger()),))
    c = gw.connect()
    c.send(b"EHLO client.example\r\n" + ENVELOPE)
    assert QUEUED.fullmatch(c.send(MESSAGE + b".\r\n"))
    [(envelope, content)] = queued(gw.spool_path)
    assert envelope.prepend_headers[0].startswith("Received: ")
    assert envelope.prepend_headers[1] == "Authentication-Results: mx.example.test; none"
    assert envelope.prepend_headers[2:] == ["X-Mail-Check: pass", "X-Rcpt-Check: bob@example.test"]
    assert content == MESSAGE


# -- timeouts ---------------------------------------------------------------------


@pytest.fixture
def timed(tmp_path):
    return make_gateway(tmp_path, limits={"command_timeout": 300, "data_timeout": 60})


def test_command_timeout(timed):
    """Idle for command_timeout between commands: 421 4.4.2 and close."""
    c = timed.connect()
    c.send(b"EHLO client.example\r\n")
    timed.clock.advance(299.9)
    assert c.output() == b""
    assert not c.transport.disconnecting
    timed.clock.advance(0.1)
    assert c.output() == b"421 4.4.2 Timeout exceeded, closing connection\r\n"
    assert c.transport.disconnecting


def test_command_timeout_before_ehlo(timed):
    """The command timeout also runs right after the greeting."""
    c = timed.connect()
    timed.clock.advance(300)
    assert c.transport.value().endswith(b"421 4.4.2 Timeout exceeded, closing connection\r\n")
    assert c.transport.disconnecting


def test_input_restarts_idle_timer(timed):
    """Each input restarts the timer."""
    c = timed.connect()
    timed.clock.advance(299)
    c.send(b"NOOP\r\n")
    timed.clock.advance(299)
    assert not c.transport.disconnecting
    timed.clock.advance(1)
    assert c.transport.disconnecting


def test_data_timeout(timed):
    """Inside DATA the (shorter) data_timeout applies."""
    c = timed.connect()
    c.send(b"EHLO client.example\r\n" + ENVELOPE + b"Subject: partial\r\n")
    timed.clock.advance(59.9)
    assert c.output() == b""
    timed.clock.advance(0.1)
    assert c.output() == b"421 4.4.2 Timeout exceeded, closing connection\r\n"
    assert c.transport.disconnecting
    c.protocol.connectionLost(None)
    assert timed.nothing_stored()


def test_command_timeout_again_after_data(timed):
    """After the end of DATA the command timeout applies again."""
    c = timed.connect()
    c.send(b"EHLO client.example\r\n" + ENVELOPE + MESSAGE + b".\r\n")
    timed.clock.advance(60)
    assert not c.transport.disconnecting
    timed.clock.advance(240)
    assert c.output() == b"421 4.4.2 Timeout exceeded, closing connection\r\n"


def test_quit_stops_the_timer(timed):
    """After QUIT no timer is left to fire."""
    c = timed.connect()
    assert c.send(b"QUIT\r\n") == b"221 2.0.0 Bye\r\n"
    assert c.transport.disconnecting
    assert timed.clock.getDelayedCalls() == []


# -- errors and limits ------------------------------------------------------------


def test_too_many_bad_commands(tmp_path):
    """The max_bad_commands-th error is answered with 421 4.7.0 and the
    connection is closed."""
    gw = make_gateway(tmp_path, limits={"max_bad_commands": 3})
    c = gw.connect()
    syntax = b"500 5.5.2 Syntax error, command unrecognized\r\n"
    assert c.send(b"BOGUS\r\n") == syntax
    assert c.send(b"FOO BAR\r\n") == syntax
    assert c.send(b"BOGUS\r\nNOOP\r\n") == b"421 4.7.0 Too many errors, closing connection\r\n"
    assert c.transport.disconnecting


def test_unknown_command(client):
    """An unknown verb gets 500 5.5.2."""
    assert client.send(b"XYZZY\r\n") == b"500 5.5.2 Syntax error, command unrecognized\r\n"


def test_invalid_utf8_command(client):
    """A command that is not UTF-8 gets 500 5.5.2."""
    assert client.send(b"NOOP \xff\r\n") == b"500 5.5.2 Invalid UTF-8 in command\r\n"


def test_command_line_of_512_octets_accepted(client):
    """A command line of exactly 512 octets including CRLF is accepted."""
    line = b"NOOP " + b"x" * 505 + b"\r\n"
    assert len(line) == 512
    assert client.send(line) == b"250 2.0.0 Ok\r\n"


def test_command_line_over_512_octets(client):
    """A command line over 512 octets gets 500 5.5.2 and the connection
    stays usable."""
    assert client.send(b"NOOP " + b"x" * 506 + b"\r\n") == b"500 5.5.2 Line too long\r\n"
    assert client.send(b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"
    assert not client.transport.disconnecting


def test_endless_command_line_answered_once(client):
    """A long line arriving in pieces without CRLF is answered once, the
    rest of it up to CRLF is discarded, and the next command works."""
    assert client.send(b"MAIL FROM:<" + b"a" * 600) == b"500 5.5.2 Line too long\r\n"
    assert client.send(b"a" * 600) == b""
    assert client.send(b"a@client.example>\r\nNOOP\r\n") == b"250 2.0.0 Ok\r\n"


def test_connections_per_ip_limited(tmp_path):
    """Past max_connections_per_ip a client gets 421 4.7.0 and is closed;
    other addresses are not affected and a closed connection frees its
    slot (the limiter is shared across factories)."""
    limiter = ConnectionLimiter(100, 2)
    gw = make_gateway(tmp_path, limits={"max_connections_per_ip": 2}, limiter=limiter)
    other = make_gateway(tmp_path / "other", limiter=limiter)
    first, second = gw.connect(), other.connect()
    assert first.transport.value() == GREETING
    assert second.transport.value() == GREETING
    refused = gw.connect()
    assert refused.transport.value() == b"421 4.7.0 Too many connections, try again later\r\n"
    assert refused.transport.disconnecting
    refused.protocol.connectionLost(None)
    assert gw.connect().transport.value().startswith(b"421 4.7.0 ")
    assert gw.connect("192.0.2.2").transport.value() == GREETING
    first.protocol.connectionLost(None)
    assert gw.connect().transport.value() == GREETING


def test_total_connections_limited(tmp_path):
    """Past max_connections in total any client gets 421 4.7.0."""
    gw = make_gateway(tmp_path, limiter=ConnectionLimiter(1, 10))
    assert gw.connect("192.0.2.1").transport.value() == GREETING
    assert gw.connect("192.0.2.2").transport.value() == b"421 4.7.0 Too many connections, try again later\r\n"


# -- simple commands -----------------------------------------------------------


@pytest.mark.parametrize("command, reply", [
    (b"VRFY bob", b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n"),
    (b"VRFY", b"501 5.5.4 Syntax error in parameters or arguments\r\n"),
    (b"EXPN staff", b"502 5.5.1 EXPN not available\r\n"),
    (b"NOOP", b"250 2.0.0 Ok\r\n"),
    (b"RSET", b"250 2.0.0 Reset ok\r\n"),
    (b"RSET now", b"501 5.5.4 Syntax error in parameters or arguments\r\n"),
    (b"HELP", b"214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY\r\n"),
    (b"STARTTLS", b"502 5.5.1 STARTTLS not available\r\n"),
])
def test_simple_commands(ehlo, command, reply):
    """VRFY, EXPN, NOOP, RSET, HELP and STARTTLS (not offered) replies."""
    assert ehlo.send(command + b"\r\n") == reply
    assert not ehlo.transport.disconnecting


def test_quit(client):
    """QUIT answers 221 2.0.0 and closes; later input is ignored."""
    assert client.send(b"QUIT\r\nNOOP\r\n") == b"221 2.0.0 Bye\r\n"
    assert client.transport.disconnecting
    assert client.send(b"NOOP\r\n") == b""


def test_rset_clears_transaction(ehlo):
    """After RSET, RCPT needs a new MAIL."""
    ehlo.send(b"MAIL FROM:<a@client.example>\r\n")
    assert ehlo.send(b"RSET\r\n") == b"250 2.0.0 Reset ok\r\n"
    assert ehlo.send(b"RCPT TO:<bob@example.test>\r\n") == b"503 5.5.1 Need MAIL command\r\n"


# -- MAIL and RCPT parameters and addresses -----------------------------------------


@pytest.mark.parametrize("command, reply", [
    (b"MAIL FROM:<a@client.example> FOO=BAR", b"555 5.5.4 Unsupported MAIL/RCPT parameter\r\n"),
    (b"MAIL FROM:<a@client.example> SIZE=4001", b"552 5.3.4 Message size exceeds fixed limit\r\n"),
    (b"MAIL FROM:<a@client.example> SIZE=4000", SENDER_OK),
    (b"MAIL FROM:<a@client.example> SIZE=abc", b"501 5.5.4 Bad SIZE parameter\r\n"),
    (b"MAIL FROM:<a@client.example> BODY=8BITMIME", SENDER_OK),
    (b"MAIL FROM:<a@client.example> BODY=7BIT", SENDER_OK),
    (b"MAIL FROM:<a@client.example> BODY=BINARYMIME", b"501 5.5.4 BODY must be 7BIT or 8BITMIME\r\n"),
    (b"MAIL FROM:<> SIZE=100 BODY=8BITMIME", SENDER_OK),
    (b"MAIL TO:<a@client.example>", b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
])
def test_mail_parameters(ehlo, command, reply):
    """MAIL parameters: unknown ones 555 5.5.4, SIZE over the limit 552
    5.3.4, BODY=8BITMIME accepted."""
    assert ehlo.send(command + b"\r\n") == reply


def test_non_ascii_sender_needs_smtputf8(ehlo):
    """A non-ASCII sender without SMTPUTF8 gets 553 5.6.7; with it, 250."""
    sender = "j\u00f6rg@client.example".encode()
    assert ehlo.send(b"MAIL FROM:<" + sender + b">\r\n") == (
        b"553 5.6.7 Non-ASCII sender address not permitted without SMTPUTF8\r\n")
    assert ehlo.send(b"MAIL FROM:<" + sender + b"> SMTPUTF8\r\n") == SENDER_OK


def test_non_ascii_recipient_needs_smtputf8(gateway, ehlo):
    """A non-ASCII recipient is refused unless MAIL carried SMTPUTF8, and
    then it is queued as given."""
    rcpt = "b\u00fcro@example.test".encode()
    ehlo.send(b"MAIL FROM:<a@client.example>\r\n")
    assert ehlo.send(b"RCPT TO:<" + rcpt + b">\r\n") == (
        b"553 5.6.7 Non-ASCII recipient address not permitted without SMTPUTF8\r\n")
    ehlo.send(b"RSET\r\n")
    assert ehlo.send(b"MAIL FROM:<a@client.example> SMTPUTF8\r\n") == SENDER_OK
    assert ehlo.send(b"RCPT TO:<" + rcpt + b">\r\n") == RCPT_OK
    ehlo.send(b"DATA\r\n")
    assert QUEUED.fullmatch(ehlo.send(MESSAGE + b".\r\n"))
    [(envelope, _)] = queued(gateway.spool_path)
    assert [r.address for r in envelope.recipients] == ["b\u00fcro@example.test"]
    assert "SMTPUTF8" in envelope.mail_params


def test_rcpt_parameter_refused(ehlo):
    """RCPT parameters (no DSN support) get 555 5.5.4."""
    ehlo.send(b"MAIL FROM:<a@client.example>\r\n")
    assert ehlo.send(b"RCPT TO:<bob@example.test> NOTIFY=NEVER\r\n") == (
        b"555 5.5.4 Unsupported MAIL/RCPT parameter\r\n")


@pytest.mark.parametrize("path", [b"<postmaster>", b"<Postmaster>", b"<POSTMASTER>"])
def test_rcpt_postmaster_accepted(gateway, ehlo, path):
    """The domain-less RCPT TO:<postmaster> is accepted (RFC 5321
    §4.1.1.3), as postmaster of the local domain."""
    ehlo.send(b"MAIL FROM:<>\r\n")
    assert ehlo.send(b"RCPT TO:" + path + b"\r\n") == RCPT_OK
    ehlo.send(b"DATA\r\n")
    ehlo.send(MESSAGE + b".\r\n")
    [(envelope, _)] = queued(gateway.spool_path)
    assert [r.address for r in envelope.recipients] == ["postmaster@mx.example.test"]


def test_rcpt_postmaster_with_only_subdomain_pattern(tmp_path):
    """<postmaster> is accepted even when local_domains holds only a
    ".parent" pattern."""
    gw = make_gateway(tmp_path, server={"local_domains": [".example.test"]})
    c = gw.connect()
    c.send(b"EHLO client.example\r\nMAIL FROM:<>\r\n")
    assert c.send(b"RCPT TO:<postmaster>\r\n") == RCPT_OK


def test_rcpt_postmaster_on_relay_only_gateway(tmp_path):
    """<postmaster> is accepted by a gateway that only relays
    (relay_domains, no local_domains)."""
    gw = make_gateway(tmp_path, server={"local_domains": [], "relay_domains": ["example.test"]})
    c = gw.connect()
    c.send(b"EHLO client.example\r\nMAIL FROM:<>\r\n")
    assert c.send(b"RCPT TO:<postmaster>\r\n") == RCPT_OK


def test_too_many_recipients(tmp_path):
    """Past max_recipients, RCPT gets 452 4.5.3; the accepted ones still
    get the message."""
    gw = make_gateway(tmp_path, server={"max_recipients": 2})
    c = gw.connect()
    c.send(b"EHLO client.example\r\nMAIL FROM:<a@client.example>\r\n")
    assert c.send(b"RCPT TO:<r1@example.test>\r\nRCPT TO:<r2@example.test>\r\n") == RCPT_OK * 2
    assert c.send(b"RCPT TO:<r3@example.test>\r\n") == b"452 4.5.3 Too many recipients\r\n"
    c.send(b"DATA\r\n")
    assert QUEUED.fullmatch(c.send(MESSAGE + b".\r\n"))
    [(envelope, _)] = queued(gw.spool_path)
    assert [r.address for r in envelope.recipients] == ["r1@example.test", "r2@example.test"]


# -- DATA limits ------------------------------------------------------------------


def test_data_with_argument(ehlo):
    """DATA takes no argument: 501 5.5.4."""
    ehlo.send(b"MAIL FROM:<a@client.example>\r\nRCPT TO:<bob@example.test>\r\n")
    assert ehlo.send(b"DATA now\r\n") == b"501 5.5.4 Syntax error in parameters or arguments\r\n"


@pytest.mark.parametrize("content", [
    b"Subject: x\r\n\r\nbare\nline feed\r\n",
    b"Subject: x\r\n\r\nbare\rcarriage return\r\n",
    b"Subject: x\r\n\r\nsmuggle\n.\nMAIL FROM:<x@evil.example>\r\n",
])
def test_bare_newline_refused_nothing_queued(gateway, ehlo, content):
    """A bare LF or CR in the content gets 550 5.5.2 after the final dot
    and nothing is queued."""
    ehlo.send(ENVELOPE)
    assert ehlo.send(content + b".\r\n") == (
        b"550 5.5.2 Bare <CR> or <LF> in message; lines must end with <CR><LF>\r\n")
    assert gateway.nothing_stored()
    assert ehlo.send(b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"


def test_text_line_of_1000_octets_accepted(gateway, ehlo):
    """A text line of exactly 1000 octets including CRLF is accepted."""
    ehlo.send(ENVELOPE)
    line = b"x" * 998 + b"\r\n"
    assert QUEUED.fullmatch(ehlo.send(b"Subject: x\r\n\r\n" + line + b".\r\n"))


def test_text_line_over_1000_octets(gateway, ehlo):
    """A text line over 1000 octets gets 500 5.5.2 and nothing is queued."""
    ehlo.send(ENVELOPE)
    line = b"x" * 999 + b"\r\n"
    assert ehlo.send(b"Subject: x\r\n\r\n" + line + b".\r\n") == (
        b"500 5.5.2 Line too long (limit 1000 octets including CRLF)\r\n")
    assert gateway.nothing_stored()


def test_message_over_size_while_streaming(gateway, ehlo):
    """A message growing past max_message_size gets 552 5.3.4 at the final
    dot, is not queued, and never takes more than the limit on disk."""
    ehlo.send(ENVELOPE)
    assert ehlo.send(b"Subject: big\r\n\r\n") == b""
    for _ in range(60):
        assert ehlo.send(b"y" * 98 + b"\r\n") == b""
        for name in gateway.files("tmp"):
            assert (gateway.spool_path / "tmp" / name).stat().st_size <= MAX_SIZE
    assert ehlo.send(b".\r\n") == b"552 5.3.4 Message size exceeds fixed limit\r\n"
    assert gateway.nothing_stored()
    assert ehlo.send(b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"


def test_message_of_exactly_max_size_accepted(gateway, ehlo):
    """A message of exactly max_message_size octets is queued."""
    ehlo.send(ENVELOPE)
    header = b"Subject: x\r\n\r\n"
    lines, rest = divmod(MAX_SIZE - len(header), 100)
    body = (b"z" * 98 + b"\r\n") * lines + b"z" * (rest - 2) + b"\r\n"
    assert len(header + body) == MAX_SIZE
    assert QUEUED.fullmatch(ehlo.send(header + body + b".\r\n"))


def test_too_many_received_headers(tmp_path):
    """More than max_received_headers Received: fields gets 554 5.4.6 (a
    mail loop) and nothing is queued; exactly the limit is fine."""
    gw = make_gateway(tmp_path, server={"max_received_headers": 3})
    c = gw.connect()
    c.send(b"EHLO client.example\r\n" + ENVELOPE)
    hops = b"".join(b"Received: from hop%d\r\n" % i for i in range(4))
    assert c.send(hops + b"Subject: loop\r\n\r\nx\r\n.\r\n") == (
        b"554 5.4.6 Too many Received headers: mail loop?\r\n")
    assert gw.nothing_stored()
    c.send(ENVELOPE)
    hops = b"".join(b"Received: from hop%d\r\n" % i for i in range(3))
    assert QUEUED.fullmatch(c.send(hops + b"Subject: ok\r\n\r\nx\r\n.\r\n"))


def test_connection_lost_during_data_leaves_nothing(gateway, ehlo):
    """A client that disconnects in the middle of DATA leaves no file."""
    ehlo.send(ENVELOPE + b"Subject: x\r\n\r\npartial")
    message = ehlo.protocol._data
    assert message is not None and message.decoder.size > 0
    ehlo.protocol.connectionLost(None)
    assert message.writer.closed and gateway.files("tmp") == []
    assert gateway.nothing_stored()


# -- every reply has an enhanced status code -----------------------------------------

ENHANCED = re.compile(rb"([245])\d\d[ -]([245])\.\d{1,3}\.\d{1,3} .*")


def test_every_reply_carries_enhanced_status(tmp_path):
    """Over a whole session with successes and errors, every reply line
    except the greeting, the EHLO/HELO lines and the 354 (RFC 3463 has no
    3.x.x class) carries an enhanced status code of the reply's class."""
    gw = make_gateway(tmp_path, limits={"max_bad_commands": 100}, server={"max_recipients": 1})
    c = gw.connect()
    transcript = [(b"<connect>", c.output())]
    commands = [
        b"NOOP", b"MAIL FROM:<a@client.example>", b"RCPT TO:<bob@example.test>", b"DATA",
        b"BOGUS", b"NOOP \xff", b"HELO", b"EHLO client.example", b"HELO client.example",
        b"EHLO client.example", b"MAIL FROM:<a@client.example> FOO=1",
        b"MAIL FROM:<a@client.example> SIZE=999999", b"MAIL FROM:<a@client.example> BODY=X",
        b"MAIL FROM:a@client.example", b"MAIL FROM:<bad address>",
        "MAIL FROM:<\u00e9@client.example>".encode(), b"MAIL FROM:<a@client.example>",
        b"MAIL FROM:<a@client.example>", b"RCPT TO:<x@other.example>", b"RCPT TO:bob",
        b"RCPT TO:<bob@example.test> NOTIFY=NEVER", b"RCPT TO:<bob@example.test>",
        b"RCPT TO:<carol@example.test>", b"DATA now", b"DATA",
        MESSAGE + b".", b"MAIL FROM:<a@client.example>", b"RCPT TO:<postmaster>", b"DATA",
        b"Subject: x\r\n\r\nbare\nLF\r\n.", b"VRFY", b"VRFY bob", b"EXPN staff", b"HELP",
        b"RSET now", b"RSET", b"STARTTLS", b"AUTH PLAIN", b"NOOP " + b"x" * 600, b"QUIT",
    ]
    for command in commands:
        transcript.append((command, c.send(command + b"\r\n")))
    assert c.transport.disconnecting
    checked = 0
    for command, replies in transcript:
        assert replies.endswith(b"\r\n"), (command, replies)
        if command == b"<connect>" or command.startswith((b"EHLO client", b"HELO client")):
            assert replies.startswith((b"220 ", b"250")), (command, replies)
            continue
        for line in replies[:-2].split(b"\r\n"):
            if line.startswith(b"354 "):
                continue
            match = ENHANCED.fullmatch(line)
            assert match, (command, line)
            assert match.group(1) == match.group(2), (command, line)
            checked += 1
    assert checked >= len(commands) - 6
