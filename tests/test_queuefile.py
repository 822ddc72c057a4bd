"""
Tests for L{gateway.queuefile}: envelope round trip, damage detection, field
checks and queue ids.
"""

from __future__ import annotations

import hashlib
import json
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.queuefile import (
    ENVELOPE_VERSION,
    Envelope,
    EnvelopeError,
    EnvelopeRecipient,
    dump_envelope,
    is_queue_id,
    load_envelope,
    new_queue_id,
)

QUEUE_ID = "0123456789ABCDUV"


def rich_envelope() -> Envelope:
    """
    An envelope with every field set to something unusual.
    """
    return Envelope(
        queue_id=QUEUE_ID,
        sender="",
        recipients=[
            EnvelopeRecipient("a@example.test"),
            EnvelopeRecipient(
                "\u00fcser@b\u00fccher.example",
                status="deferred",
                attempts=3,
                last_reply="451 4.7.1 try later",
            ),
        ],
        received_at=1_700_000_000.123456,
        listener="mx",
        client_address="2001:db8::1",
        client_name="client.example.test",
        helo="[192.0.2.1]",
        auth_user="alice",
        protocol="ESMTPSA",
        mail_params={"SIZE": "1000", "SMTPUTF8": None, "BODY": "8BITMIME"},
        prepend_headers=[
            "Received: from client.example.test\r\n\tby mx.example.test; Mon, 1 Jan 2024",
            "X-Spam: no",
        ],
        size=12345,
        attempts=2,
        next_attempt=1_700_000_600.5,
        extra={"dkim": {"selector": "s1", "signed": True}, "tags": [1, 2.5, None, "x"]},
    )


def seal(document: dict[str, Any] | bytes) -> bytes:
    """
    Encode a document with a correct END record, so that tests reach the
    field checks behind the checksum.
    """
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    return body + b"\nEND sha256=" + hashlib.sha256(body).hexdigest().encode() + b"\n"


def document_of(envelope: Envelope) -> dict[str, Any]:
    """
    The JSON document inside an envelope file.
    """
    data = dump_envelope(envelope)
    return json.loads(data[: data.rindex(b"\nEND ")])


# Strategies

queue_ids = st.from_regex(r"[0-9A-V]{16}", fullmatch=True)
times = st.floats(allow_nan=False, allow_infinity=False)
counts = st.integers(min_value=0)
header_fields = st.builds(
    lambda name, first, folds: name
    + ":"
    + first
    + "".join("\r\n" + space + line for space, line in folds),
    st.from_regex(r"[!-9;-~]{1,20}", fullmatch=True),
    st.text(alphabet=st.characters(blacklist_characters="\r\n")),
    st.lists(
        st.tuples(
            st.sampled_from([" ", "\t"]), st.text(st.characters(blacklist_characters="\r\n"))
        ),
        max_size=3,
    ),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)
recipients = st.builds(
    EnvelopeRecipient,
    address=st.text(),
    status=st.sampled_from(["pending", "delivered", "deferred", "bounced"]),
    attempts=counts,
    last_reply=st.none() | st.text(),
)
envelopes = st.builds(
    Envelope,
    queue_id=queue_ids,
    sender=st.text(),
    recipients=st.lists(recipients, min_size=1, max_size=4),
    received_at=times,
    listener=st.text(),
    client_address=st.text(),
    client_name=st.none() | st.text(),
    helo=st.none() | st.text(),
    auth_user=st.none() | st.text(),
    protocol=st.text(),
    mail_params=st.dictionaries(st.text(), st.none() | st.text(), max_size=4),
    prepend_headers=st.lists(header_fields, max_size=3),
    size=counts,
    attempts=counts,
    next_attempt=times,
    extra=st.dictionaries(st.text(), json_values, max_size=4),
)


# Round trip


@given(envelopes)
def test_round_trip(envelope: Envelope) -> None:
    """
    Any valid envelope, including strings with lone surrogates and
    arbitrary JSON in C{extra}, loads back equal to what was dumped.
    """
    assert load_envelope(dump_envelope(envelope)) == envelope


def test_round_trip_rich_envelope() -> None:
    """
    A hand-written envelope with every field set loads back equal.
    """
    envelope = rich_envelope()
    assert load_envelope(dump_envelope(envelope)) == envelope


def test_file_layout() -> None:
    """
    The file is one line of JSON with C{version} first, then an END record
    carrying the SHA-256 of exactly the JSON bytes.
    """
    data = dump_envelope(rich_envelope())
    body, end, final = data.split(b"\n")
    assert final == b""
    assert end == b"END sha256=" + hashlib.sha256(body).hexdigest().encode()
    assert body.startswith(b'{"version":1,"queue_id":')
    assert body.isascii()


def test_integer_times_load_as_floats() -> None:
    """
    Integer times (as a test clock may give) are written as floats, so the
    loaded envelope has the declared types.
    """
    envelope = rich_envelope()
    envelope.received_at = 5
    envelope.next_attempt = 0
    loaded = load_envelope(dump_envelope(envelope))
    assert type(loaded.received_at) is float and loaded.received_at == 5.0
    assert type(loaded.next_attempt) is float


# Damage


def assert_all_truncations_rejected(data: bytes) -> None:
    for length in range(len(data)):
        with pytest.raises(EnvelopeError):
            load_envelope(data[:length])


def assert_all_byte_flips_rejected(data: bytes, masks: tuple[int, ...]) -> None:
    for position in range(len(data)):
        for mask in masks:
            damaged = bytearray(data)
            damaged[position] ^= mask
            with pytest.raises(EnvelopeError):
                load_envelope(bytes(damaged))


def test_truncation_at_every_byte_is_detected() -> None:
    """
    A file cut short at any byte, as a crash or full disk leaves it, is
    refused.
    """
    assert_all_truncations_rejected(dump_envelope(rich_envelope()))


@settings(max_examples=25, deadline=None)
@given(envelopes)
def test_truncation_of_any_envelope_is_detected(envelope: Envelope) -> None:
    """
    Truncation at every byte is refused for generated envelopes too.
    """
    assert_all_truncations_rejected(dump_envelope(envelope))


def test_flipped_byte_at_every_position_is_detected() -> None:
    """
    Changing any single byte, in the JSON, the END record or the newlines,
    is refused.
    """
    assert_all_byte_flips_rejected(dump_envelope(rich_envelope()), (0x01, 0x20, 0x80, 0xFF))


@given(envelopes, st.data())
def test_flipped_byte_of_any_envelope_is_detected(envelope: Envelope, data: st.DataObject) -> None:
    """
    Any non-zero XOR of any one byte of any envelope file is refused.
    """
    original = dump_envelope(envelope)
    position = data.draw(st.integers(0, len(original) - 1))
    mask = data.draw(st.integers(1, 255))
    damaged = bytearray(original)
    damaged[position] ^= mask
    with pytest.raises(EnvelopeError):
        load_envelope(bytes(damaged))


@pytest.mark.parametrize(
    "suffix", [b"x", b"\n", b"END sha256=" + b"0" * 64 + b"\n"], ids=["byte", "newline", "record"]
)
def test_trailing_bytes_are_rejected(suffix: bytes) -> None:
    """
    Bytes after the END record (say, a second write appended) are refused.
    """
    with pytest.raises(EnvelopeError):
        load_envelope(dump_envelope(rich_envelope()) + suffix)


def test_bad_checksum_reason() -> None:
    """
    A well-formed END record with the wrong digest is reported as a
    checksum mismatch, the reason that ends up in the log.
    """
    data = dump_envelope(rich_envelope())
    body = data[: data.rindex(b"\nEND ")]
    with pytest.raises(EnvelopeError, match="checksum"):
        load_envelope(body + b"\nEND sha256=" + b"0" * 64 + b"\n")


@pytest.mark.parametrize("data", [b"", b"\n", b"{}", b"{}\n"])
def test_missing_end_record(data: bytes) -> None:
    """
    Empty files and files without an END record are refused as truncated.
    """
    with pytest.raises(EnvelopeError, match="truncated"):
        load_envelope(data)


# Field checks behind a valid checksum


def changed(**changes: Any) -> dict[str, Any]:
    document = document_of(rich_envelope())
    for key, value in changes.items():
        if value is KeyError:
            del document[key]
        else:
            document[key] = value
    return document


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        (changed(surprise=1), "unknown surprise"),
        (changed(sender=KeyError), "missing sender"),
        (changed(version=KeyError), "version"),
        (changed(version=2), "unsupported version 2"),
        (changed(version="1"), "version"),
        (changed(queue_id="../../etc/passwd"), "queue_id"),
        (changed(queue_id="0123456789abcduv"), "queue_id"),
        (changed(sender=None), "sender"),
        (changed(recipients=[]), "recipients"),
        (changed(recipients=["a@example.test"]), r"recipients\[0\]"),
        (changed(recipients=[{"address": "a@b"}]), r"recipients\[0\]: missing status"),
        (
            changed(
                recipients=[
                    {
                        "address": "a@b",
                        "status": "pending",
                        "attempts": 0,
                        "last_reply": None,
                        "x": 1,
                    }
                ]
            ),
            "unknown x",
        ),
        (
            changed(
                recipients=[{"address": "a@b", "status": "sent", "attempts": 0, "last_reply": None}]
            ),
            "unknown status",
        ),
        (
            changed(
                recipients=[
                    {"address": "a@b", "status": "pending", "attempts": True, "last_reply": None}
                ]
            ),
            "attempts",
        ),
        (changed(received_at="yesterday"), "received_at"),
        (changed(received_at=True), "received_at"),
        (changed(size=-1), "size"),
        (changed(size=1.0), "size"),
        (changed(attempts=False), "attempts"),
        (changed(helo=7), "helo"),
        (changed(mail_params={"SIZE": 10}), "mail_params"),
        (changed(mail_params=[]), "mail_params"),
        (changed(prepend_headers=["X-A: 1\r\n"]), "prepend_headers"),
        (changed(prepend_headers=["X-A: 1\nX-B: 2"]), "prepend_headers"),
        (changed(prepend_headers=["X-A: 1\r\nX-B: 2"]), "prepend_headers"),
        (changed(prepend_headers=["no colon"]), "prepend_headers"),
        (changed(extra=[]), "extra"),
        ([], "top level"),
    ],
)
def test_ill_formed_documents_are_rejected(document: Any, reason: str) -> None:
    """
    Missing, unknown and ill-typed fields are refused with a reason naming
    the field, even when the checksum is right.
    """
    with pytest.raises(EnvelopeError, match=reason):
        load_envelope(seal(document))


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"version":1,"version":1}', "duplicate"),
        (b'{"version":NaN}', "NaN"),
        (b'{"version":1', "bad JSON"),
        (b'{"version":1,"x":"\xff"}', "bad JSON"),
        (b'{"version":1,"x":' + b"9" * 5000 + b"}", "bad JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "bad JSON"),
    ],
    ids=["duplicate", "nan", "unfinished", "utf8", "huge-int", "deep"],
)
def test_bad_json_is_rejected(body: bytes, reason: str) -> None:
    """
    JSON that is malformed, not UTF-8, ambiguous or pathological is refused
    as EnvelopeError, never another exception type.
    """
    with pytest.raises(EnvelopeError, match=reason):
        load_envelope(seal(body))


def test_infinite_time_is_rejected() -> None:
    """
    A number that overflows to infinity is not accepted as a time.
    """
    body = json.dumps(changed(next_attempt=0), separators=(",", ":"))
    data = seal(body.replace('"next_attempt":0', '"next_attempt":1e999').encode())
    with pytest.raises(EnvelopeError, match="next_attempt"):
        load_envelope(data)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"extra": {"t": (1, 2)}}, "extra.t"),
        ({"extra": {"d": {1: "x"}}}, "non-string key"),
        ({"extra": {"f": float("nan")}}, "non-finite"),
        ({"extra": {"o": object()}}, "not a JSON value"),
        ({"size": True}, "size"),
        ({"received_at": float("inf")}, "received_at"),
        ({"recipients": [("a@b", "pending")]}, "EnvelopeRecipient"),
        ({"recipients": []}, "recipients"),
        ({"queue_id": "short"}, "queue_id"),
        ({"prepend_headers": ["Subject: x\r\n"]}, "prepend_headers"),
    ],
)
def test_dump_refuses_what_load_would_refuse(change: dict[str, Any], reason: str) -> None:
    """
    Nothing is written that could not be read back identically: values
    JSON would silently change (tuples, integer keys, NaN) are refused too.
    """
    envelope = rich_envelope()
    for key, value in change.items():
        setattr(envelope, key, value)
    with pytest.raises(EnvelopeError, match=reason):
        dump_envelope(envelope)


def test_version_constant() -> None:
    """
    The format version written is the one documented, 1.
    """
    assert ENVELOPE_VERSION == 1
    assert document_of(rich_envelope())["version"] == 1


# Queue ids


def test_queue_id_shape() -> None:
    """
    Queue ids are 16 upper-case base32hex characters, safe in file names.
    """
    queue_id = new_queue_id(1_700_000_000.0)
    assert len(queue_id) == 16
    assert set(queue_id) <= set(string.digits + "ABCDEFGHIJKLMNOPQRSTUV")
    assert is_queue_id(queue_id)


@given(st.floats(0, 4e9), st.floats(0, 4e9))
def test_queue_ids_sort_by_time(first: float, second: float) -> None:
    """
    Ids of messages received in different microseconds sort in time order,
    so a name-sorted directory listing is first-in first-out.
    """
    if int(first * 1_000_000) > int(second * 1_000_000):
        first, second = second, first
    a, b = new_queue_id(first), new_queue_id(second)
    if int(first * 1_000_000) < int(second * 1_000_000):
        assert a < b
    else:
        assert a[:11] == b[:11]


def test_queue_ids_within_one_microsecond_differ() -> None:
    """
    Ids made for the same instant carry randomness, so they almost never
    collide (the spool resolves the rare collision).
    """
    ids = {new_queue_id(1_700_000_000.0) for _ in range(50)}
    assert len(ids) >= 45


@pytest.mark.parametrize("now", [-1.0, float("nan"), float("inf"), 1e12])
def test_queue_id_refuses_impossible_times(now: float) -> None:
    """
    Times the id cannot encode are refused instead of wrapping around.
    """
    with pytest.raises(ValueError):
        new_queue_id(now)


@pytest.mark.parametrize(
    "value", ["", "0123456789ABCDEW", "0123456789ABCDE", "../0123456789ABC", 7, None]
)
def test_is_queue_id_rejects_other_values(value: object) -> None:
    """
    Anything that is not exactly a queue id, in particular a path, is not
    accepted as one.
    """
    assert not is_queue_id(value)
