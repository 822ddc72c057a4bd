"""SMTP AUTH on the server side: PLAIN and LOGIN over TLS, checked through
twisted.cred, with failure throttling and the sender-login check.

A mixin of L{gateway.server.GatewaySMTP}: it uses the protocol's
C{_send}, C{_error}, C{_after} and C{_close}, and the factory's
C{checker} and C{auth_failures}.  AUTH is offered only on listeners with
C{auth = true}, only after TLS, never twice in a session, and never during
a transaction.

Standards: RFC 4954 (AUTH, its replies and the 12288-octet line limit),
RFC 4616 (PLAIN), draft-murchison-sasl-login (LOGIN), RFC 3207 §4.2.
See also: Postfix smtpd_sasl_*, reject_sender_login_mismatch.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Callable

from twisted.internet import defer, task

from gateway import reply as R
from gateway.address import Mailbox
from gateway.reply import Reply

#: RFC 4954 §4: an AUTH exchange line may be 12288 octets plus CRLF.
AUTH_LINE_LIMIT = 12288 + 2


class SMTPAuthMixin:
    """The AUTH command and the checks that depend on who logged in."""

    def _can_auth(self) -> bool:
        """AUTH is offered only on auth listeners, only over TLS."""
        return (self.listener.auth and self.session.tls is not None
                and self.gateway.checker is not None and self.session.auth_user is None)

    def _can_starttls(self) -> bool:
        return (self.ctx is not None and self.session.tls is None
                and self.listener.tls in ("starttls", "starttls-required"))

    def smtp_AUTH(self, argument: str) -> None:
        """SMTP AUTH PLAIN and LOGIN (RFC 4954, RFC 4616), over TLS only."""
        session = self.session
        if not self.listener.auth or self.gateway.checker is None:
            self._error(Reply(502, "5.5.1", "AUTH not available"))
            return
        if session.tls is None:
            self._error(R.TLS_REQUIRED)
            return
        if session.helo is None:
            self._error(R.NEED_HELO)
            return
        if session.auth_user is not None:
            self._error(Reply(503, "5.5.1", "Already authenticated"))
            return
        if self.transaction is not None:
            self._error(Reply(503, "5.5.1", "AUTH not permitted during a mail transaction"))
            return
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        if not mechanism:
            self._error(Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"))
            return
        if mechanism not in ("PLAIN", "LOGIN"):
            self._error(Reply(504, "5.5.4", "Unrecognized authentication type"))
            return
        if self.gateway.auth_failures.blocked(session.peer):
            self._auth_refused()
            return
        initial = initial.strip()
        if mechanism == "PLAIN":
            if initial:
                self._auth_plain(initial.encode())
            else:
                self._challenge("", self._auth_plain)
        elif initial:
            self._auth_login_user(initial.encode())
        else:
            self._challenge("Username:", self._auth_login_user)

    def _auth_refused(self) -> None:
        self._auth_refusals += 1
        self.log.warn("AUTH refused for {client}: too many failures", client=self.session.peer)
        if self._auth_refusals >= 3:
            self._send(Reply(421, "4.7.0", "Too many authentication failures, closing connection"))
            self._close()
        else:
            self._send(Reply(454, "4.7.0", "Too many authentication failures, try again later"))

    def _challenge(self, prompt: str, step: Callable[[bytes], None]) -> None:
        self._auth_step = step
        encoded = base64.b64encode(prompt.encode()).decode() if prompt else ""
        self._write_raw(f"334 {encoded}\r\n")

    def _decode(self, data: bytes) -> bytes | None:
        """Base64 of an AUTH response; None after answering an error."""
        if data == b"*":
            self._error(Reply(501, "5.0.0", "Authentication cancelled"))
            return None
        if data == b"=":
            return b""
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            self._error(Reply(501, "5.5.2", "Cannot decode AUTH response (bad base64)"))
            return None

    def _auth_plain(self, data: bytes) -> None:
        decoded = self._decode(data)
        if decoded is None:
            return
        if not decoded:
            self._auth_check(b"", b"")  # an empty response is a failed login (RFC 4954 §4)
            return
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            self._error(Reply(501, "5.5.2", "Malformed AUTH PLAIN response"))
            return
        authzid, user, password = parts
        if authzid and authzid != user:
            self._auth_check(user, b"\0invalid-authzid\0")
            return
        self._auth_check(user, password)

    def _auth_login_user(self, data: bytes) -> None:
        user = self._decode(data)
        if user is None:
            return
        self._challenge("Password:", lambda line: self._auth_login_password(user, line))

    def _auth_login_password(self, user: bytes, data: bytes) -> None:
        password = self._decode(data)
        if password is None:
            return
        self._auth_check(user, password)

    def _auth_check(self, user_bytes: bytes, password_bytes: bytes) -> None:
        from twisted.cred.credentials import UsernamePassword

        user = user_bytes.decode("utf-8", "replace")
        session = self.session
        failures = self.gateway.auth_failures
        if failures.blocked(session.peer, user):
            self._auth_refused()
            return
        if not user or not password_bytes or b"\0invalid-authzid\0" == password_bytes:
            from twisted.cred.error import UnauthorizedLogin
            d: Any = defer.fail(UnauthorizedLogin("empty or invalid credentials"))
        else:
            d = defer.maybeDeferred(self.gateway.checker.requestAvatarId,
                                    UsernamePassword(user_bytes, password_bytes))
            d.addTimeout(self.limits.plugin_timeout, self.clock)

        def succeeded(avatar: Any) -> None:
            name = avatar.decode() if isinstance(avatar, bytes) else str(avatar)
            session.auth_user = name
            if self.gateway.metrics is not None:
                self.gateway.metrics.auth.labels("success").inc()
            self.log.info("AUTH success user={user} client={client}", user=name, client=session.peer)
            self._send(Reply(235, "2.7.0", "Authentication successful"))

        def failed(failure: Any) -> Any:
            from twisted.cred.error import UnauthorizedLogin

            if not failure.check(UnauthorizedLogin):
                # The checker itself failed (users file broken, time-out):
                # not the client's fault, so nothing is counted against it.
                self.log.failure("AUTH checker failed for user={user} client={client}: {reason}", failure,
                                 user=user, client=session.peer, reason=str(failure.value))
                return Reply(454, "4.7.0", "Temporary authentication failure")
            if self.gateway.metrics is not None:
                self.gateway.metrics.auth.labels("failure").inc()
            delay = failures.record(session.peer, user)
            self.log.info("AUTH failure user={user} client={client} failures={failures} delay={delay}",
                          user=user, client=session.peer, failures=failures.failures(session.peer, user),
                          delay=delay)
            reply = Reply(535, "5.7.8", "Authentication credentials invalid")
            if delay > 0:

                return task.deferLater(self.clock, delay, lambda: reply)
            return reply

        def answer(reply: Any) -> None:
            if isinstance(reply, Reply):
                if reply.code == 535:
                    self._bad_commands += 1
                self._send(reply)

        d.addCallbacks(lambda avatar: succeeded(avatar), failed)
        self._after(d, answer)

    def _sender_allowed(self, sender: Mailbox | None) -> bool:
        """An authenticated user may use only the senders granted to them
        (Postfix reject_sender_login_mismatch); <> is always allowed."""
        user = self.session.auth_user
        if user is None or sender is None:
            return True
        granted = self.config.auth.senders.get(user)
        if granted is None:
            granted = (user.lower(),) if "@" in user else ()
        address = str(sender).lower()
        domain = "@" + sender.domain
        return address in granted or domain in granted
