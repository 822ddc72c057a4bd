"""Tests for L{gateway.trace}: the Received, Date and Message-ID headers.

Pure units: the functions take the time as an argument, so no clock is
needed.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import re
import time

import pytest

from gateway.trace import format_date, message_id, received_header

NOW = 1_700_000_000  # 2023-11-14T22:13:20Z


def _received(**overrides):
    arguments = dict(
        helo="client.example", peer="192.0.2.1", peer_name=None, hostname="mx.example.test",
        protocol="ESMTP", queue_id="00ABCDEF", recipients=["a@example.test"], tls=None, now=NOW,
    )
    arguments.update(overrides)
    return received_header(**arguments)


def _parse_back(name: str, value: str):
    """Parse "name: value" as a message header and return the unfolded value."""
    raw = f"{name}: {value}\r\n\r\n".encode("utf-8")
    message = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw)
    return message


@pytest.fixture
def timezone(monkeypatch):
    """Run the test in a given TZ, restoring the process time zone after."""
    def use(name: str) -> None:
        monkeypatch.setenv("TZ", name)
        time.tzset()
    yield use
    monkeypatch.undo()
    time.tzset()


def test_received_without_tls_one_recipient():
    """With one recipient and no TLS the field has from, by, with/id and a
    for clause, folded with CRLF TAB, and ends with the date."""
    name, value = _received()
    assert name == "Received"
    assert value == (
        "from client.example (unknown [192.0.2.1])\r\n"
        "\tby mx.example.test (mailgateway)\r\n"
        "\twith ESMTP id 00ABCDEF\r\n"
        f"\tfor <a@example.test>; {format_date(NOW)}"
    )


def test_received_with_tls_names_version_and_cipher():
    """With TLS, a comment names the protocol version and cipher."""
    _, value = _received(tls=("TLSv1.3", "TLS_AES_256_GCM_SHA384"), protocol="ESMTPS")
    lines = value.split("\r\n\t")
    assert lines[2] == "(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)"
    assert lines[3] == "with ESMTPS id 00ABCDEF"


def test_received_without_tls_has_no_using_clause():
    """Without TLS there is no "(using ...)" comment."""
    _, value = _received()
    assert "using" not in value


def test_received_several_recipients_no_for_clause():
    """With several recipients no for clause is added (no Bcc disclosure)."""
    _, value = _received(recipients=["a@example.test", "b@example.test"])
    assert "for <" not in value
    assert value.endswith(f"with ESMTP id 00ABCDEF; {format_date(NOW)}")


def test_received_no_recipients_no_for_clause():
    """With no recipients there is no for clause either."""
    _, value = _received(recipients=[])
    assert " for " not in value


def test_received_ipv6_peer_uses_ipv6_literal():
    """An IPv6 client is written as an RFC 5321 IPv6 address literal."""
    _, value = _received(peer="2001:db8::1")
    assert value.startswith("from client.example (unknown [IPv6:2001:db8::1])\r\n")


def test_received_ipv4_peer_has_no_prefix():
    """An IPv4 client is written as a bare dotted quad in brackets."""
    _, value = _received(peer="198.51.100.7")
    assert "(unknown [198.51.100.7])" in value
    assert "IPv6" not in value


def test_received_peer_name_shown_when_verified():
    """A verified reverse name replaces "unknown" in the client comment."""
    _, value = _received(peer_name="mail.client.example")
    assert value.startswith("from client.example (mail.client.example [192.0.2.1])")


def test_received_without_helo_says_unknown():
    """Without a HELO name the from clause says "unknown"."""
    _, value = _received(helo=None)
    assert value.startswith("from unknown (unknown [192.0.2.1])")


def test_received_hostile_helo_is_cleaned():
    """A HELO with line breaks, parentheses, backslashes, spaces or
    non-ASCII cannot break the header or inject another field."""
    helo = "evil)\r\nBcc: victim@example.com (x\\y \u00e9"
    _, value = _received(helo=helo)
    first = value.split("\r\n\t")[0]
    assert first == "from evil???Bcc:?victim@example.com??x?y?? (unknown [192.0.2.1])"
    assert value.count("\r\n") == 3
    message = _parse_back("Received", value)
    assert message.keys() == ["Received"]


def test_received_helo_is_truncated():
    """An over-long HELO is cut to 255 characters."""
    _, value = _received(helo="a" * 1000)
    assert value.startswith("from " + "a" * 255 + " (unknown")


def test_received_parses_back_and_date_matches():
    """The folded field parses as one header whose date is the given time."""
    name, value = _received(recipients=["a@example.test", "b@example.test"])
    message = _parse_back(name, value)
    unfolded = message["Received"]
    date_text = unfolded.rsplit(";", 1)[1].strip()
    assert email.utils.parsedate_to_datetime(date_text).timestamp() == NOW


def test_message_id_format():
    """A Message-ID is <queue_id.random@hostname>."""
    value = message_id("00ABCDEF", "mx.example.test")
    assert re.fullmatch(r"<00ABCDEF\.[0-9a-f]{12}@mx\.example\.test>", value)


def test_message_id_is_a_valid_msg_id():
    """email.utils sees one address-like msg-id with the hostname as domain."""
    value = message_id("00ABCDEF", "mx.example.test")
    _, address = email.utils.parseaddr(value)
    assert address.endswith("@mx.example.test")


def test_message_ids_are_unique_for_the_same_queue_id():
    """Two calls never give the same Message-ID, even for one queue id."""
    values = {message_id("00ABCDEF", "mx.example.test") for _ in range(1000)}
    assert len(values) == 1000


@pytest.mark.parametrize("now", [0, NOW, NOW + 0.75, 2_000_000_000])
def test_format_date_parses_back(now):
    """format_date() gives an RFC 5322 date that parses back to the same
    second."""
    text = format_date(now)
    parsed = email.utils.parsedate_to_datetime(text)
    assert parsed.tzinfo is not None
    assert parsed.timestamp() == int(now)


def test_format_date_rfc5322_shape():
    """The date has day name, numeric zone offset and no "GMT"/"-0000"."""
    text = format_date(NOW)
    assert re.fullmatch(
        r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
        r"\d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}", text)
    assert not text.endswith("-0000")


@pytest.mark.parametrize("zone, offset", [("UTC0", "+0000"), ("IST-5:30", "+0530"), ("EST5", "-0500")])
def test_format_date_uses_local_offset(timezone, zone, offset):
    """The date is in local time with the local offset, and still the same
    instant."""
    timezone(zone)
    text = format_date(NOW)
    assert text.endswith(offset)
    assert email.utils.parsedate_to_datetime(text).timestamp() == NOW
