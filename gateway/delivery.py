"""The SMTP client side: one connection to a next hop, several messages
over it, per-recipient results.

Why our own client instead of C{twisted.mail.smtp.ESMTPClient}: we need
PIPELINING (RFC 2920), per-recipient outcomes, several messages on one
connection and a TLS level chosen per destination (and, later, by
MTA-STS).  The protocol object only frames replies; L{Connection} drives a
session with C{async} methods, every wait bounded by the injected clock.

Standards: RFC 5321 §3.3, §4.5.3.2 (timeouts), §5.1; RFC 2920; RFC 3207;
RFC 4954 (AUTH PLAIN/LOGIN); RFC 6152; RFC 6531.
See also: Postfix smtp(8); twisted.mail.smtp.ESMTPClient.
"""

from __future__ import annotations

import base64
import collections
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import defer, error as net_error, protocol
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import FileSender, LineOnlyReceiver

_STATUS = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s")


@dataclass(frozen=True, slots=True)
class ServerReply:
    """A reply read from a remote server.

    @ivar code: the three-digit code (0 for a local failure).
    @ivar lines: the text lines without code and separator.
    """

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def status(self) -> str | None:
        """The enhanced status code at the start of the text, if any."""
        match = _STATUS.match(self.lines[0] + " ") if self.lines else None
        return match.group(1) if match else None

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


class DeliveryError(Exception):
    """A delivery step failed.

    @ivar reply: the remote reply, or a local pseudo-reply (code 4xx for
        connection problems) describing it.
    @ivar permanent: whether retrying cannot help.
    """

    def __init__(self, reply: ServerReply, permanent: bool = False, tls_failure: str | None = None) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.permanent = permanent
        self.tls_failure = tls_failure


#: OpenSSL X509_V_ERR_* codes -> RFC 8460 §4.3 result types.
_VERIFY_RESULTS = {
    9: "certificate-expired",    # not yet valid
    10: "certificate-expired",   # has expired
    2: "certificate-not-trusted", 18: "certificate-not-trusted", 19: "certificate-not-trusted",
    20: "certificate-not-trusted", 21: "certificate-not-trusted", 27: "certificate-not-trusted",
}


def classify_tls_failure(reason: Any, verify_result: int | None = None) -> str:
    """The RFC 8460 §4.3 result type for why a TLS session failed.

    @param verify_result: OpenSSL's X509 verify result of the session, when
        known: the error text alone only says "certificate verify failed".
    """
    if verify_result in _VERIFY_RESULTS:
        return _VERIFY_RESULTS[verify_result]
    value = getattr(reason, "value", reason)
    name = type(value).__name__
    text = str(value).lower()
    if name == "VerificationError" or "hostname" in text or "doesn't match" in text:
        return "certificate-host-mismatch"
    if "expired" in text:
        return "certificate-expired"
    if "self signed" in text or "self-signed" in text or "unable to get local issuer" in text:
        return "certificate-not-trusted"
    return "validation-failure"


def local_failure(status: str, text: str) -> ServerReply:
    """A pseudo-reply for failures with no remote reply (connect, TLS, timeout)."""
    return ServerReply(int(status[0]) * 100 + 21 if status[0] == "4" else 550, (f"{status} {text}",))


class SMTPClientProtocol(LineOnlyReceiver):
    """Frames replies and hands them, in order, to the waiting commands."""

    delimiter = b"\r\n"
    MAX_LENGTH = 64 * 1024

    def __init__(self) -> None:
        self._waiting: collections.deque[defer.Deferred] = collections.deque()
        self._lines: list[str] = []
        self.connected_d: defer.Deferred = defer.Deferred()
        self.lost_reason: Any = None

    def connectionMade(self) -> None:
        self.connected_d.callback(self)

    def expect(self) -> defer.Deferred:
        """A Deferred for the next reply (greeting, or after DATA's content)."""
        d: defer.Deferred = defer.Deferred()
        if self.lost_reason is not None:
            d.errback(self.lost_reason)
        else:
            self._waiting.append(d)
        return d

    def send(self, line: bytes) -> defer.Deferred:
        """Write a command line; the Deferred fires with its reply."""
        d = self.expect()
        if self.lost_reason is None:
            self.transport.write(line + b"\r\n")
        return d

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        if len(text) < 3 or not text[:3].isdigit():
            self._protocol_error(f"malformed reply: {text[:80]!r}")
            return
        self._lines.append(text[4:])
        if text[3:4] == "-":
            return
        reply = ServerReply(int(text[:3]), tuple(self._lines))
        self._lines = []
        if self._waiting:
            self._waiting.popleft().callback(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._protocol_error("reply line too long")

    def _protocol_error(self, why: str) -> None:
        self.transport.abortConnection()
        self.lost_reason = DeliveryError(local_failure("4.5.0", f"protocol error: {why}"))

    def connectionLost(self, reason: Any = None) -> None:
        if self.lost_reason is None:
            self.lost_reason = reason
        waiting, self._waiting = self._waiting, collections.deque()
        for d in waiting:
            d.errback(self.lost_reason)


def dot_stuffer() -> Callable[[bytes], bytes]:
    """A FileSender transform that dot-stuffs content arriving in chunks
    (RFC 5321 §4.5.2): a line starting with '.' gets another '.'."""
    state = {"line_start": True, "cr": False}

    def transform(chunk: bytes) -> bytes:
        if not chunk:
            return chunk
        out = chunk.replace(b"\r\n.", b"\r\n..")
        if state["line_start"] and chunk[:1] == b".":
            out = b"." + out
        elif state["cr"] and chunk[:2] == b"\n.":
            out = b"\n." + out[1:]
        state["line_start"] = chunk.endswith(b"\r\n")
        state["cr"] = chunk.endswith(b"\r")
        return out

    return transform


@dataclass
class Outgoing:
    """One message to send on a connection.

    @ivar sender: reverse-path (C{""} for the null sender).
    @ivar recipients: forward-paths to try in this attempt.
    @ivar prepend: header block (bytes, CRLF-terminated) sent before the content.
    @ivar content_path: the spooled content file.
    """

    queue_id: str
    sender: str
    recipients: list[str]
    prepend: bytes
    content_path: str
    size: int
    mail_params: dict[str, str | None] = field(default_factory=dict)


@dataclass
class RecipientResult:
    """What happened to one recipient in one attempt."""

    address: str
    reply: ServerReply

    @property
    def delivered(self) -> bool:
        return 200 <= self.reply.code < 300

    @property
    def permanent(self) -> bool:
        return self.reply.code >= 500


@dataclass
class Timeouts:
    """Client timeouts in seconds (RFC 5321 §4.5.3.2 suggests larger ones;
    these are Postfix-like defaults)."""

    connect: float = 30.0
    greeting: float = 300.0
    command: float = 300.0
    data_end: float = 600.0


class Connection:
    """One SMTP client session with a next hop.

    Create it with L{open}; then L{send} messages one after the other and
    L{close} it.  After a failure that broke the session, C{usable} is False.
    """

    log = Logger()

    def __init__(self, proto: SMTPClientProtocol, clock: IReactorTime, timeouts: Timeouts,
                 host: str, address: str, port: int) -> None:
        self.proto = proto
        self.clock = clock
        self.timeouts = timeouts
        self.host = host
        self.address = address
        self.port = port
        self.extensions: dict[str, str] = {}
        self.tls_version: str | None = None
        self.tls_verified = False
        self.usable = True
        self.messages_sent = 0
        self.sts: str | None = None

    @classmethod
    async def open(cls, reactor: Any, clock: IReactorTime, host: str, address: str, port: int,
                   *, helo: str, tls: str, tls_context: Callable[[str], Any] | None,
                   timeouts: Timeouts, auth: tuple[str, str] | None = None) -> "Connection":
        """Connect, read the greeting, EHLO, STARTTLS as C{tls} demands,
        EHLO again, AUTH when credentials are given.

        @param tls: C{none}, C{may} (STARTTLS when offered, certificate not
            checked), C{encrypt} (STARTTLS required, not checked) or
            C{verify} (required, certificate checked against C{host}).
        @param tls_context: C{f(level) -> client TLS context} for the
            given level (built by the caller with service-identity).
        @raise DeliveryError: with a permanent flag where retrying the
            next host would not help.
        """
        factory = protocol.Factory.forProtocol(SMTPClientProtocol)
        proto_holder: dict[str, SMTPClientProtocol] = {}

        def build(addr: Any) -> SMTPClientProtocol:
            proto = SMTPClientProtocol()
            proto_holder["p"] = proto
            return proto

        factory.buildProtocol = build  # type: ignore[method-assign]
        from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint

        endpoint_type = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        endpoint = endpoint_type(reactor, address, port, timeout=timeouts.connect)
        try:
            proto = await _bounded(endpoint.connect(factory), timeouts.connect + 1, clock)
        except (net_error.ConnectError, defer.TimeoutError, net_error.TimeoutError) as exc:
            raise DeliveryError(local_failure("4.4.1", f"connect to {host}[{address}]:{port} failed: {exc.__class__.__name__}")) from None
        connection = cls(proto, clock, timeouts, host, address, port)
        try:
            greeting = await connection._wait(proto.expect(), timeouts.greeting)
            if greeting.code != 220:
                raise DeliveryError(greeting, permanent=False)
            await connection._ehlo(helo)
            if tls != "none":
                await connection._starttls(helo, tls, tls_context)
            if auth is not None:
                await connection._auth(*auth)
        except BaseException:
            connection.abort()
            raise
        return connection

    async def _wait(self, d: defer.Deferred, timeout: float) -> ServerReply:
        try:
            return await _bounded(d, timeout, self.clock)
        except defer.TimeoutError:
            self.abort()
            raise DeliveryError(local_failure("4.4.2", f"timeout talking to {self.host}[{self.address}]")) from None
        except DeliveryError:
            self.usable = False
            raise
        except Exception as exc:
            self.usable = False
            reason = getattr(exc, "value", exc)
            raise DeliveryError(local_failure("4.4.2", f"lost connection with {self.host}[{self.address}]: {reason.__class__.__name__}")) from None

    async def command(self, line: bytes, timeout: float | None = None) -> ServerReply:
        """Send one command and wait for its reply."""
        return await self._wait(self.proto.send(line), timeout or self.timeouts.command)

    async def _ehlo(self, helo: str) -> None:
        reply = await self.command(b"EHLO " + helo.encode("ascii"))
        if reply.code != 250:
            reply = await self.command(b"HELO " + helo.encode("ascii"))
            if reply.code != 250:
                raise DeliveryError(reply)
            self.extensions = {}
            return
        self.extensions = {}
        for line in reply.lines[1:]:
            keyword, _, params = line.partition(" ")
            self.extensions[keyword.upper()] = params

    async def _starttls(self, helo: str, level: str, tls_context: Callable[[str], Any] | None) -> None:
        if "STARTTLS" not in self.extensions or tls_context is None:
            if level == "may":
                return
            raise DeliveryError(local_failure("4.7.4", f"TLS is required but {self.host} does not offer STARTTLS"),
                                tls_failure="starttls-not-supported")
        reply = await self.command(b"STARTTLS")
        if reply.code != 220:
            if level == "may":
                return
            raise DeliveryError(local_failure("4.7.4", f"STARTTLS refused by {self.host}: {reply}"),
                                tls_failure="starttls-not-supported")
        context = tls_context(level)
        self.proto.transport.startTLS(context)
        try:
            await self._ehlo(helo)
        except DeliveryError as exc:
            cause = self.proto.lost_reason
            detail = str(getattr(cause, "value", cause) or exc)[:200]
            verify_result = getattr(context, "verify_error", None)
            raise DeliveryError(local_failure("4.7.5", f"TLS handshake with {self.host} failed: {detail}"),
                                tls_failure=classify_tls_failure(cause, verify_result)) from None
        from gateway.tls import tls_info

        info = tls_info(self.proto.transport)
        self.tls_version = info.version if info else "TLS"
        self.tls_verified = level == "verify"

    async def _auth(self, username: str, password: str) -> None:
        if self.tls_version is None:
            raise DeliveryError(local_failure("4.7.0", f"refusing to send a password to {self.host} without TLS"))
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms:
            token = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
            reply = await self.command(f"AUTH PLAIN {token}".encode())
        elif "LOGIN" in mechanisms:
            reply = await self.command(b"AUTH LOGIN")
            if reply.code == 334:
                reply = await self.command(base64.b64encode(username.encode()))
            if reply.code == 334:
                reply = await self.command(base64.b64encode(password.encode()))
        else:
            raise DeliveryError(local_failure("4.7.0", f"{self.host} offers no AUTH PLAIN or LOGIN"))
        if reply.code != 235:
            raise DeliveryError(reply, permanent=False)

    async def send(self, message: Outgoing) -> list[RecipientResult]:
        """Send one message; one result per recipient.

        With PIPELINING, MAIL, every RCPT and DATA go in one write (RFC 2920).
        """
        mail = self._mail_command(message)
        if "PIPELINING" in self.extensions:
            pending = [self.proto.send(mail)]
            pending += [self.proto.send(f"RCPT TO:<{r}>".encode()) for r in message.recipients]
            pending.append(self.proto.send(b"DATA"))
            replies = [await self._wait(d, self.timeouts.command) for d in pending]
            mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
        else:
            mail_reply = await self.command(mail)
            rcpt_replies, data_reply = [], None
            if mail_reply.code == 250:
                for r in message.recipients:
                    rcpt_replies.append(await self.command(f"RCPT TO:<{r}>".encode()))
                if any(r.code in (250, 251) for r in rcpt_replies):
                    data_reply = await self.command(b"DATA")
        if mail_reply.code != 250:
            if data_reply is None or data_reply.code != 354:
                await self._reset()
            else:
                await self._abort_data()
            return [RecipientResult(r, mail_reply) for r in message.recipients]
        accepted = [r for r, reply in zip(message.recipients, rcpt_replies) if reply.code in (250, 251)]
        results = {r: RecipientResult(r, reply) for r, reply in zip(message.recipients, rcpt_replies)
                   if reply.code not in (250, 251)}
        if not accepted:
            if data_reply is not None and data_reply.code == 354:
                await self._abort_data()
            elif data_reply is not None or "PIPELINING" not in self.extensions:
                await self._reset()
            return [results[r] for r in message.recipients]
        if data_reply is None or data_reply.code != 354:
            reply = data_reply or local_failure("4.5.0", "DATA not accepted")
            await self._reset()
            return [results.get(r) or RecipientResult(r, reply) for r in message.recipients]
        final = await self._send_content(message)
        self.messages_sent += 1
        return [results.get(r) or RecipientResult(r, final) for r in message.recipients]

    def _mail_command(self, message: Outgoing) -> bytes:
        parts = [f"MAIL FROM:<{message.sender}>"]
        if "SIZE" in self.extensions:
            parts.append(f"SIZE={message.size + len(message.prepend)}")
        body = (message.mail_params.get("BODY") or "").upper()
        if body == "8BITMIME" and "8BITMIME" in self.extensions:
            parts.append("BODY=8BITMIME")
        if "SMTPUTF8" in message.mail_params:
            if "SMTPUTF8" not in self.extensions:
                raise DeliveryError(local_failure("5.6.7", f"{self.host} does not support SMTPUTF8"), permanent=True)
            parts.append("SMTPUTF8")
        return " ".join(parts).encode("utf-8")

    async def _send_content(self, message: Outgoing) -> ServerReply:
        waiting = self.proto.expect()
        transport = self.proto.transport
        stuff = dot_stuffer()
        if message.prepend:
            transport.write(stuff(message.prepend))
        with open(message.content_path, "rb") as content:
            sender = FileSender()
            last = {"byte": message.prepend[-2:] if message.prepend else b""}

            def transform(chunk: bytes) -> bytes:
                if chunk:
                    last["byte"] = chunk[-2:]
                return stuff(chunk)

            try:
                await _bounded(sender.beginFileTransfer(content, transport, transform),
                               self.timeouts.data_end, self.clock)
            except Exception:
                self.abort()
                raise DeliveryError(local_failure("4.4.2", f"lost connection with {self.host} while sending data")) from None
        ending = b".\r\n" if last["byte"] in (b"\r\n", b"") else b"\r\n.\r\n"
        transport.write(ending)
        return await self._wait(waiting, self.timeouts.data_end)

    async def _abort_data(self) -> None:
        """After a 354 with no valid recipient: send an empty message that
        the server will refuse (RFC 2920 §3.1), then RSET."""
        waiting = self.proto.expect()
        self.proto.transport.write(b".\r\n")
        await self._wait(waiting, self.timeouts.data_end)
        await self._reset()

    async def _reset(self) -> None:
        reply = await self.command(b"RSET")
        if reply.code != 250:
            self.usable = False

    async def close(self) -> None:
        """QUIT politely (bounded), then drop the connection."""
        if self.usable and self.proto.lost_reason is None:
            try:
                await self._wait(self.proto.send(b"QUIT"), 10)
            except DeliveryError:
                pass
        self.abort()

    def abort(self) -> None:
        """Drop the connection now."""
        self.usable = False
        transport = getattr(self.proto, "transport", None)
        if transport is not None and self.proto.lost_reason is None:
            transport.loseConnection()


async def _bounded(d: defer.Deferred, timeout: float, clock: IReactorTime) -> Any:
    d.addTimeout(timeout, clock)
    return await d
