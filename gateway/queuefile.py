# -*- test-case-name: tests.test_queuefile -*-
"""
Envelope files of the spool: serialise and verify, with no I/O.

An envelope file is one line of JSON followed by an end record::

    {"version":1,"queue_id":"...",...}\\n
    END sha256=<64 lower-case hex digits of the JSON bytes>\\n

The end record plays the part of Postfix's END record: a file that was cut
short by a crash or a full disk, or damaged on the way, is recognised as such
instead of being delivered with half its recipients.  Everything here is a
pure function of its arguments, so it can be tested exhaustively and fuzzed.

Standards:
    RFC 8259 (JSON), RFC 5321 section 4.4 (trace information kept in the
    envelope), RFC 5322 section 2.2.3 (folding of the prepended header
    fields), RFC 4648 section 7 (the base32hex alphabet of queue ids),
    FIPS 180-4 (SHA-256).

See also:
    L{gateway.queue} (the only writer of these files), Postfix
    C{mail_stream.c} and C{record.c} (END record).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "ENVELOPE_VERSION",
    "QUEUE_ID_LENGTH",
    "RECIPIENT_STATUSES",
    "Envelope",
    "EnvelopeError",
    "EnvelopeRecipient",
    "dump_envelope",
    "is_queue_id",
    "load_envelope",
    "new_queue_id",
]

ENVELOPE_VERSION: Final = 1

RECIPIENT_STATUSES: Final = frozenset({"pending", "delivered", "deferred", "bounced"})

# base32hex (RFC 4648 section 7) keeps the numeric order of the encoded
# value in the lexical order of the text, which is what makes ids sortable.
_BASE32HEX: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUV"
_TIME_DIGITS: Final = 11  # 32**11 microseconds is past the year 3000
_RANDOM_DIGITS: Final = 5  # 25 random bits per microsecond
QUEUE_ID_LENGTH: Final = _TIME_DIGITS + _RANDOM_DIGITS
_QUEUE_ID_RE: Final = re.compile(r"[0-9A-V]{%d}" % QUEUE_ID_LENGTH)

_END_RE: Final = re.compile(rb"END sha256=([0-9a-f]{64})\n")

# A header field as RFC 5322 section 2.2 and 2.2.3 shape it: a printable
# name, a colon, and a body whose only line breaks are CRLF followed by
# white space (folding).  No final CRLF.
_HEADER_FIELD_RE: Final = re.compile(r"[!-9;-~]+:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*")


class EnvelopeError(ValueError):
    """
    An envelope cannot be written or read back faithfully.

    Raised for truncated or damaged files, bad checksums, malformed JSON and
    missing, unknown or ill-typed fields.  The message names the reason, and
    the spool logs it when it moves the file to C{corrupt/}.
    """


@dataclass
class EnvelopeRecipient:
    """
    One recipient of a queued message and its delivery state.

    Delivery state lives per recipient because one attempt may deliver to
    some recipients and defer others (RFC 5321 section 3.3, one reply per
    RCPT).

    @ivar address: The canonical C{local@domain} form that was routed, which
        is also the form the relay decision checked.
    @ivar status: One of C{pending}, C{delivered}, C{deferred}, C{bounced}.
    @ivar attempts: Delivery attempts made for this recipient.
    @ivar last_reply: The last reply from the next hop, for the bounce and
        for C{gatewayctl queue show}; L{None} before the first attempt.
    """

    address: str
    status: str = "pending"
    attempts: int = 0
    last_reply: str | None = None


@dataclass
class Envelope:
    """
    Everything about a queued message except its content.

    The content lives in C{data/<queue_id>.eml}; this record travels between
    the state directories of the spool.

    @ivar queue_id: From L{new_queue_id}; also the file name stem.
    @ivar sender: The reverse path, C{""} for the null sender.
    @ivar recipients: At least one L{EnvelopeRecipient}.
    @ivar received_at: Unix time at which the message was received.
    @ivar listener: Name of the listener that accepted the message.
    @ivar client_address: The client's IP address.
    @ivar client_name: The client's verified reverse DNS name, if any.
    @ivar helo: The HELO/EHLO argument.
    @ivar auth_user: The authenticated user, if any.
    @ivar protocol: The RFC 3848 C{with} keyword: C{ESMTP}, C{ESMTPS},
        C{ESMTPSA}, ...
    @ivar mail_params: ESMTP parameters of the MAIL command; a value is
        L{None} for a keyword without a value.
    @ivar prepend_headers: Complete header fields, folded, each without its
        final CRLF, emitted before the content when the message is relayed.
    @ivar size: Octets of content in C{data/<queue_id>.eml}.
    @ivar attempts: Delivery attempts made for the message as a whole.
    @ivar next_attempt: Unix time of the next attempt (the scheduler keeps
        the retry time here rather than in file times).
    @ivar extra: Room for later features; JSON values only (dict with
        string keys, list, str, int, float, bool, None).  It round-trips
        untouched.
    """

    queue_id: str
    sender: str
    recipients: list[EnvelopeRecipient]
    received_at: float
    listener: str = ""
    client_address: str = ""
    client_name: str | None = None
    helo: str | None = None
    auth_user: str | None = None
    protocol: str = "ESMTP"
    mail_params: dict[str, str | None] = field(default_factory=dict)
    prepend_headers: list[str] = field(default_factory=list)
    size: int = 0
    attempts: int = 0
    next_attempt: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def is_queue_id(value: object) -> bool:
    """
    Tell whether C{value} has the shape of a queue id made by L{new_queue_id}.

    Queue ids become file names, so anything read from a file or typed by an
    operator is checked with this before it is joined to a path.

    @param value: Anything.
    @return: L{True} for a string of C{QUEUE_ID_LENGTH} base32hex digits.
    """
    return isinstance(value, str) and _QUEUE_ID_RE.fullmatch(value) is not None


def queue_id_time(queue_id: str) -> float:
    """The unix time encoded in a queue id (when the message arrived).

    @raise ValueError: If C{queue_id} is not a queue id.
    """
    if not is_queue_id(queue_id):
        raise ValueError(f"not a queue id: {queue_id!r}")
    return int(queue_id[:_TIME_DIGITS], 32) / 1_000_000


def new_queue_id(now: float) -> str:
    """
    Make a new queue id for a message received at C{now}.

    The id is 16 characters of RFC 4648 base32hex (C{0-9A-V}): 11 for the
    microseconds since the epoch, then 5 (25 bits) of randomness.  Being
    fixed-width and order-preserving, ids sort by time, so listing a state
    directory in name order is first-in first-out; they are upper case and
    safe in file names on every file system.  Uniqueness within one
    microsecond is probabilistic; the spool also creates the file
    exclusively and tries again on a collision.

    @param now: Unix time, normally C{clock.seconds()}.
    @return: The new id.
    @raise ValueError: If C{now} is negative or not finite.
    """
    if not math.isfinite(now) or now < 0:
        raise ValueError(f"cannot make a queue id for time {now!r}")
    micros = int(now * 1_000_000)
    if micros >= 32**_TIME_DIGITS:
        raise ValueError(f"cannot make a queue id for time {now!r}")
    return _base32hex(micros, _TIME_DIGITS) + _base32hex(
        secrets.randbits(5 * _RANDOM_DIGITS), _RANDOM_DIGITS
    )


def _base32hex(value: int, width: int) -> str:
    digits = []
    for _ in range(width):
        value, digit = divmod(value, 32)
        digits.append(_BASE32HEX[digit])
    return "".join(reversed(digits))


def dump_envelope(envelope: Envelope) -> bytes:
    """
    Serialise C{envelope} to the bytes of an envelope file.

    The envelope is checked with the same rules L{load_envelope} applies, so
    that nothing is ever written that cannot be read back: an envelope the
    spool accepts is an envelope the scheduler can deliver.  JSON is written
    with C{ensure_ascii} so that any Python string, even one carrying lone
    surrogates from a C{surrogateescape} decoding, survives byte for byte.

    @param envelope: The envelope to write.
    @return: UTF-8 (in fact ASCII) JSON on one line, then
        C{END sha256=<hex>\\n}.
    @raise EnvelopeError: If a field has the wrong type or value.
    """
    document = _envelope_to_document(envelope)
    try:
        body = json.dumps(
            document, ensure_ascii=True, allow_nan=False, separators=(",", ":")
        ).encode("ascii")
    except (TypeError, ValueError) as e:
        raise EnvelopeError(f"envelope is not serialisable: {e}") from e
    digest = hashlib.sha256(body).hexdigest()
    return b"%s\nEND sha256=%s\n" % (body, digest.encode("ascii"))


def load_envelope(data: bytes) -> Envelope:
    """
    Parse and verify the bytes of an envelope file.

    The end record and checksum are verified before the JSON is even
    decoded, so a file cut short at any byte, or with any byte changed, is
    refused.  After that the document must be exactly what
    L{dump_envelope} writes: the known fields with their types, no unknown
    top-level or recipient keys (later additions go in C{extra} or come
    with a new C{version}).

    @param data: The whole file.
    @return: The envelope.
    @raise EnvelopeError: With the reason, for any deviation.
    """
    if not data.endswith(b"\n"):
        raise EnvelopeError("truncated: no final newline")
    last_line_start = data.rfind(b"\n", 0, len(data) - 1) + 1
    if last_line_start == 0:
        raise EnvelopeError("truncated: no END record")
    match = _END_RE.fullmatch(data, last_line_start)
    if match is None:
        raise EnvelopeError("truncated or damaged END record")
    body = data[: last_line_start - 1]
    if hashlib.sha256(body).hexdigest().encode("ascii") != match.group(1):
        raise EnvelopeError("checksum mismatch")
    try:
        document = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_reject_duplicate_keys,
            parse_constant=_reject_constant,
        )
    except EnvelopeError:
        raise
    except (ValueError, RecursionError) as e:
        # JSONDecodeError and UnicodeDecodeError are ValueErrors, and so is
        # an integer longer than the interpreter's digit limit.
        raise EnvelopeError(f"bad JSON: {e}") from e
    return _document_to_envelope(document)


# Field tables, shared by both directions so that they cannot drift apart.

_RECIPIENT_FIELDS: Final = ("address", "status", "attempts", "last_reply")

_ENVELOPE_FIELDS: Final = (
    "queue_id",
    "sender",
    "recipients",
    "received_at",
    "listener",
    "client_address",
    "client_name",
    "helo",
    "auth_user",
    "protocol",
    "mail_params",
    "prepend_headers",
    "size",
    "attempts",
    "next_attempt",
    "extra",
)


def _envelope_to_document(envelope: Envelope) -> dict[str, Any]:
    if not isinstance(envelope, Envelope):
        raise EnvelopeError(f"not an Envelope: {type(envelope).__name__}")
    document: dict[str, Any] = {"version": ENVELOPE_VERSION}
    for name in _ENVELOPE_FIELDS:
        value = getattr(envelope, name)
        if name == "recipients":
            if not isinstance(value, list):
                raise EnvelopeError("recipients: expected a list")
            value = [_recipient_to_document(i, r) for i, r in enumerate(value)]
        document[name] = value
    # One validator for both directions: what is written is what is read.
    _check_document_fields(document)
    for name in ("received_at", "next_attempt"):
        document[name] = float(document[name])
    return document


def _recipient_to_document(index: int, recipient: object) -> dict[str, Any]:
    if not isinstance(recipient, EnvelopeRecipient):
        raise EnvelopeError(f"recipients[{index}]: not an EnvelopeRecipient")
    return {name: getattr(recipient, name) for name in _RECIPIENT_FIELDS}


def _document_to_envelope(document: object) -> Envelope:
    if not isinstance(document, dict):
        raise EnvelopeError("top level: expected an object")
    version = document.get("version")
    if type(version) is not int:
        raise EnvelopeError("version: missing or not an integer")
    if version != ENVELOPE_VERSION:
        raise EnvelopeError(f"version: unsupported version {version}")
    _check_keys("top level", document, ("version",) + _ENVELOPE_FIELDS)
    _check_document_fields(document)
    values = {name: document[name] for name in _ENVELOPE_FIELDS}
    values["recipients"] = [EnvelopeRecipient(**r) for r in document["recipients"]]
    values["received_at"] = float(values["received_at"])
    values["next_attempt"] = float(values["next_attempt"])
    return Envelope(**values)


def _check_keys(where: str, document: dict[str, Any], expected: tuple[str, ...]) -> None:
    missing = [k for k in expected if k not in document]
    if missing:
        raise EnvelopeError(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(k for k in document if k not in expected)
    if unknown:
        raise EnvelopeError(f"{where}: unknown {', '.join(unknown)}")


def _check_document_fields(document: dict[str, Any]) -> None:
    queue_id = document["queue_id"]
    if not is_queue_id(queue_id):
        raise EnvelopeError(f"queue_id: not a queue id: {queue_id!r}")
    _check_str(document, "sender")
    recipients = document["recipients"]
    if not isinstance(recipients, list) or not recipients:
        raise EnvelopeError("recipients: expected a non-empty list")
    for index, recipient in enumerate(recipients):
        where = f"recipients[{index}]"
        if not isinstance(recipient, dict):
            raise EnvelopeError(f"{where}: expected an object")
        _check_keys(where, recipient, _RECIPIENT_FIELDS)
        _check_str(recipient, "address", where)
        _check_str(recipient, "status", where)
        if recipient["status"] not in RECIPIENT_STATUSES:
            raise EnvelopeError(f"{where}.status: unknown status {recipient['status']!r}")
        _check_count(recipient, "attempts", where)
        _check_optional_str(recipient, "last_reply", where)
    _check_time(document, "received_at")
    for name in ("listener", "client_address", "protocol"):
        _check_str(document, name)
    for name in ("client_name", "helo", "auth_user"):
        _check_optional_str(document, name)
    mail_params = document["mail_params"]
    if not isinstance(mail_params, dict):
        raise EnvelopeError("mail_params: expected an object")
    for key, value in mail_params.items():
        if not isinstance(key, str) or not (value is None or isinstance(value, str)):
            raise EnvelopeError(f"mail_params: {key!r} must map a string to a string or null")
    headers = document["prepend_headers"]
    if not isinstance(headers, list):
        raise EnvelopeError("prepend_headers: expected a list")
    for index, header in enumerate(headers):
        if not isinstance(header, str) or _HEADER_FIELD_RE.fullmatch(header) is None:
            raise EnvelopeError(
                f"prepend_headers[{index}]: not a header field without final CRLF"
            )
    _check_count(document, "size")
    _check_count(document, "attempts")
    _check_time(document, "next_attempt")
    extra = document["extra"]
    if not isinstance(extra, dict):
        raise EnvelopeError("extra: expected an object")
    _check_json_value("extra", extra)


def _check_str(document: dict[str, Any], name: str, where: str = "") -> None:
    if not isinstance(document[name], str):
        raise EnvelopeError(f"{_dotted(where, name)}: expected a string")


def _check_optional_str(document: dict[str, Any], name: str, where: str = "") -> None:
    value = document[name]
    if value is not None and not isinstance(value, str):
        raise EnvelopeError(f"{_dotted(where, name)}: expected a string or null")


def _check_count(document: dict[str, Any], name: str, where: str = "") -> None:
    value = document[name]
    # bool is a subclass of int; a count of True is a bug, not a count.
    if type(value) is not int or value < 0:
        raise EnvelopeError(f"{_dotted(where, name)}: expected a non-negative integer")


def _check_time(document: dict[str, Any], name: str) -> None:
    value = document[name]
    if type(value) not in (int, float) or not math.isfinite(value):
        raise EnvelopeError(f"{name}: expected a finite number")


def _check_json_value(where: str, value: object) -> None:
    """
    Refuse values that JSON would silently change (tuples, non-string keys,
    NaN), because C{extra} promises an exact round trip.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise EnvelopeError(f"{where}: non-finite number")
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_value(f"{where}[{index}]", item)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise EnvelopeError(f"{where}: non-string key {key!r}")
            _check_json_value(f"{where}.{key}", item)
        return
    raise EnvelopeError(f"{where}: not a JSON value: {type(value).__name__}")


def _dotted(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise EnvelopeError("bad JSON: duplicate key")
    return document


def _reject_constant(name: str) -> Any:
    raise EnvelopeError(f"bad JSON: {name} is not allowed")
