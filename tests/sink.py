"""A real SMTP sink for delivery tests: aiosmtpd (a server we did not
write), running its own asyncio loop in a thread, bound to 127.0.0.1.

It records each message with its envelope, counts connections, and can be
told to answer chosen recipients or DATA with a given reply, to require
STARTTLS and AUTH.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (aiosmtpd needs a fixed port)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class Received:
    """One message as the sink got it."""

    sender: str
    recipients: list[str]
    content: bytes
    tls: bool
    auth_user: str | None


@dataclass
class SinkHandler:
    """aiosmtpd handler: records messages, answers as configured."""

    messages: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, list[str]] = field(default_factory=dict)
    data_replies: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    arrived: threading.Condition | None = None
    #: Seconds to wait after the content arrived before answering DATA (a
    #: slow next hop).  aiosmtpd cancels the handler when the client drops
    #: the connection meanwhile, so a message cut off this way is not
    #: recorded.
    data_delay: float = 0.0

    def __post_init__(self) -> None:
        self.arrived = threading.Condition(self.lock)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list) -> str:
        with self.lock:
            queue = self.rcpt_replies.get(address.lower())
            if queue:
                reply = queue.pop(0) if len(queue) > 1 else queue[0]
                if not reply.startswith("250"):
                    return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        with self.lock:
            if self.data_replies:
                reply = self.data_replies.pop(0)
                if not reply.startswith("250"):
                    return reply
            self.messages.append(Received(
                envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content or envelope.content,
                session.ssl is not None,
                getattr(session, "login_data", None) and session.login_data.decode()
                if isinstance(getattr(session, "login_data", None), bytes) else getattr(session, "login_data", None)))
            self.arrived.notify_all()
        return "250 2.0.0 Message accepted"


class CountingController(Controller):
    """A Controller whose servers count connections."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.connections = 0
        super().__init__(*args, **kwargs)

    def factory(self) -> SMTP:
        self.connections += 1
        return super().factory()


class Sink:
    """Start with L{start}; stop with L{stop}.  C{port} is where it listens."""

    def __init__(self, *, tls_context: Any = None, require_starttls: bool = False,
                 users: dict[str, str] | None = None, host: str = "127.0.0.1",
                 port: int | None = None) -> None:
        """@param host: the loopback address to listen on (another
            127.0.0.0/8 address lets several sinks share one port, as MX
            hosts of one domain must: the relay port is global).
        @param port: the port; default a free one."""
        self.handler = SinkHandler()
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.users = users
        kwargs: dict[str, Any] = {"enable_SMTPUTF8": True}
        if tls_context is not None:
            kwargs["tls_context"] = tls_context
            kwargs["require_starttls"] = require_starttls
        if users is not None:
            kwargs["authenticator"] = self._authenticate
            kwargs["auth_require_tls"] = True
        self.logins: list[str] = []
        self.controller = CountingController(self.handler, hostname=host, port=self.port,
                                             ready_timeout=10, **kwargs)

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        login = auth_data.login.decode() if isinstance(auth_data.login, bytes) else auth_data.login
        password = auth_data.password.decode() if isinstance(auth_data.password, bytes) else auth_data.password
        ok = self.users is not None and self.users.get(login) == password
        if ok:
            self.logins.append(login)
        return AuthResult(success=ok, handled=False)

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    @property
    def connections(self) -> int:
        return self.controller.connections

    def start(self) -> "Sink":
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        """Block (in a thread) until C{count} messages arrived or timeout."""
        with self.handler.arrived:
            self.handler.arrived.wait_for(lambda: len(self.handler.messages) >= count, timeout)
            return list(self.handler.messages)
