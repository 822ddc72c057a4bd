"""The ESMTP server: Twisted's ESMTP protocol with our own input loop.

Why override C{dataReceived} instead of using C{LineOnlyReceiver}: the
stock loop keeps executing plaintext lines already buffered when STARTTLS
starts (CVE-2011-0411 class), answers pipelined commands out of order when
a validator returns a Deferred (Twisted ticket 8126), builds one IMessage
per recipient and allows 16 KiB lines.  Here the input is framed by us:
commands one at a time, and while a command waits for a plugin or the
queue, further input is only buffered (past C{[limits] input_buffer} the
transport is paused), so replies always come back in command order.  DATA
is decoded by L{gateway.dotstream.DataDecoder} (only CRLF.CRLF ends it) and
streamed once into the spool, whatever the number of recipients.

Standards: RFC 5321 (SMTP), RFC 1869/5321 §2.2 (EHLO), RFC 2920
(PIPELINING), RFC 1870 (SIZE), RFC 6152 (8BITMIME), RFC 2034 and RFC 3463
(enhanced status codes), RFC 6531 (SMTPUTF8), RFC 3207 (STARTTLS),
RFC 8314 (implicit TLS).
See also: twisted.mail.smtp.ESMTP; Postfix smtpd(8); aiosmtpd.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import secrets
import time
from collections import Counter
from typing import Any, Callable

from twisted.internet import defer, tcp
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.mail import smtp

from gateway import reply as R
from gateway.address import AddressError, parse_path
from gateway.config import GatewayConfig, ListenerConfig
from gateway.datastate import IncomingMessage
from gateway.pipeline import MessageView, Outcome, Pipeline
from gateway.smtpauth import AUTH_LINE_LIMIT, SMTPAuthMixin
from gateway.queue import QueueError, Spool
from gateway.queuefile import Envelope, EnvelopeRecipient
from gateway.reply import Reply
from gateway.session import Recipient, Session, Transaction
from gateway.tls import tls_info
from gateway.trace import authentication_results, format_date, message_id, received_header
from gateway.verdict import Action

_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)

#: Send replies straight to the socket when nothing is queued (see _out).
_EAGER_WRITES = True

# Protocol states.
GREETING, COMMAND, DATA, CLOSED = "greeting", "command", "data", "closed"

_session_ids = itertools.count(1)


class ConnectionLimiter:
    """Counts open connections globally and per client IP, across listeners.

    @ivar total: open connections.
    """

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self._per_ip: Counter[str] = Counter()

    def acquire(self, ip: str) -> bool:
        """Take a slot for C{ip}; False (and nothing taken) when over a limit."""
        if self.total >= self.max_total or self._per_ip[ip] >= self.max_per_ip:
            return False
        self.total += 1
        self._per_ip[ip] += 1
        return True

    def release(self, ip: str) -> None:
        """Give back the slot taken by L{acquire}."""
        self.total -= 1
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]


class GatewaySMTP(SMTPAuthMixin, smtp.ESMTP):
    """One SMTP connection.

    Built on C{twisted.mail.smtp.ESMTP} (its TLS context, portal,
    challengers and transport plumbing); the command loop, limits,
    timeouts and DATA handling are ours (see the module docstring).
    """

    log = Logger()

    def __init__(self, factory: "GatewaySMTPFactory") -> None:
        smtp.ESMTP.__init__(self, contextFactory=factory.tls_context)
        self.gateway = factory
        self.listener: ListenerConfig = factory.listener
        self.config: GatewayConfig = factory.config
        self.limits = factory.config.limits
        self.clock: IReactorTime = factory.clock
        self.pipeline: Pipeline = factory.pipeline
        self.state = GREETING
        self.session: Session | None = None
        self.transaction: Transaction | None = None
        self._inbuf = bytearray()
        self._busy = False
        self._paused = False
        self._discarding_line = False
        self._bad_commands = 0
        self._timer: Any = None
        self._slot_taken = False
        self._data: IncomingMessage | None = None
        self._tls_pending = False
        self._processing = False
        self._auth_step: Callable[[bytes], None] | None = None
        self._auth_refusals = 0

    # -- connection life cycle (Twisted calls these) -----------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        host = getattr(peer, "host", "127.0.0.1")
        if host.startswith("::ffff:"):
            host = host[7:]
        self.session = Session(
            id=f"{next(_session_ids):x}{secrets.token_hex(2)}", listener=self.listener.name,
            peer=host, peer_port=getattr(peer, "port", 0),
        )
        self.session.trusted = self._trusted_peer()
        if not self.gateway.limiter.acquire(host):
            self.log.info("refused {client}: too many connections", client=host)
            self._send(R.TOO_MANY_CONNECTIONS)
            self._close()
            return
        self._slot_taken = True
        self.gateway.open_connections.add(self)
        metrics = self.gateway.metrics
        if metrics is not None:
            metrics.connections.labels(self.listener.name).inc()
            metrics.connections_open.labels(self.listener.name).inc()
        if self.listener.tls == "implicit":
            self._tls_pending = True
        self._restart_timer()
        self._busy = True
        resolver = self.gateway.resolver
        if resolver is not None and self.config.dns.reverse_lookup:
            from gateway.dns import reverse_name

            lookup = defer.ensureDeferred(reverse_name(resolver, host))
            lookup.addTimeout(self.config.dns.timeout, self.clock)
            lookup.addErrback(lambda failure: None)
            self._after(lookup, self._named)
        else:
            self._named(None)

    def _named(self, name: str | None) -> None:
        """The reverse lookup is done: run the connect stage."""
        self.session.peer_name = name
        self._busy = True
        self._after(self.pipeline.run("connect", self.session), self._connected)

    def _connected(self, outcome: Outcome) -> None:
        if outcome.failed:
            self._send(outcome.reply)
            self._close()
            return
        self.state = COMMAND
        self._write_raw(f"220 {self.config.server.hostname} ESMTP mailgateway\r\n")

    def connectionLost(self, reason: Any = None) -> None:
        if reason is not None and self.session is not None and self.state != CLOSED:
            from OpenSSL import SSL

            if reason.check(SSL.Error):
                self.log.info("TLS handshake or session failed with {client}: {reason}",
                              client=self.session.peer, reason=str(reason.value)[:200])
        self.state = CLOSED
        self._cancel_timer()
        if self._data is not None:
            self._data.abort()
            self._data = None
        if self._slot_taken:
            self._slot_taken = False
            self.gateway.limiter.release(self.session.peer)
            self.gateway.open_connections.discard(self)
            if self.gateway.metrics is not None:
                self.gateway.metrics.connections_open.labels(self.listener.name).dec()

    @property
    def busy(self) -> bool:
        """True while a command waits for a plugin or a queue commit."""
        return self._busy and self.state != CLOSED

    def shutdown(self) -> None:
        """Close for a service stop: 421 4.3.2 unless a reply is pending.

        A message whose commit is in flight still gets its 250 (the service
        waits for busy connections); a message still being received is
        dropped unacknowledged, so the client will send it again.
        """
        if self.state == CLOSED or self._busy:
            return
        self._send(R.SHUTTING_DOWN)
        self._close()

    def timeoutConnection(self) -> None:
        """Idle too long in the current state: 421 4.4.2 and close."""
        self._timer = None
        if self.state == CLOSED:
            return
        self.log.info("timeout in state {state} from {client}", state=self.state,
                      client=self.session.peer if self.session else "?")
        self._send(R.TIMEOUT)
        self._close()

    # -- input -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        self._restart_timer()
        self._inbuf += data
        if self._busy and not self._paused and len(self._inbuf) > self.limits.input_buffer:
            self._paused = True
            self.transport.pauseProducing()
        self._process()

    def _process(self) -> None:
        """Handle buffered input until it is used up or a command waits.

        Re-entrant calls (a verdict that was already available) return at
        once: the outer loop goes on, so the stack never grows with the
        number of pipelined commands.
        """
        if self._processing:
            return
        self._processing = True
        try:
            self._process_input()
        finally:
            self._processing = False

    def _process_input(self) -> None:
        while self._inbuf and not self._busy and self.state not in (CLOSED, GREETING):
            if self.state == DATA:
                self._feed_data()
                continue
            end = self._inbuf.find(b"\n")
            limit = self._line_limit()
            if end < 0:
                if len(self._inbuf) > limit:
                    auth_line = limit == AUTH_LINE_LIMIT
                    del self._inbuf[:]
                    if not self._discarding_line:
                        self._discarding_line = True
                        self._line_too_long(auth_line)
                return
            line = bytes(self._inbuf[:end + 1])
            del self._inbuf[:end + 1]
            if self._discarding_line:
                self._discarding_line = False
                continue
            if len(line) > limit:
                self._line_too_long(limit == AUTH_LINE_LIMIT)
                continue
            if self._auth_step is not None:
                step, self._auth_step = self._auth_step, None
                step(line.rstrip(b"\r\n"))
                continue
            self._command(line.rstrip(b"\r\n"))
        if self._paused and not self._busy and self.state != CLOSED:
            self._paused = False
            self.transport.resumeProducing()

    def _line_limit(self) -> int:
        """512 octets for commands; 12288 for AUTH exchanges (RFC 4954 §4)."""
        if self._auth_step is not None or (self.listener.auth and self._inbuf[:5].upper() == b"AUTH "):
            return AUTH_LINE_LIMIT
        return self.limits.max_command_line

    def _line_too_long(self, auth_line: bool = False) -> None:
        if self._auth_step is not None or auth_line:
            self._auth_step = None
            self._error(R.AUTH_LINE_TOO_LONG)
        else:
            self._error(R.LINE_TOO_LONG)

    def _after(self, result: Any, then: Callable[[Any], None]) -> None:
        """Call C{then(result)} now, or when the Deferred fires; input is
        held (busy) until then, which keeps replies in command order."""
        if isinstance(result, defer.Deferred):
            self._busy = True

            def resume(value: Any) -> None:
                if self.state == CLOSED:
                    return
                self._busy = False
                try:
                    then(value)
                finally:
                    if self.state != CLOSED and not self._busy:
                        self._process()

            def failed(failure: Any) -> None:
                self.log.failure("internal error", failure)
                if self.state != CLOSED:
                    self._busy = False
                    self._send(R.PLUGIN_FAILED)
                    self._reset_transaction()
                    self._process()

            result.addCallback(resume).addErrback(failed)
        else:
            self._busy = False
            then(result)
            if self.state != CLOSED and not self._busy:
                self._process()

    # -- output ------------------------------------------------------------

    def _write_raw(self, text: str) -> None:
        if self.state != CLOSED:
            self._out(text.encode("utf-8", "replace"))

    def _send(self, reply: Reply) -> None:
        if self.state != CLOSED:
            self._out(reply.to_bytes())
            counters = self.gateway.reply_counters
            if counters is not None:
                counters[reply.code // 100].inc()

    def _out(self, data: bytes) -> None:
        """Write a reply.  On a plain TCP connection with nothing queued the
        bytes go to the socket at once: Twisted would register for
        writability and send on the next reactor turn, two epoll changes
        and a turn of latency per reply, which profiling showed to be the
        largest cost per message.  Anything not sent is queued as usual."""
        transport = self.transport
        if (_EAGER_WRITES and isinstance(transport, tcp.Connection)
                and not transport.TLS and not transport.dataBuffer and not transport._tempDataBuffer
                and not transport.disconnecting):
            try:
                sent = transport.socket.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                transport.write(data)  # let Twisted see and report the error
                return
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    def _close(self) -> None:
        self.state = CLOSED
        self._cancel_timer()
        del self._inbuf[:]
        self.transport.loseConnection()

    def _error(self, reply: Reply) -> None:
        """Answer a bad command; too many of them close the connection."""
        self._bad_commands += 1
        if self._bad_commands >= self.limits.max_bad_commands:
            self._send(R.TOO_MANY_ERRORS)
            self._close()
        else:
            self._send(reply)

    def _restart_timer(self) -> None:
        timeout = self.limits.data_timeout if self.state == DATA else self.limits.command_timeout
        if self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self.clock.callLater(timeout, self.timeoutConnection)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- commands ----------------------------------------------------------

    def _command(self, raw: bytes) -> None:
        if self._tls_pending:
            self._tls_pending = False
            self.session.tls = tls_info(self.transport)
            if self.session.tls is not None and self.gateway.metrics is not None:
                self.gateway.metrics.tls_sessions.labels(self.listener.name, self.session.tls.version).inc()
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._error(Reply(500, "5.5.2", "Invalid UTF-8 in command"))
            return
        verb, _, argument = line.partition(" ")
        handler = getattr(self, "smtp_" + verb.upper(), None) if verb.isalpha() else None
        if handler is None:
            self._error(R.SYNTAX_ERROR)
            return
        handler(argument.strip(" "))

    def _ehlo_lines(self) -> list[str]:
        lines = ["PIPELINING", f"SIZE {self.config.server.max_message_size}", "8BITMIME",
                 "ENHANCEDSTATUSCODES", "SMTPUTF8"]
        if self._can_starttls():
            lines.append("STARTTLS")
        if self._can_auth():
            lines.append("AUTH PLAIN LOGIN")
        return lines

    def smtp_EHLO(self, argument: str) -> None:
        self._hello(argument, esmtp=True)

    def smtp_HELO(self, argument: str) -> None:
        self._hello(argument, esmtp=False)

    def _hello(self, argument: str, esmtp: bool) -> None:
        if not argument or any(c in argument for c in " \t") or not argument.isprintable():
            self._error(Reply(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname"))
            return
        self._reset_transaction()

        def done(outcome: Outcome) -> None:
            if self._refused(outcome):
                return
            self.session.helo = argument
            self.session.esmtp = esmtp
            greeting = f"{self.config.server.hostname} Hello {argument} [{self.session.peer}]"
            if not esmtp:
                self._write_raw(f"250 {greeting}\r\n")
                return
            lines = [greeting] + self._ehlo_lines()
            text = "".join(f"250-{l}\r\n" for l in lines[:-1]) + f"250 {lines[-1]}\r\n"
            self._write_raw(text)

        self._after(self.pipeline.run("helo", self.session, argument), done)

    def smtp_NOOP(self, argument: str) -> None:
        self._send(R.NOOP_OK)

    def smtp_RSET(self, argument: str) -> None:
        if argument:
            self._error(R.ARGUMENT_ERROR)
            return
        self._reset_transaction()
        self._send(R.RESET_OK)

    def smtp_QUIT(self, argument: str) -> None:
        self._send(Reply(221, "2.0.0", "Bye"))
        self._close()

    def smtp_HELP(self, argument: str) -> None:
        self._send(Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY"
                         + (" STARTTLS" if self._can_starttls() else "")))

    def smtp_VRFY(self, argument: str) -> None:
        if not argument:
            self._error(R.ARGUMENT_ERROR)
            return
        self._send(R.VRFY_CANNOT)

    def smtp_EXPN(self, argument: str) -> None:
        self._send(R.EXPN_DISABLED)

    def smtp_STARTTLS(self, argument: str) -> None:
        if self.session.tls is not None:
            self._send(R.TLS_ALREADY)
            return
        if not self._can_starttls():
            self._error(R.NO_TLS_HERE)
            return
        if argument:
            self._error(R.ARGUMENT_ERROR)
            return
        self._send(R.START_TLS)
        # RFC 3207 §4.2 / CVE-2011-0411: nothing the client sent before the
        # handshake may be executed, and nothing learned before it is kept.
        del self._inbuf[:]
        self.transport.startTLS(self.ctx)
        old = self.session
        self.session = Session(id=old.id, listener=old.listener, peer=old.peer,
                               peer_port=old.peer_port, peer_name=old.peer_name, trusted=old.trusted)
        self.transaction = None
        self._tls_pending = True

    def _tls_required(self) -> bool:
        return self.listener.tls == "starttls-required" and self.session.tls is None

    def smtp_MAIL(self, argument: str) -> None:
        if self._tls_required():
            self._error(R.TLS_REQUIRED)
            return
        if self.session.helo is None:
            self._error(R.NEED_HELO)
            return
        if self.transaction is not None:
            self._error(R.NESTED_MAIL)
            return
        if self.listener.require_auth and self.session.auth_user is None and not self._trusted_peer():
            # RFC 4954 §6 / Postfix permit_sasl_authenticated, reject: a
            # submission port takes mail only from users who logged in.
            self._error(Reply(530, "5.7.0", "Authentication required"))
            return
        if argument[:5].upper() != "FROM:":
            self._error(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
            return
        path = argument[5:]
        utf8 = "SMTPUTF8" in path.upper()
        try:
            sender, params = parse_path(path, smtputf8=utf8, allow_null=True, sender=True)
        except AddressError as exc:
            self._error(Reply(501 if exc.status != "5.6.7" else 553, exc.status, str(exc) or "Bad sender address syntax"))
            return
        problem = self._mail_params(params)
        if problem is not None:
            self._error(problem)
            return
        if not self._sender_allowed(sender):
            self._send(Reply(553, "5.7.1", f"Sender address <{sender}> not owned by user {self.session.auth_user}"))
            return
        size = params.get("SIZE")
        transaction = Transaction(sender=sender, mail_params=params,
                                  size_hint=int(size) if size else None, started=time.monotonic())

        def done(outcome: Outcome) -> None:
            if self._refused(outcome):
                return
            transaction.add_headers.extend(outcome.add_headers)
            self.transaction = transaction
            self._send(outcome.reply or R.SENDER_OK)

        self._after(self.pipeline.run("mail", self.session, transaction, sender), done)

    def _refused(self, outcome: Outcome) -> bool:
        """Answer a failed stage (and close when it asks); True if it failed."""
        if not outcome.failed:
            return False
        self._send(outcome.reply)
        if outcome.disconnect:
            self._close()
        return True

    def _trusted_peer(self) -> bool:
        """True for clients in [server] trusted_networks (internal servers)."""
        if self.session.trusted:
            return True
        address = self.session.peer_ip
        return any(address in network for network in self.config.server.trusted_networks
                   if network.version == address.version)

    def _mail_params(self, params: dict[str, str | None]) -> Reply | None:
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    return Reply(501, "5.5.4", "Bad SIZE parameter")
                if int(value) > self.config.server.max_message_size:
                    return R.MESSAGE_TOO_BIG
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return Reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
            elif key == "SMTPUTF8":
                if value is not None:
                    return Reply(501, "5.5.4", "SMTPUTF8 takes no value")
            else:
                return R.PARAM_UNKNOWN
        return None

    def smtp_RCPT(self, argument: str) -> None:
        if self._tls_required():
            self._error(R.TLS_REQUIRED)
            return
        transaction = self.transaction
        if transaction is None:
            self._error(R.NEED_MAIL)
            return
        if argument[:3].upper() != "TO:":
            self._error(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
            return
        path = argument[3:].strip()
        if path.lower().startswith("<postmaster>"):
            # RFC 5321 §4.1.1.3: the unqualified postmaster is always ours;
            # relay_guard treats postmaster@<hostname> as a local destination.
            path = f"<postmaster@{self.config.server.hostname}>" + path[len("<postmaster>"):]
        try:
            mailbox, params = parse_path(path, smtputf8="SMTPUTF8" in transaction.mail_params)
        except AddressError as exc:
            self._error(Reply(501 if exc.status != "5.6.7" else 553, exc.status, str(exc) or "Bad recipient address syntax"))
            return
        if params:
            self._error(R.PARAM_UNKNOWN)
            return
        if len(transaction.recipients) >= self.config.server.max_recipients:
            self._send(R.TOO_MANY_RECIPIENTS)
            return
        recipient = Recipient(mailbox=mailbox, params=params)

        def relay_done(outcome: Outcome) -> None:
            if outcome.action is not Action.ACCEPT:
                self._send(outcome.reply or R.RELAY_DENIED)
                if outcome.disconnect:
                    self._close()
                return
            transaction.add_headers.extend(outcome.add_headers)
            self._after(self.pipeline.run("rcpt", self.session, transaction, recipient), rcpt_done)

        def rcpt_done(outcome: Outcome) -> None:
            if self._refused(outcome):
                return
            if self.transaction is not transaction:
                self._send(R.NEED_MAIL)
                return
            transaction.add_headers.extend(outcome.add_headers)
            transaction.recipients.append(recipient)
            self._send(outcome.reply or R.RECIPIENT_OK)

        self._after(self.pipeline.run("relay", self.session, transaction, recipient), relay_done)

    def smtp_DATA(self, argument: str) -> None:
        if self._tls_required():
            self._error(R.TLS_REQUIRED)
            return
        if self.transaction is None:
            self._error(R.NEED_MAIL)
            return
        if not self.transaction.recipients:
            self._error(R.NEED_RCPT)
            return
        if argument:
            self._error(R.ARGUMENT_ERROR)
            return
        try:
            writer = self.gateway.spool.open_message()
        except QueueError as exc:
            self.log.error("spool unwritable: {reason}", reason=str(exc))
            self._send(R.STORAGE_FAILED)
            self._reset_transaction()
            return
        self.transaction.queue_id = writer.queue_id
        self._data = IncomingMessage(writer, self.config.server.max_message_size,
                                self.limits.max_text_line, self.limits.max_header_size)
        self._data.started = time.time()
        if not self.listener.submission:
            self._data.authserv_id = self.config.server.hostname
        self.state = DATA
        self._restart_timer()
        self._send(R.START_DATA)

    # -- DATA --------------------------------------------------------------

    def _feed_data(self) -> None:
        data = self._data
        content, consumed, done = data.decoder.feed(bytes(self._inbuf))
        del self._inbuf[:consumed]
        if content:
            data.add(content)
        if done:
            self.state = COMMAND
            self._restart_timer()
            self._busy = True
            self._after(defer.ensureDeferred(self._end_of_data(data)), self._finish_data)

    def _finish_data(self, result: tuple[Reply, bool]) -> None:
        reply, close = result
        self._send(reply)
        if close:
            self._close()

    async def _end_of_data(self, data: "IncomingMessage") -> tuple[Reply, bool]:
        """Check, commit and answer one message.  Runs with input held."""
        self._data = None
        session, transaction = self.session, self.transaction
        self.transaction = None
        data.finish()
        problem = data.problem()
        if problem is not None:
            data.abort()
            self._log_transaction(session, transaction, problem, data.decoder.size)
            return problem, False
        headers = _HEADER_PARSER.parsebytes(bytes(data.header_block))
        if len(headers.get_all("Received") or ()) > self.config.server.max_received_headers:
            data.abort()
            self._log_transaction(session, transaction, R.TOO_MANY_HOPS, data.decoder.size)
            return R.TOO_MANY_HOPS, False
        try:
            data.writer.flush()
        except QueueError as exc:
            data.abort()
            self.log.error("spool write failed: {reason}", reason=str(exc))
            return R.STORAGE_FAILED, False
        added: list[tuple[str, str]] = list(transaction.add_headers)
        for stage, argument in (("headers", headers),
                                ("message", MessageView(headers, data.decoder.size, data.writer.open_content))):
            outcome = self.pipeline.run(stage, session, transaction, argument)
            if isinstance(outcome, defer.Deferred):
                outcome = await outcome
            if outcome.failed:
                data.abort()
                self._log_transaction(session, transaction, outcome.reply, data.decoder.size)
                return outcome.reply, outcome.disconnect
            added.extend(outcome.add_headers)
        if not self.listener.submission:
            added.insert(0, ("Authentication-Results",
                             authentication_results(self.config.server.hostname, transaction.notes)))
        if data.forged_removed:
            self.log.info("{queue_id}: removed {count} forged Authentication-Results header(s)",
                          queue_id=transaction.queue_id, count=data.forged_removed)
        envelope = self._envelope(session, transaction, headers, added, data)
        metrics = self.gateway.metrics
        commit_started = time.monotonic()
        try:
            queue_id = await self.gateway.spool.commit(data.writer, envelope)
        except QueueError as exc:
            self.log.error("queue commit failed for {queue_id}: {reason}",
                           queue_id=transaction.queue_id, reason=str(exc))
            self._log_transaction(session, transaction, R.STORAGE_FAILED, data.decoder.size)
            return R.STORAGE_FAILED, False
        reply = Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
        if metrics is not None:
            metrics.commit_seconds.observe(time.monotonic() - commit_started)
            metrics.messages_accepted.labels(self.listener.name).inc()
            metrics.bytes_accepted.labels(self.listener.name).inc(data.decoder.size)
            metrics.record_transaction_notes(transaction.notes, added)
        self._log_transaction(session, transaction, reply, data.decoder.size)
        self.gateway.message_queued(queue_id)
        observed = self.pipeline.run("queued", session, transaction, queue_id)
        if isinstance(observed, defer.Deferred):
            observed.addErrback(lambda f: self.log.failure("queued observer failed", f))
        return reply, False

    def _envelope(self, session: Session, transaction: Transaction, headers: Any,
                  added: list[tuple[str, str]], data: "IncomingMessage") -> Envelope:
        now = time.time()
        hostname = self.config.server.hostname
        recipients = [r.address for r in transaction.recipients]
        tls = (session.tls.version, session.tls.cipher) if session.tls else None
        prepend = [": ".join(received_header(
            helo=session.helo, peer=session.peer, peer_name=session.peer_name,
            hostname=hostname, protocol=session.protocol, queue_id=transaction.queue_id,
            recipients=recipients, tls=tls, now=now))]
        prepend.extend(f"{name}: {value}" for name, value in added)
        if self.listener.submission:
            if headers.get("Date") is None:
                prepend.append(f"Date: {format_date(now)}")
            if headers.get("Message-ID") is None:
                prepend.append(f"Message-ID: {message_id(transaction.queue_id, hostname)}")
        return Envelope(
            queue_id=transaction.queue_id, sender=transaction.sender_address,
            recipients=[EnvelopeRecipient(address=a) for a in recipients],
            received_at=now, listener=self.listener.name, client_address=session.peer,
            client_name=session.peer_name, helo=session.helo, auth_user=session.auth_user,
            protocol=session.protocol, mail_params=dict(transaction.mail_params),
            prepend_headers=prepend, size=data.decoder.size, next_attempt=now,
        )

    def _log_transaction(self, session: Session, transaction: Transaction, reply: Reply, size: int) -> None:
        metrics = self.gateway.metrics
        if metrics is not None:
            outcome = "accepted" if reply.code < 400 else "tempfailed" if reply.code < 500 else "rejected"
            metrics.transactions.labels(self.listener.name, outcome).inc()
            if transaction.started:
                metrics.transaction_seconds.observe(time.monotonic() - transaction.started)
        self.log.info(
            "{queue_id} listener={listener} client={client} helo={helo} sender=<{sender}> "
            "rcpt={rcpt} size={size} tls={tls} auth={auth} plugins=[{plugins}] reply=\"{reply}\"",
            queue_id=transaction.queue_id or "-", listener=session.listener, client=session.peer,
            helo=session.helo, sender=transaction.sender_address,
            rcpt=",".join(r.address for r in transaction.recipients), nrcpt=len(transaction.recipients),
            size=size, tls=session.tls.version if session.tls else "no",
            auth=session.auth_user or "-", plugins=transaction.results.summary(), reply=str(reply),
        )

    def _reset_transaction(self) -> None:
        self.transaction = None


class GatewaySMTPFactory(smtp.SMTPFactory):
    """Builds L{GatewaySMTP} for one listener.

    @ivar limiter: shared by all listeners (global and per-IP limits).
    @ivar open_connections: the live protocols, for a clean shutdown.
    """

    protocol = GatewaySMTP
    noisy = False

    def __init__(self, listener: ListenerConfig, config: GatewayConfig, pipeline: Pipeline,
                 spool: Spool, clock: IReactorTime, limiter: ConnectionLimiter,
                 tls_context: Any = None, on_queued: Callable[[str], None] | None = None,
                 checker: Any = None, auth_failures: Any = None, resolver: Any = None,
                 metrics: Any = None) -> None:
        smtp.SMTPFactory.__init__(self)
        self.listener = listener
        self.config = config
        self.pipeline = pipeline
        self.spool = spool
        self.clock = clock
        self.limiter = limiter
        self.tls_context = tls_context
        self.open_connections: set[GatewaySMTP] = set()
        self._on_queued = on_queued
        self.checker = checker
        self.resolver = resolver
        self.metrics = metrics
        self.reply_counters = None
        if metrics is not None:
            self.reply_counters = {n: metrics.replies.labels(listener.name, f"{n}xx") for n in (2, 3, 4, 5)}
        if auth_failures is None:
            from gateway.credentials import FailureCounter
            auth_failures = FailureCounter(clock)
        self.auth_failures = auth_failures

    def buildProtocol(self, addr: Any) -> GatewaySMTP:
        protocol = GatewaySMTP(self)
        protocol.factory = self
        return protocol

    def message_queued(self, queue_id: str) -> None:
        """Tell the delivery side (if any) that C{queue_id} is waiting."""
        if self._on_queued is not None:
            self._on_queued(queue_id)
