# -*- test-case-name: tests.test_dsn -*-
"""
Delivery status notifications: build the bounce for a message, with no I/O.

When the gateway gives up on a recipient (a 5xx from the next hop, or a
message that stayed in the queue too long) or wants to warn that delivery is
delayed, it owes the envelope sender a report.  L{build_dsn} turns an
L{Envelope}, the recipients concerned and the original header block into the
complete bytes of that report: a C{multipart/report} with a human
explanation, the machine-readable C{message/delivery-status} and the original
headers.  The caller queues these bytes with the null reverse path, so that a
bounce is never bounced.

The output is built by hand rather than with L{email.generator}, because
the generator re-folds fields, would emit whatever line endings and 8-bit
octets it was given, and gives no guarantee about the blank-line-separated
blocks of C{message/delivery-status}.  Here every line ends in CRLF, no line
exceeds 998 octets, and every body part is 7-bit: the original headers are
passed through untouched when they are printable ASCII and short enough, and
are quoted-printable encoded otherwise.  The only octets that can be 8-bit
are those of an internationalised sender address in C{To:}, which is sent
with SMTPUTF8 anyway (RFC 6531).  The stdlib parser reads the result back
(C{email.message_from_bytes}); the tests hold it to that.

Standards:
    RFC 3464 (message/delivery-status and its fields), RFC 6522
    (multipart/report; text/rfc822-headers), RFC 3463 (enhanced status
    codes), RFC 3461 section 4.4 (ENVID, xtext), RFC 6533 section 3 (the
    utf-8 address type for internationalised recipients), RFC 3834 section 5
    (Auto-Submitted), RFC 5322 sections 2.1.1 and 3.3 (line length, dates),
    RFC 2045 section 6.7 (quoted-printable), RFC 5321 section 4.5.5 (bounces
    are sent with a null reverse path).

See also:
    Postfix bounce(8) and C{bounce_notify_util.c}, L{gateway.queuefile}
    (L{Envelope}), L{gateway.backoff} (when a message is given up as
    expired).
"""

from __future__ import annotations

import binascii
import datetime
import email.utils
import hashlib
import re
import textwrap
from dataclasses import dataclass
from typing import Final

from gateway.queuefile import Envelope

__all__ = [
    "DSN_ACTIONS",
    "SUBJECT_DELAYED",
    "SUBJECT_FAILED",
    "FailedRecipient",
    "build_dsn",
]

DSN_ACTIONS: Final = frozenset({"failed", "delayed"})

SUBJECT_FAILED: Final = "Undelivered Mail Returned to Sender"
SUBJECT_DELAYED: Final = "Delayed Mail (still being retried)"

# RFC 3463 section 2 (and RFC 3464 section 2.3.4): class "." subject "."
# detail, one to three digits each.  A DSN reports failures and delays
# only: class 4 or 5.
_STATUS_RE: Final = re.compile(r"([45])\.[0-9]{1,3}\.[0-9]{1,3}")

# A diagnostic that starts like an SMTP reply is of type "smtp" (RFC 3464
# section 2.3.6); anything else (a connection error, a local decision) is
# not, and gets our own X- type, as Postfix does with "X-Postfix".
_SMTP_REPLY_RE: Final = re.compile(r"[2-5][0-9][0-9](?:[ -]|$)")
_LOCAL_DIAGNOSTIC_TYPE: Final = "X-Mailgateway"

_LINE_BREAK_RE: Final = re.compile(r"\r\n|\r|\n")
# One line of a (possibly multiline) SMTP reply: code, "-" or " ", an
# optional enhanced status code, text.
_REPLY_LINE_RE: Final = re.compile(
    r"([2-5][0-9][0-9])[ -](?:([245]\.[0-9]{1,3}\.[0-9]{1,3}) ?)?(.*)"
)
_LINE_BREAK_BYTES_RE: Final = re.compile(rb"\r\n|\r|\n")
_WHITESPACE_RE: Final = re.compile(r"\s+")

# RFC 5322 section 2.1.1: 998 octets at most, 78 recommended.
_MAX_LINE: Final = 998
_FOLD_AT: Final = 78
# Longest original header line passed through as 7bit; longer ones make
# the part quoted-printable, whose soft line breaks keep it under 76.
_MAX_RAW_HEADER_LINE: Final = 990
# A word longer than this is cut when folding, so no line can pass 998.
_MAX_WORD: Final = 900
_TEXT_WIDTH: Final = 76

# RFC 6533 section 3, QCHAR: printable ASCII except "+", "=" and "\".
_QCHAR: Final = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"+", "=", "\\"}


@dataclass(frozen=True)
class FailedRecipient:
    """
    One recipient to report on, with what the last attempt learnt.

    The scheduler makes one of these per recipient it gives up on (or, with
    C{action="delayed"}, warns about); the fields map one to one onto the
    per-recipient block of the report, so checking them here means a bad
    status code is found where it is made rather than by the sender's mail
    client.

    @ivar address: The original envelope recipient, as in
        L{EnvelopeRecipient.address}.
    @ivar status: RFC 3463 code: C{5.x.x} for permanent failures,
        C{4.x.x} for delays and for temporary failures given up on (C{4.4.7}
        when the message expired in the queue).
    @ivar diagnostic: The remote reply, e.g. C{"550 5.1.1 No such user"}
        (multiline replies may keep their line breaks), or a local reason such
        as C{"connection refused"}; L{None} when there is none.
    @ivar remote_mta: Host name of the next hop that gave the reply.
    @ivar action: C{"failed"} or C{"delayed"} (RFC 3464 section 2.3.3).
    @ivar last_attempt: Unix time of the last delivery attempt, if any.
    @raise ValueError: If C{action}, C{status} or C{address} is malformed.
    """

    address: str
    status: str
    diagnostic: str | None
    remote_mta: str | None
    action: str = "failed"
    last_attempt: float | None = None

    def __post_init__(self) -> None:
        if not self.address or _has_control(self.address):
            raise ValueError(f"not a recipient address: {self.address!r}")
        if self.action not in DSN_ACTIONS:
            raise ValueError(f"unknown DSN action {self.action!r}")
        match = _STATUS_RE.fullmatch(self.status)
        if match is None:
            raise ValueError(f"not an RFC 3463 failure or delay status: {self.status!r}")
        if self.action == "delayed" and match.group(1) != "4":
            raise ValueError(f"a delay needs a 4.x.x status, not {self.status}")


def build_dsn(
    *,
    reporting_mta: str,
    original: Envelope,
    failed: list[FailedRecipient],
    original_headers: bytes,
    now: float,
    message_id: str,
    reason: str | None = None,
) -> bytes:
    """
    Build the delivery status notification for C{original}.

    The report goes to the original envelope sender; the caller sends it
    with the null reverse path C{MAIL FROM:<>}.  It is a failure report
    (subject L{SUBJECT_FAILED}) unless every recipient's action is
    C{delayed}, in which case it is a warning (L{SUBJECT_DELAYED}).  Only
    the headers of the original message are returned, never its body: that
    keeps the report small and avoids sending content back to a forged
    sender.

    @param reporting_mta: This gateway's host name, for C{Reporting-MTA}
        and the C{From:} address C{MAILER-DAEMON@reporting_mta}.
    @param original: The envelope of the message reported on; its
        C{sender}, C{queue_id}, C{received_at} and C{mail_params["ENVID"]}
        are used.
    @param failed: The recipients to report, in the order to list them.
    @param original_headers: The raw header block of the original message
        (with or without the blank line that ends it, with any line
        endings); anything after a blank line is ignored.
    @param now: Unix time for the C{Date:} field.
    @param message_id: The C{Message-ID:} value, e.g. from
        L{gateway.trace.message_id}; angle brackets are added if missing.
    @param reason: An optional sentence for the human-readable part, e.g.
        why the message was given up.
    @return: The whole message, CRLF line endings, no line longer than 998
        octets.  It is 7-bit ASCII except when C{original.sender} is not
        ASCII: then C{To:} holds it in UTF-8 and the report must be sent
        with SMTPUTF8, like the original.
    @raise ValueError: If C{original.sender} is empty (a bounce is never
        bounced: the caller logs and drops it), if C{failed} is empty, or if
        C{reporting_mta} or C{message_id} is unusable.
    """
    if original.sender == "":
        raise ValueError("the original sender is null: a bounce is never bounced")
    if not failed:
        raise ValueError("a DSN needs at least one recipient")
    if _has_control(original.sender):
        raise ValueError(f"not a sender address: {original.sender!r}")
    reporter = _dns_name(reporting_mta)
    if not reporter:
        raise ValueError(f"not a host name: {reporting_mta!r}")
    message_id = message_id.strip()
    if (
        not message_id
        or not message_id.isascii()
        or _has_control(message_id)
        or " " in message_id
    ):
        raise ValueError(f"not a message id: {message_id!r}")
    if not message_id.startswith("<"):
        message_id = f"<{message_id}>"

    all_delayed = all(r.action == "delayed" for r in failed)
    text_type, text_cte, text_body = _text_part(reporter, original, failed, reason)
    status_body = _status_part(reporter, original, failed)
    headers_type, headers_cte, headers_body = _headers_part(original_headers)
    boundary = _boundary(message_id, [text_body, status_body, headers_body])

    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporter}>",
        f"To: <{original.sender}>",
        f"Subject: {SUBJECT_DELAYED if all_delayed else SUBJECT_FAILED}",
        f"Date: {_format_date(now)}",
        f"Message-ID: {message_id}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        f"Content-Type: {text_type}",
        f"Content-Transfer-Encoding: {text_cte}",
        "",
        *text_body,
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "Content-Transfer-Encoding: 7bit",
        "",
        *status_body,
        "",
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers",
        f"Content-Type: {headers_type}",
        f"Content-Transfer-Encoding: {headers_cte}",
        "",
        *headers_body,
        "",
        f"--{boundary}--",
        "",
    ]
    # Only the To: address can carry non-ASCII (RFC 6532); everything else
    # is ASCII by construction.  surrogateescape gives back the very octets
    # of an address that arrived as non-UTF-8.
    return "\r\n".join(lines).encode("utf-8", "surrogateescape")


def _text_part(
    reporter: str,
    original: Envelope,
    failed: list[FailedRecipient],
    reason: str | None,
) -> tuple[str, str, list[str]]:
    """
    The human-readable explanation, as (content type, transfer encoding,
    lines).  Wrapped at 76 columns; UTF-8 quoted-printable when it is not
    plain ASCII, so that the part stays 7-bit.
    """
    permanent = [r for r in failed if r.action == "failed"]
    delayed = [r for r in failed if r.action == "delayed"]
    paragraphs: list[str] = [f"This is the mail delivery system at {reporter}."]
    received = _format_date(original.received_at)
    if permanent:
        paragraphs.append(
            f"Your message (queue id {original.queue_id}, received {received}) "
            "could not be delivered to one or more recipients. The mail "
            "system has given up on them, and will not try again."
        )
    else:
        paragraphs.append(
            f"Your message (queue id {original.queue_id}, received {received}) "
            "has not yet been delivered to one or more recipients. The mail "
            "system is still trying; you do not need to send it again."
        )
    if reason:
        paragraphs.append(_clean_text(reason))
    paragraphs.append(
        "The recipients and the reasons are listed below, and the headers "
        "of your message are attached. If you need help, forward this "
        f"report to the postmaster of {reporter}."
    )

    wrapper = textwrap.TextWrapper(
        width=_TEXT_WIDTH, break_long_words=True, break_on_hyphens=False
    )
    lines: list[str] = []
    for paragraph in paragraphs:
        lines.extend(wrapper.wrap(paragraph))
        lines.append("")
    sections = [
        ("Delivery failed permanently for:", permanent),
        ("Delivery is delayed, and will be retried, for:", delayed),
    ]
    for title, recipients in sections:
        if not recipients:
            continue
        lines.append(title)
        lines.append("")
        for recipient in recipients:
            lines.extend(wrapper.wrap(f"<{_clean_text(recipient.address)}>"))
            detail = textwrap.TextWrapper(
                width=_TEXT_WIDTH,
                initial_indent="    ",
                subsequent_indent="    ",
                break_long_words=True,
                break_on_hyphens=False,
            )
            lines.extend(detail.wrap(_recipient_explanation(recipient)))
            lines.append("")
    while lines and lines[-1] == "":
        lines.pop()

    text = "\n".join(lines)
    if text.isascii():
        return "text/plain; charset=us-ascii", "7bit", lines
    encoded = binascii.b2a_qp(text.encode("utf-8") + b"\n", istext=True)
    return (
        "text/plain; charset=utf-8",
        "quoted-printable",
        encoded.decode("ascii").rstrip("\n").split("\n"),
    )


def _recipient_explanation(recipient: FailedRecipient) -> str:
    """
    One sentence on what happened to C{recipient}, quoting the remote
    server's own words where we have them, because that is what a sender
    (or their postmaster) can act on.
    """
    diagnostic = _clean_text(_join_reply(recipient.diagnostic)) if recipient.diagnostic else ""
    host = _clean_text(recipient.remote_mta) if recipient.remote_mta else ""
    if diagnostic and host:
        return f"host {host} said: {diagnostic} (status {recipient.status})"
    if diagnostic:
        return f"{diagnostic} (status {recipient.status})"
    if host:
        return f"delivery to host {host} failed (status {recipient.status})"
    return f"status {recipient.status}"


def _status_part(
    reporter: str, original: Envelope, failed: list[FailedRecipient]
) -> list[str]:
    """
    The lines of the C{message/delivery-status} body: the per-message block,
    then one block per recipient, separated by blank lines, with the fields
    in the order of the RFC 3464 grammar.
    """
    lines: list[str] = []
    envid = original.mail_params.get("ENVID")
    if envid:
        lines.extend(_field("Original-Envelope-Id", _envelope_id(envid)))
    lines.append(f"Reporting-MTA: dns; {reporter}")
    lines.extend(_field("X-Mailgateway-Queue-ID", _ascii(original.queue_id)))
    lines.append(f"Arrival-Date: {_format_date(original.received_at)}")
    for recipient in failed:
        lines.append("")
        final = _address_type_and_value(recipient.address)
        # An address is kept on one line (folding could change a quoted
        # local part) unless it could not fit at all.
        if len(final) <= _FOLD_AT * 10:
            lines.append(f"Final-Recipient: {final}")
        else:
            lines.extend(_field("Final-Recipient", final))
        lines.append(f"Action: {recipient.action}")
        lines.append(f"Status: {recipient.status}")
        if recipient.remote_mta:
            host = _dns_name(recipient.remote_mta)
            if host:
                lines.extend(_field("Remote-MTA", f"dns; {host}"))
        if recipient.diagnostic:
            diagnostic = _ascii(_join_reply(recipient.diagnostic))
            if diagnostic:
                kind = "smtp" if _SMTP_REPLY_RE.match(diagnostic) else _LOCAL_DIAGNOSTIC_TYPE
                lines.extend(_field("Diagnostic-Code", f"{kind}; {diagnostic}"))
        if recipient.last_attempt is not None:
            lines.append(f"Last-Attempt-Date: {_format_date(recipient.last_attempt)}")
    return lines


def _headers_part(original_headers: bytes) -> tuple[str, str, list[str]]:
    """
    The original header block as (content type, transfer encoding, lines).

    Printable ASCII with short lines goes through as it is.  Anything else
    (UTF-8 headers under RFC 6532, stray 8-bit or control octets, a line
    past 990 octets) is quoted-printable encoded, which keeps every octet
    recoverable while the part stays 7-bit with lines under 76: the report
    must reach a sender whose server may offer neither 8BITMIME nor
    SMTPUTF8.
    """
    header_lines: list[bytes] = []
    for line in _LINE_BREAK_BYTES_RE.split(original_headers):
        if line == b"":
            break  # the blank line that ends the header block
        header_lines.append(line)
    if all(_is_plain_line(line) for line in header_lines):
        return (
            "text/rfc822-headers",
            "7bit",
            [line.decode("ascii") for line in header_lines],
        )
    raw = b"".join(line + b"\n" for line in header_lines)
    try:
        raw.decode("utf-8")
        charset = "utf-8"
    except UnicodeDecodeError:
        charset = "unknown-8bit"  # RFC 1428
    encoded = binascii.b2a_qp(raw, istext=True)
    return (
        f"text/rfc822-headers; charset={charset}",
        "quoted-printable",
        encoded.decode("ascii").rstrip("\n").split("\n"),
    )


def _is_plain_line(line: bytes) -> bool:
    return len(line) <= _MAX_RAW_HEADER_LINE and all(
        0x20 <= octet < 0x7F or octet == 0x09 for octet in line
    )


def _boundary(message_id: str, bodies: list[list[str]]) -> str:
    """
    A MIME boundary that occurs in no body line.

    It is derived from the message id rather than drawn at random so that
    the function stays pure and its output reproducible.  Starting with
    C{=_} rules out a clash with quoted-printable text; the loop rules out
    the rest.
    """
    counter = 0
    while True:
        seed = f"{message_id}\0{counter}".encode("utf-8", "surrogateescape")
        boundary = "=_dsn_" + hashlib.sha256(seed).hexdigest()[:32]
        marker = "--" + boundary
        if not any(line.startswith(marker) for body in bodies for line in body):
            return boundary
        counter += 1


def _field(name: str, value: str) -> list[str]:
    """
    A header-style field folded at white space to about 78 columns, so that
    long remote replies stay readable and never pass 998 octets.  A word
    longer than 900 characters is cut, which adds white space to it when
    unfolded; only a diagnostic of pure garbage can be that long.
    """
    words: list[str] = []
    for word in value.split(" "):
        if not word:
            continue
        while len(word) > _MAX_WORD:
            words.append(word[:_MAX_WORD])
            word = word[_MAX_WORD:]
        words.append(word)
    lines: list[str] = []
    current = f"{name}:"
    for word in words:
        if len(current) + 1 + len(word) > _FOLD_AT and current.strip() not in ("", f"{name}:"):
            lines.append(current)
            current = " " + word
        else:
            current = f"{current} {word}"
    lines.append(current)
    return lines


def _join_reply(text: str) -> str:
    """
    Make one line of a multiline SMTP reply, as Postfix does: the code and
    enhanced status once, then the text of every line.  C{"550-5.1.1 No
    such\\r\\n550 5.1.1 user"} becomes C{"550 5.1.1 No such user"}.  Text
    that is not such a reply, or whose lines disagree on the code, is left
    as it is (its line breaks become spaces later).
    """
    lines = [line for line in _LINE_BREAK_RE.split(text.strip()) if line]
    if len(lines) < 2:
        return text
    replies = [m for m in map(_REPLY_LINE_RE.fullmatch, lines) if m is not None]
    if len(replies) != len(lines) or len({m.group(1) for m in replies}) != 1:
        return text
    first = replies[0]
    parts = [first.group(1)]
    if first.group(2):
        parts.append(first.group(2))
    parts.extend(m.group(3).strip() for m in replies if m.group(3).strip())
    return " ".join(parts)


def _format_date(when: float) -> str:
    """
    RFC 5322 date-time in UTC.  UTC rather than local time, so that the
    result depends on the arguments alone and not on the TZ of the process.
    """
    moment = datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
    return email.utils.format_datetime(moment)


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text)


def _clean_text(text: str) -> str:
    """
    Text for the human-readable part: line breaks (of multiline replies)
    and runs of white space become one space; control characters and lone
    surrogates become C{?}.  Non-ASCII letters stay.
    """
    text = _WHITESPACE_RE.sub(" ", text).strip()
    return "".join(
        "?" if _has_control(c) or 0xD800 <= ord(c) <= 0xDFFF else c for c in text
    )


def _ascii(text: str) -> str:
    """
    Text for a field of C{message/delivery-status}, which must be ASCII
    (RFC 3464 section 2.1.1; RFC 6533's global variant would allow UTF-8,
    but not every recipient understands it).
    """
    return "".join(c if " " <= c < "\x7f" else "?" for c in _clean_text(text))


def _dns_name(name: str) -> str:
    """
    A host name for a C{dns;} field and the C{MAILER-DAEMON@} address:
    IDNA (A-labels) when possible, brackets of an address literal dropped,
    and nothing that could break the field's syntax.
    """
    name = name.strip().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            pass
    return "".join(c if "!" <= c < "\x7f" and c not in "<>()\\\"," else "?" for c in name)


def _envelope_id(value: str) -> str:
    """
    The ENVID of the original MAIL command, xtext-decoded for
    C{Original-Envelope-Id} as Postfix does; the raw value when decoding
    would give anything but printable ASCII.
    """
    decoded = re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)
    if all(" " <= c < "\x7f" for c in decoded):
        return decoded.strip()
    return _ascii(value)


def _address_type_and_value(address: str) -> str:
    """
    C{rfc822; address} for an ASCII address; for an internationalised one,
    RFC 6533's C{utf-8} type with the 7-bit C{utf-8-addr-xtext} form that
    C{message/delivery-status} requires, each other character written as
    C{\\x{HEX}}.
    """
    if address.isascii():
        return f"rfc822; {address}"
    return "utf-8; " + "".join(
        c if c in _QCHAR else f"\\x{{{ord(c):02X}}}" for c in address
    )
