"""
Tests for L{gateway.dsn}: the RFC 3464 report is parsed back with the stdlib
C{email} package and every field is checked, along with the wire format
(CRLF only, no line of 998 octets or more, 7-bit body parts).

Pure units: no reactor, no I/O.
"""

from __future__ import annotations

import email
import email.message
import email.utils
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.dsn import SUBJECT_DELAYED, SUBJECT_FAILED, FailedRecipient, build_dsn
from gateway.queuefile import Envelope, EnvelopeRecipient

QUEUE_ID = "0123456789ABCDUV"
RECEIVED_AT = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000
NOW = RECEIVED_AT + 5 * 86400
LAST_ATTEMPT = NOW - 60
MESSAGE_ID = "<0123456789ABCDUV.bounce@mx.example.com>"
ORIGINAL_HEADERS = (
    b"Received: from client.example.org (client.example.org [192.0.2.1])\r\n"
    b"\tby mx.example.com (mailgateway) with ESMTP id 0123456789ABCDUV;\r\n"
    b"\tTue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: Lunch\r\n"
    b"Message-ID: <lunch@example.org>\r\n"
)


def make_envelope(**overrides: Any) -> Envelope:
    """
    The envelope of a message from alice to bob and carol.
    """
    values: dict[str, Any] = dict(
        queue_id=QUEUE_ID,
        sender="alice@example.org",
        recipients=[
            EnvelopeRecipient("bob@example.net"),
            EnvelopeRecipient("carol@example.net"),
        ],
        received_at=RECEIVED_AT,
    )
    values.update(overrides)
    return Envelope(**values)


def bob_failed(**overrides: Any) -> FailedRecipient:
    """
    A permanent failure for bob with every optional field set.
    """
    values: dict[str, Any] = dict(
        address="bob@example.net",
        status="5.1.1",
        diagnostic="550 5.1.1 No such user",
        remote_mta="mx1.example.net",
        last_attempt=LAST_ATTEMPT,
    )
    values.update(overrides)
    return FailedRecipient(**values)


def assert_wire_format(dsn: bytes) -> None:
    """
    Every line ends in CRLF, there is no bare CR or LF, and every line is
    shorter than 998 octets (RFC 5322 section 2.1.1).
    """
    assert dsn.endswith(b"\r\n")
    for line in dsn[:-2].split(b"\r\n"):
        assert b"\r" not in line and b"\n" not in line, line
        assert len(line) < 998, len(line)


def build(**overrides: Any) -> bytes:
    """
    Build a DSN with sensible defaults, and check its wire format.
    """
    arguments: dict[str, Any] = dict(
        reporting_mta="mx.example.com",
        original=make_envelope(),
        failed=[bob_failed()],
        original_headers=ORIGINAL_HEADERS,
        now=NOW,
        message_id=MESSAGE_ID,
    )
    arguments.update(overrides)
    dsn = build_dsn(**arguments)
    assert_wire_format(dsn)
    return dsn


def parse(dsn: bytes) -> email.message.Message:
    """
    Parse C{dsn} with the stdlib and check the multipart/report shape: no
    defects, and the three parts in order.
    """
    message = email.message_from_bytes(dsn)
    assert message.defects == []
    assert message.get_content_type() == "multipart/report"
    parts = message.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    for part in parts:
        assert part.defects == []
    return message


def status_blocks(message: email.message.Message) -> list[email.message.Message]:
    """
    The blocks of the message/delivery-status part: the per-message block,
    then one per recipient.
    """
    blocks = message.get_payload()[1].get_payload()
    assert isinstance(blocks, list)
    assert all(isinstance(b, email.message.Message) for b in blocks)
    return blocks


def unfold(value: str) -> str:
    """
    A field value with its folding undone (RFC 5322 section 2.2.3).
    """
    return re.sub(r"\r?\n(?=[ \t])", "", value)


def text_of(part: email.message.Message) -> str:
    """
    The decoded text of a body part.
    """
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode(part.get_content_charset() or "ascii")


# -- Top-level header ---------------------------------------------------------


def test_top_level_fields():
    """The report comes from MAILER-DAEMON at the reporting MTA, goes to the
    original envelope sender, and carries the given Message-ID, a Date of
    now, Auto-Submitted: auto-replied and MIME-Version 1.0."""
    message = parse(build())
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.com>"
    assert email.utils.parseaddr(message["To"])[1] == "alice@example.org"
    assert message["Subject"] == SUBJECT_FAILED == "Undelivered Mail Returned to Sender"
    assert message["Message-ID"] == MESSAGE_ID
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert email.utils.parsedate_to_datetime(message["Date"]).timestamp() == NOW


def test_date_is_utc():
    """Dates are written in UTC, so the output does not depend on the time
    zone of the process."""
    message = parse(build())
    assert message["Date"] == "Sun, 19 Nov 2023 22:13:20 +0000"


def test_content_type_is_multipart_report_delivery_status():
    """The top-level type is multipart/report with report-type
    delivery-status (RFC 6522) and a boundary."""
    message = parse(build())
    assert message.get_param("report-type") == "delivery-status"
    assert message.get_boundary()


def test_each_field_appears_once():
    """No top-level field is duplicated."""
    message = parse(build())
    for name in ("From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted",
                 "MIME-Version", "Content-Type"):
        assert len(message.get_all(name)) == 1, name


def test_message_id_gets_angle_brackets():
    """A message id given without angle brackets is written with them."""
    message = parse(build(message_id="abc@mx.example.com"))
    assert message["Message-ID"] == "<abc@mx.example.com>"


def test_delayed_subject_when_every_recipient_is_delayed():
    """A report where every action is delayed is a warning, not a bounce."""
    delayed = bob_failed(status="4.4.1", action="delayed",
                         diagnostic="451 4.4.1 try again later")
    message = parse(build(failed=[delayed]))
    assert message["Subject"] == SUBJECT_DELAYED == "Delayed Mail (still being retried)"


def test_failed_subject_when_some_are_delayed_and_some_failed():
    """One permanent failure makes the whole report a bounce."""
    delayed = FailedRecipient("carol@example.net", "4.4.1", None, None, action="delayed")
    message = parse(build(failed=[delayed, bob_failed()]))
    assert message["Subject"] == SUBJECT_FAILED


def test_output_is_deterministic():
    """The same arguments give the same bytes: the boundary is derived from
    the message id, not random, so the function is pure."""
    assert build() == build()


def test_output_is_ascii_for_ascii_sender():
    """With an ASCII sender the whole report is 7-bit, whatever the
    original headers and recipients contain, so any next hop accepts it."""
    dsn = build(
        failed=[bob_failed(address="b\u00fccher@b\u00fccher.example",
                           diagnostic="550 5.1.1 Unbekannter Empf\u00e4nger")],
        original_headers="Subject: Gr\u00fc\u00dfe\r\n".encode(),
        reason="Zugestellt wurde nichts \u2014 sorry.",
    )
    assert dsn.isascii()


def test_non_ascii_sender_is_written_in_utf8():
    """An internationalised sender address goes into To: as raw UTF-8
    (RFC 6532); the caller must send such a report with SMTPUTF8."""
    dsn = build(original=make_envelope(sender="j\u00f6rg@b\u00fccher.example"))
    assert "To: <j\u00f6rg@b\u00fccher.example>\r\n".encode() in dsn
    parse(dsn)


# -- Refusals -----------------------------------------------------------------


def test_null_sender_is_never_bounced():
    """A message with the null reverse path gets no report: ValueError, so
    that the caller logs and drops it instead of bouncing a bounce."""
    with pytest.raises(ValueError, match="bounce"):
        build(original=make_envelope(sender=""))


def test_no_recipients_is_refused():
    """A report on nobody is a caller bug."""
    with pytest.raises(ValueError):
        build(failed=[])


@pytest.mark.parametrize("reporting_mta", ["", "   "])
def test_empty_reporting_mta_is_refused(reporting_mta):
    """Without a host name there is no Reporting-MTA and no From address."""
    with pytest.raises(ValueError):
        build(reporting_mta=reporting_mta)


@pytest.mark.parametrize(
    "message_id", ["", "<a@b>\r\nBcc: x@y", "<a b@c>", "<\u00fc@example.com>"]
)
def test_bad_message_id_is_refused(message_id):
    """A message id that is empty or would break the header is refused."""
    with pytest.raises(ValueError):
        build(message_id=message_id)


def test_sender_with_line_break_is_refused():
    """A sender carrying a line break could inject header fields; refused."""
    with pytest.raises(ValueError):
        build(original=make_envelope(sender="a@b\r\nBcc: victim@example.com"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"action": "delivered"},
        {"action": "FAILED"},
        {"status": "550"},
        {"status": "2.0.0"},
        {"status": "5.1"},
        {"status": "5.1.1 "},
        {"status": "5.1000.1"},
        {"status": "5.1.1.1"},
        {"status": "x.1.1"},
        {"status": "5.1.1", "action": "delayed"},
        {"address": ""},
        {"address": "a@b\r\nX: y"},
    ],
)
def test_failed_recipient_is_checked(kwargs):
    """An unknown action, a status that is not an RFC 3463 failure or delay
    code, a delay with a permanent status, or an empty or multi-line address
    is refused when the FailedRecipient is made."""
    with pytest.raises(ValueError):
        bob_failed(**kwargs)


@pytest.mark.parametrize("status", ["5.1.1", "5.1.10", "5.01.001", "4.4.7", "5.999.999"])
def test_any_rfc_3463_failure_status_is_accepted(status):
    """Every status of class 4 or 5 with one to three digits per part is
    accepted, as the RFC 3463 grammar allows, and written as given."""
    [_, block] = status_blocks(parse(build(failed=[bob_failed(status=status)])))
    assert block["Status"] == status


def test_expired_recipient_may_fail_with_a_4xx_status():
    """A message that expired in the queue fails with 4.4.7: action failed
    accepts a class 4 status (as Postfix reports expiry)."""
    expiry = FailedRecipient("bob@example.net", "4.4.7", None, None)
    assert expiry.action == "failed"
    [_, block] = status_blocks(parse(build(failed=[expiry])))
    assert block["Action"] == "failed"
    assert block["Status"] == "4.4.7"


# -- message/delivery-status --------------------------------------------------


def test_per_message_fields():
    """The per-message block names the reporting MTA as a DNS name and the
    arrival date of the original message; no Original-Envelope-Id when the
    sender gave no ENVID."""
    [per_message, _] = status_blocks(parse(build()))
    assert per_message["Reporting-MTA"] == "dns; mx.example.com"
    arrival = email.utils.parsedate_to_datetime(per_message["Arrival-Date"])
    assert arrival.timestamp() == RECEIVED_AT
    assert per_message["Original-Envelope-Id"] is None
    assert per_message["X-Mailgateway-Queue-ID"] == QUEUE_ID


def test_original_envelope_id_from_envid():
    """The ENVID of the MAIL command comes back, xtext-decoded, as
    Original-Envelope-Id (RFC 3461 section 4.4, RFC 3464 section 2.2.1)."""
    envelope = make_envelope(mail_params={"ENVID": "QQ314159+2Bx", "RET": "HDRS"})
    [per_message, _] = status_blocks(parse(build(original=envelope)))
    assert per_message["Original-Envelope-Id"] == "QQ314159+x"


def test_envid_without_value_is_ignored():
    """An ENVID keyword without a value gives no Original-Envelope-Id."""
    envelope = make_envelope(mail_params={"ENVID": None})
    [per_message, _] = status_blocks(parse(build(original=envelope)))
    assert per_message["Original-Envelope-Id"] is None


def test_original_envelope_id_comes_first():
    """The fields follow the order of the RFC 3464 grammar:
    Original-Envelope-Id, Reporting-MTA, then Arrival-Date."""
    envelope = make_envelope(mail_params={"ENVID": "abc"})
    [per_message, _] = status_blocks(parse(build(original=envelope)))
    keys = per_message.keys()
    assert keys.index("Original-Envelope-Id") < keys.index("Reporting-MTA")
    assert keys.index("Reporting-MTA") < keys.index("Arrival-Date")


def test_per_recipient_fields():
    """Each recipient block carries Final-Recipient (rfc822), Action,
    Status, Remote-MTA (dns), Diagnostic-Code (smtp) and
    Last-Attempt-Date."""
    [_, block] = status_blocks(parse(build()))
    assert block["Final-Recipient"] == "rfc822; bob@example.net"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns; mx1.example.net"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    last_attempt = email.utils.parsedate_to_datetime(block["Last-Attempt-Date"])
    assert last_attempt.timestamp() == LAST_ATTEMPT
    assert block.keys() == [
        "Final-Recipient",
        "Action",
        "Status",
        "Remote-MTA",
        "Diagnostic-Code",
        "Last-Attempt-Date",
    ]


def test_optional_recipient_fields_left_out():
    """Without a diagnostic, a remote MTA or a last attempt, those fields
    are left out rather than written empty."""
    bare = FailedRecipient("bob@example.net", "4.4.7", None, None)
    [_, block] = status_blocks(parse(build(failed=[bare])))
    assert block.keys() == ["Final-Recipient", "Action", "Status"]


def test_one_block_per_recipient_in_order():
    """Several recipients give several blocks, in the order given, each with
    its own action and status."""
    failed = [
        bob_failed(),
        FailedRecipient("carol@example.net", "4.4.1", "451 4.4.1 later",
                        "mx2.example.net", action="delayed"),
        FailedRecipient("dave@example.net", "5.2.2", "552 5.2.2 Mailbox full", None),
    ]
    blocks = status_blocks(parse(build(failed=failed)))
    assert len(blocks) == 4
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; bob@example.net",
        "rfc822; carol@example.net",
        "rfc822; dave@example.net",
    ]
    assert [b["Action"] for b in blocks[1:]] == ["failed", "delayed", "failed"]
    assert [b["Status"] for b in blocks[1:]] == ["5.1.1", "4.4.1", "5.2.2"]
    assert blocks[3]["Remote-MTA"] is None


def test_status_blocks_are_separated_by_blank_lines():
    """On the wire the per-message block and each recipient block are
    separated by exactly one blank line (RFC 3464 section 2.1)."""
    dsn = build(failed=[bob_failed(), bob_failed(address="carol@example.net")])
    assert b"+0000\r\n\r\nFinal-Recipient: rfc822; bob@example.net\r\n" in dsn
    assert b"\r\n\r\nFinal-Recipient: rfc822; carol@example.net\r\n" in dsn
    report = dsn.split(b"Content-Type: message/delivery-status")[1].split(b"\r\n--")[0]
    assert b"\r\n\r\n\r\n" not in report


def test_multiline_reply_becomes_one_diagnostic():
    """A multiline SMTP reply is joined into one reply: the code and status
    once, then the text of every line."""
    reply = "550-5.1.1 The email account that you tried to reach\r\n550 5.1.1 does not exist."
    [_, block] = status_blocks(parse(build(failed=[bob_failed(diagnostic=reply)])))
    assert unfold(block["Diagnostic-Code"]) == (
        "smtp; 550 5.1.1 The email account that you tried to reach does not exist."
    )


def test_local_diagnostic_is_not_typed_smtp():
    """A diagnostic that is not an SMTP reply (a connection error) is typed
    X-Mailgateway rather than smtp, which would be a lie."""
    failed = bob_failed(
        status="4.4.1", diagnostic="connect to mx1.example.net: Connection refused"
    )
    [_, block] = status_blocks(parse(build(failed=[failed])))
    assert block["Diagnostic-Code"] == (
        "X-Mailgateway; connect to mx1.example.net: Connection refused"
    )


def test_long_diagnostic_is_folded_not_cut():
    """A long remote reply is folded under 78 columns where it has spaces,
    and unfolds to the original text."""
    text = "550 5.7.1 " + " ".join(f"word{i}" for i in range(400))
    dsn = build(failed=[bob_failed(diagnostic=text)])
    [_, block] = status_blocks(parse(dsn))
    assert unfold(block["Diagnostic-Code"]) == "smtp; " + text
    section = dsn.split(b"Diagnostic-Code:")[1].split(b"\r\nLast-Attempt-Date")[0]
    assert all(len(line) <= 78 for line in section.split(b"\r\n"))


def test_diagnostic_without_spaces_stays_under_998():
    """Even a 5000-character reply without white space keeps every line
    under 998 octets; all of its characters are still there."""
    text = "550 " + "x" * 5000
    [_, block] = status_blocks(parse(build(failed=[bob_failed(diagnostic=text)])))
    assert re.sub(r"\s", "", block["Diagnostic-Code"]) == "smtp;" + "550" + "x" * 5000


def test_diagnostic_cannot_inject_fields():
    """Line breaks and control characters in a remote reply cannot add
    fields or blocks to the report."""
    evil = "550 no\r\n\r\nFinal-Recipient: rfc822; evil@example.com\x00\x1b\nAction: delivered"
    blocks = status_blocks(parse(build(failed=[bob_failed(diagnostic=evil)])))
    assert len(blocks) == 2
    assert blocks[1].get_all("Final-Recipient") == ["rfc822; bob@example.net"]
    assert blocks[1].get_all("Action") == ["failed"]


def test_non_ascii_diagnostic_is_made_ascii():
    """The delivery-status fields are ASCII; non-ASCII in a reply becomes
    '?' there (the human-readable part keeps it)."""
    failed = bob_failed(diagnostic="550 5.1.1 Unbekannter Empf\u00e4nger")
    message = parse(build(failed=[failed]))
    [_, block] = status_blocks(message)
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 Unbekannter Empf?nger"
    assert "Unbekannter Empf\u00e4nger" in text_of(message.get_payload()[0])


def test_internationalised_recipient_uses_utf8_address_type():
    """A non-ASCII recipient is reported with RFC 6533's utf-8 address type
    in its 7-bit xtext form."""
    failed = bob_failed(address="j\u00f6rg+x@b\u00fccher.example")
    [_, block] = status_blocks(parse(build(failed=[failed])))
    assert block["Final-Recipient"] == "utf-8; j\\x{F6}rg\\x{2B}x@b\\x{FC}cher.example"


def test_idn_remote_mta_is_written_as_a_labels():
    """A remote MTA with a Unicode name is written in IDNA A-labels, since
    the field is ASCII; an address literal loses its brackets."""
    failed = [
        bob_failed(remote_mta="mx.b\u00fccher.example"),
        bob_failed(address="carol@example.net", remote_mta="[192.0.2.7]"),
    ]
    [_, first, second] = status_blocks(parse(build(failed=failed)))
    assert first["Remote-MTA"] == "dns; mx.xn--bcher-kva.example"
    assert second["Remote-MTA"] == "dns; 192.0.2.7"


# -- text/plain ---------------------------------------------------------------


def test_text_part_lists_each_recipient_and_diagnostic():
    """The human-readable part names the reporting MTA, the queue id, every
    recipient and its remote host and reply."""
    failed = [
        bob_failed(),
        FailedRecipient("carol@example.net", "5.2.2", "552 5.2.2 Mailbox full", "mx2.example.net"),
    ]
    part = parse(build(failed=failed)).get_payload()[0]
    assert part.get_content_charset() == "us-ascii"
    assert part["Content-Transfer-Encoding"] == "7bit"
    text = text_of(part)
    assert "mx.example.com" in text
    assert QUEUE_ID in text
    assert "<bob@example.net>" in text
    assert "host mx1.example.net said: 550 5.1.1 No such user" in text
    assert "<carol@example.net>" in text
    assert "552 5.2.2 Mailbox full" in text


def test_text_part_includes_reason():
    """The optional reason is given to the human reader."""
    part = parse(build(reason="The message was queued for too long (5 days).")).get_payload()[0]
    assert "The message was queued for too long (5 days)." in text_of(part)


def test_text_part_separates_failed_and_delayed():
    """Delayed recipients are listed apart from failed ones, and the reader
    is told that they will be retried."""
    failed = [
        bob_failed(),
        FailedRecipient("carol@example.net", "4.4.1", None, None, action="delayed"),
    ]
    text = text_of(parse(build(failed=failed)).get_payload()[0])
    failed_at = text.index("Delivery failed permanently")
    delayed_at = text.index("retried")
    assert failed_at < text.index("<bob@example.net>") < delayed_at
    assert delayed_at < text.index("<carol@example.net>")


def test_delay_warning_says_no_need_to_resend():
    """A pure delay warning tells the sender that the message is still being
    tried, rather than that it was returned."""
    delayed = FailedRecipient("bob@example.net", "4.4.1", None, None, action="delayed")
    text = text_of(parse(build(failed=[delayed])).get_payload()[0])
    assert "still trying" in text
    assert "given up" not in text


def test_non_ascii_text_is_quoted_printable_utf8():
    """Non-ASCII in the human-readable part is sent as UTF-8
    quoted-printable, so the part stays 7-bit and decodes back."""
    part = parse(build(reason="Zustellung gescheitert \u2014 Gr\u00fc\u00dfe")).get_payload()[0]
    assert part.get_content_charset() == "utf-8"
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert "Zustellung gescheitert \u2014 Gr\u00fc\u00dfe" in text_of(part)


# -- text/rfc822-headers ------------------------------------------------------


def test_original_headers_returned_unchanged():
    """Printable ASCII headers are returned byte for byte as a 7bit
    text/rfc822-headers part, Received field included."""
    part = parse(build()).get_payload()[2]
    assert part["Content-Transfer-Encoding"] == "7bit"
    assert part.get_payload(decode=True) == ORIGINAL_HEADERS


def test_original_body_is_not_returned():
    """Anything after the blank line ending the header block (the body) is
    left out."""
    dsn = build(original_headers=ORIGINAL_HEADERS + b"\r\nSecret body text\r\n")
    assert b"Secret body text" not in dsn
    assert parse(dsn).get_payload()[2].get_payload(decode=True) == ORIGINAL_HEADERS


def test_lf_line_endings_are_normalised():
    """Original headers with bare LF (or CR) line endings come back with
    CRLF, so the report never carries a bare line feed."""
    headers = b"Subject: a\nX-One: b\rX-Two: c\n"
    part = parse(build(original_headers=headers)).get_payload()[2]
    assert part.get_payload(decode=True) == b"Subject: a\r\nX-One: b\r\nX-Two: c\r\n"


def test_empty_original_headers():
    """An empty header block still gives a well-formed third part."""
    part = parse(build(original_headers=b"")).get_payload()[2]
    assert part.get_payload(decode=True) == b""


def test_utf8_headers_are_quoted_printable():
    """RFC 6532 UTF-8 headers are quoted-printable encoded with charset
    utf-8, and decode back to the very same octets."""
    headers = (
        "Subject: Gr\u00fc\u00dfe aus K\u00f6ln\r\n"
        "From: J\u00f6rg <j@example.org>\r\n"
    ).encode()
    dsn = build(original_headers=headers)
    assert dsn.isascii()
    part = parse(dsn).get_payload()[2]
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert part.get_content_charset() == "utf-8"
    assert part.get_payload(decode=True) == headers


def test_invalid_8bit_headers_survive():
    """Headers that are not even UTF-8 (Latin-1, NUL, ESC) are still
    returned octet for octet, labelled unknown-8bit."""
    headers = b"Subject: caf\xe9 \x00\x1b[31m\r\n"
    part = parse(build(original_headers=headers)).get_payload()[2]
    assert part.get_content_charset() == "unknown-8bit"
    assert part.get_payload(decode=True) == headers


def test_overlong_header_line_is_encoded():
    """A header line too long for SMTP is quoted-printable encoded, whose
    soft line breaks keep the report's lines short."""
    headers = b"X-Long: " + b"a" * 5000 + b"\r\n"
    part = parse(build(original_headers=headers)).get_payload()[2]
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert part.get_payload(decode=True) == headers


def test_boundary_does_not_occur_in_content():
    """Original headers that contain the boundary the report would use get
    another boundary, so the MIME structure holds."""
    first = email.message_from_bytes(build()).get_boundary()
    headers = ORIGINAL_HEADERS + f"--{first}\r\n--{first}--\r\n".encode()
    message = parse(build(original_headers=headers))
    assert message.get_boundary() != first
    assert message.get_payload()[2].get_payload(decode=True) == headers


@settings(max_examples=200, deadline=None)
@given(headers=st.binary(max_size=3000))
def test_any_original_headers_give_a_valid_report(headers):
    """Whatever octets the original header block holds, the report is
    7-bit, CRLF only, short-lined, parses into the three parts, and returns
    the header block (up to its first blank line) with CRLF endings."""
    dsn = build(original_headers=headers)
    assert dsn.isascii()
    part = parse(dsn).get_payload()[2]
    expected = []
    for line in re.split(rb"\r\n|\r|\n", headers):
        if not line:
            break
        expected.append(line + b"\r\n")
    assert part.get_payload(decode=True) == b"".join(expected)


@settings(max_examples=200, deadline=None)
@given(
    diagnostic=st.text(max_size=2000),
    remote=st.text(max_size=300),
    address=st.text(min_size=1, max_size=300).filter(
        lambda s: not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in s)
    ),
    reason=st.text(max_size=500),
)
def test_any_recipient_text_gives_a_valid_report(diagnostic, remote, address, reason):
    """Whatever text the remote server, routing and reason supply, the
    report keeps its wire format and structure: one block per recipient
    and the right address in each."""
    failed = [
        FailedRecipient(address, "5.0.0", diagnostic or None, remote or None),
        bob_failed(),
    ]
    blocks = status_blocks(parse(build(failed=failed, reason=reason or None)))
    assert len(blocks) == 3
    assert blocks[2]["Final-Recipient"] == "rfc822; bob@example.net"
    assert blocks[1]["Action"] == "failed"
