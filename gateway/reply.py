"""SMTP replies with enhanced status codes, and the table of standard ones.

Every reply the gateway sends carries an RFC 3463 enhanced status code, so a
client (or an admin reading a bounce) can tell *why* without parsing prose.
Replies are values: plugins build them, the server only formats them.

Standards: RFC 5321 §4.2 (reply codes, multiline replies), RFC 2034 and
RFC 3463 (enhanced status codes).
See also: aiosmtpd C{testing/statuscodes.py}; Postfix C{smtpd(8)} replies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: a three-digit code, an enhanced status and text.

    @ivar code: the basic reply code (RFC 5321 §4.2).
    @ivar status: the enhanced status code, e.g. C{"5.7.1"}; its class must
        agree with the first digit of C{code} (RFC 3463 §2).
    @ivar text: human text; may contain newlines for a multiline reply.
    """

    code: int
    status: str
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code}")
        if self.status == "" and 300 <= self.code < 400:
            pass  # RFC 2034 §3 defines no status class for 3xx replies.
        elif (match := _STATUS.match(self.status)) is None:
            raise ValueError(f"malformed enhanced status code: {self.status!r}")
        elif int(match.group(1)) != self.code // 100:
            raise ValueError(
                f"enhanced status {self.status} does not match reply code {self.code}"
            )
        if "\r" in self.text:
            raise ValueError("reply text must not contain CR")

    @property
    def is_positive(self) -> bool:
        """True for 2xx and 3xx replies."""
        return self.code < 400

    @property
    def is_temporary(self) -> bool:
        """True for 4xx replies."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """True for 5xx replies."""
        return self.code >= 500

    def to_bytes(self) -> bytes:
        """Format for the wire: every line carries code and status (RFC 2034 §4)."""
        lines = self.text.split("\n") or [""]
        out = []
        last = len(lines) - 1
        for index, line in enumerate(lines):
            sep = " " if index == last else "-"
            status = f"{self.status} " if self.status else ""
            out.append(f"{self.code}{sep}{status}{line}\r\n")
        return "".join(out).encode("utf-8", "replace")

    def with_text(self, text: str) -> "Reply":
        """The same code and status with another text."""
        return Reply(self.code, self.status, text)

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}".replace("  ", " ")


def soften(reply: Reply) -> Reply:
    """Turn a 5xx reply into its 4xx twin (Postfix C{soft_bounce})."""
    if not reply.is_permanent:
        return reply
    return Reply(reply.code - 100, "4" + reply.status[1:], reply.text)


# Standard replies.  Tests compare against these names.
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
RESET_OK = Reply(250, "2.0.0", "Reset ok")
NOOP_OK = Reply(250, "2.0.0", "Ok")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
VRFY_CANNOT = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
EXPN_DISABLED = Reply(502, "5.5.1", "EXPN not available")
START_TLS = Reply(220, "2.0.0", "Ready to start TLS")

SYNTAX_ERROR = Reply(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
ARGUMENT_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_HELO = Reply(503, "5.5.1", "Send HELO/EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command")
NESTED_MAIL = Reply(503, "5.5.1", "Nested MAIL command")
PARAM_UNKNOWN = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
NO_TLS_HERE = Reply(502, "5.5.1", "STARTTLS not available")
TLS_ALREADY = Reply(503, "5.5.1", "TLS already active")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication Exchange line is too long")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "SMTPUTF8 required for non-ASCII addresses")

TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
HEADER_TOO_BIG = Reply(552, "5.3.4", "Message header exceeds fixed limit")
TEXT_LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long (limit 1000 octets including CRLF)")
BARE_NEWLINE = Reply(550, "5.5.2", "Bare <CR> or <LF> in message; lines must end with <CR><LF>")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many Received headers: mail loop?")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")

STORAGE_FAILED = Reply(452, "4.3.1", "Insufficient system storage")
PLUGIN_FAILED = Reply(451, "4.3.0", "Temporary local problem, please try again later")
PLUGIN_TIMEOUT = Reply(451, "4.4.5", "Temporary local problem (check timed out), please try again later")

TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
