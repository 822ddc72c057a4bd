"""The objects pipeline hooks see: one Session per connection, one
Transaction per MAIL command.

The core mutates them; plugins read them and keep their own state in
C{session.notes[plugin_name]}.  A Session is *replaced* after STARTTLS, so
nothing learned in plaintext (HELO, envelope, notes) survives into the TLS
session (RFC 3207 §4.2).

Standards: RFC 5321 §3.3 (mail transactions), RFC 3207 §4.2.
See also: aiosmtpd C{Session}/C{Envelope}; Haraka connection/transaction.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from gateway.address import Mailbox


@dataclass(frozen=True, slots=True)
class TLSInfo:
    """What was negotiated on a TLS session.

    @ivar version: protocol name, e.g. C{"TLSv1.3"}.
    @ivar cipher: cipher suite name.
    """

    version: str
    cipher: str


@dataclass(frozen=True, slots=True)
class PluginResult:
    """One plugin's outcome, for the transaction's summary log line."""

    plugin: str
    result: str
    detail: str = ""


class Results:
    """Per-plugin results collected over a session or transaction.

    Plugins call L{add}; the server logs them once per transaction.
    """

    def __init__(self) -> None:
        self._items: list[PluginResult] = []

    def add(self, plugin: str, result: str, detail: str = "") -> None:
        """Record C{result} (e.g. C{"pass"}, C{"fail"}, C{"skip"}) for C{plugin}."""
        self._items.append(PluginResult(plugin, result, detail))

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def summary(self) -> str:
        """C{plugin=result} pairs for a log line."""
        return " ".join(f"{r.plugin}={r.result}" for r in self._items)


class Notes(dict):
    """Per-plugin scratch space: C{notes[plugin_name]} is a dict of its own."""

    def __missing__(self, key: str) -> dict[str, Any]:
        value: dict[str, Any] = {}
        self[key] = value
        return value


@dataclass(slots=True)
class Recipient:
    """A recipient accepted at RCPT.

    @ivar mailbox: the parsed canonical address; it is the address that was
        checked by the relay gate and the one that is routed.
    @ivar params: RCPT parameters (upper-case keys).
    """

    mailbox: Mailbox
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """The canonical C{local@domain} form."""
        return str(self.mailbox)


@dataclass(slots=True)
class Transaction:
    """One mail transaction: from MAIL to the end of DATA (or RSET).

    @ivar queue_id: assigned when DATA starts spooling.
    @ivar sender: None for the null reverse-path C{<>}.
    @ivar mail_params: MAIL parameters (C{SIZE}, C{BODY}, C{SMTPUTF8}, ...).
    @ivar add_headers: header fields the pipeline asked to prepend.
    @ivar size_hint: the client's C{SIZE=} declaration, if any.
    """

    sender: Mailbox | None
    mail_params: dict[str, str | None] = field(default_factory=dict)
    recipients: list[Recipient] = field(default_factory=list)
    queue_id: str | None = None
    add_headers: list[tuple[str, str]] = field(default_factory=list)
    size_hint: int | None = None
    started: float = 0.0
    results: Results = field(default_factory=Results)
    notes: Notes = field(default_factory=Notes)

    @property
    def sender_address(self) -> str:
        """The reverse-path as text, C{""} for the null sender."""
        return "" if self.sender is None else str(self.sender)


@dataclass(slots=True)
class Session:
    """One client connection (replaced by a fresh one after STARTTLS).

    @ivar id: short unique id for logs.
    @ivar listener: the listener's configured name.
    @ivar peer: the client's IP address as text.
    @ivar peer_port: the client's port.
    @ivar peer_name: the verified reverse name, or None.
    @ivar helo: the HELO/EHLO argument, once given.
    @ivar esmtp: True after EHLO.
    @ivar tls: L{TLSInfo} once TLS is active.
    @ivar auth_user: the authenticated user name, or None.
    @ivar trusted: the client is in C{trusted_networks}.
    """

    id: str
    listener: str
    peer: str
    peer_port: int = 0
    peer_name: str | None = None
    helo: str | None = None
    esmtp: bool = False
    tls: TLSInfo | None = None
    auth_user: str | None = None
    trusted: bool = False
    results: Results = field(default_factory=Results)
    notes: Notes = field(default_factory=Notes)

    @property
    def peer_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """The client address as an C{ipaddress} object."""
        return ipaddress.ip_address(self.peer)

    @property
    def protocol(self) -> str:
        """C{ESMTP}, C{ESMTPS} or C{ESMTPSA} (RFC 3848), or C{SMTP} after HELO."""
        if not self.esmtp:
            return "SMTP"
        name = "ESMTP"
        if self.tls is not None:
            name += "S"
        if self.auth_user is not None:
            name += "A"
        return name
