"""Tests for L{gateway.reply} (reply values and their wire format) and
L{gateway.verdict} (plugin verdicts and their constructors).

Pure units: no reactor, no transport.
"""

from __future__ import annotations

import dataclasses

import pytest

from gateway import reply as R
from gateway.reply import Reply, soften
from gateway.verdict import (
    CONTINUE,
    Action,
    Verdict,
    accept,
    cont,
    from_reply,
    reject,
    tempfail,
)

# -- Reply: wire format -------------------------------------------------------


def test_single_line_reply_bytes():
    """A one-line reply is code, space, enhanced status, space, text, CRLF."""
    assert Reply(250, "2.1.0", "Sender ok").to_bytes() == b"250 2.1.0 Sender ok\r\n"


def test_multiline_reply_every_line_has_code_and_status():
    """A multiline reply uses "code-" on every line but the last, and every
    line repeats the enhanced status code (RFC 2034 §4)."""
    reply = Reply(550, "5.7.1", "first\nsecond\nthird")
    assert reply.to_bytes() == (
        b"550-5.7.1 first\r\n"
        b"550-5.7.1 second\r\n"
        b"550 5.7.1 third\r\n"
    )


def test_three_digit_reply_without_status_has_no_status_field():
    """A 3xx reply has no RFC 3463 class, so it is sent without a status."""
    assert R.START_DATA.to_bytes() == b"354 End data with <CR><LF>.<CR><LF>\r\n"


def test_non_ascii_text_is_sent_as_utf8():
    """Reply text is encoded as UTF-8 on the wire."""
    assert Reply(550, "5.1.1", "Unknown user \u00fc").to_bytes() == (
        "550 5.1.1 Unknown user \u00fc\r\n".encode("utf-8")
    )


def test_str_is_one_line_summary():
    """str() gives "code status text" for log lines."""
    assert str(Reply(451, "4.7.1", "Try later")) == "451 4.7.1 Try later"
    assert str(R.START_DATA) == "354 End data with <CR><LF>.<CR><LF>"


def test_with_text_keeps_code_and_status():
    """with_text() changes only the text."""
    assert R.RELAY_DENIED.with_text("No") == Reply(554, "5.7.1", "No")


def test_reply_is_frozen():
    """A Reply is a value: its fields cannot be reassigned."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        R.OK.code = 550  # type: ignore[misc]


# -- Reply: validation --------------------------------------------------------


@pytest.mark.parametrize("code", [199, 600, 0, -250])
def test_code_out_of_range_refused(code):
    """Reply codes outside 200..599 are refused."""
    with pytest.raises(ValueError, match="out of range"):
        Reply(code, "2.0.0", "x")


@pytest.mark.parametrize("status", ["5.7", "5.7.1.1", "x.y.z", "5.1000.1", "3.0.0", "1.0.0", " 5.7.1", ""])
def test_malformed_status_refused(status):
    """The enhanced status must be class.subject.detail with class 2, 4 or 5
    (a missing status is allowed only for 3xx)."""
    with pytest.raises(ValueError, match="malformed"):
        Reply(550, status, "x")


@pytest.mark.parametrize("code, status", [(550, "4.7.1"), (451, "5.7.1"), (250, "5.0.0"), (550, "2.0.0")])
def test_status_class_must_match_code(code, status):
    """The status class must equal the first digit of the code (RFC 3463 §2)."""
    with pytest.raises(ValueError, match="does not match"):
        Reply(code, status, "x")


def test_carriage_return_in_text_refused():
    """A CR in the text could inject a reply line; it is refused."""
    with pytest.raises(ValueError, match="CR"):
        Reply(550, "5.7.1", "bad\r\n250 2.0.0 ok")


def test_3xx_without_status_accepted():
    """RFC 2034 defines no class for 3xx, so an empty status is fine there."""
    assert Reply(354, "", "go ahead").status == ""


# -- Reply: classes and soften ------------------------------------------------


@pytest.mark.parametrize(
    "reply, positive, temporary, permanent",
    [
        (Reply(250, "2.0.0", "ok"), True, False, False),
        (Reply(354, "", "go"), True, False, False),
        (Reply(421, "4.4.2", "bye"), False, True, False),
        (Reply(499, "4.0.0", "x"), False, True, False),
        (Reply(500, "5.5.2", "x"), False, False, True),
        (Reply(554, "5.7.1", "x"), False, False, True),
    ],
)
def test_class_checks(reply, positive, temporary, permanent):
    """is_positive, is_temporary and is_permanent follow the first digit."""
    assert (reply.is_positive, reply.is_temporary, reply.is_permanent) == (positive, temporary, permanent)


def test_soften_turns_5xx_into_4xx_twin():
    """soften() maps 5yz x.a.b to 4yz 4.a.b and keeps the text."""
    assert soften(Reply(550, "5.7.1", "No")) == Reply(450, "4.7.1", "No")
    assert soften(R.RELAY_DENIED) == Reply(454, "4.7.1", "Relay access denied")
    assert soften(R.MESSAGE_TOO_BIG) == Reply(452, "4.3.4", R.MESSAGE_TOO_BIG.text)


@pytest.mark.parametrize("reply", [R.OK, R.START_DATA, R.PLUGIN_FAILED, R.TIMEOUT])
def test_soften_leaves_non_permanent_replies_alone(reply):
    """soften() returns 2xx, 3xx and 4xx replies unchanged."""
    assert soften(reply) is reply


# -- Verdict ------------------------------------------------------------------


def test_reject_defaults():
    """reject() is a REJECT with 550 5.7.1 and no disconnect."""
    verdict = reject()
    assert verdict.action is Action.REJECT
    assert verdict.reply == Reply(550, "5.7.1", "Rejected by policy")
    assert verdict.disconnect is False
    assert verdict.is_final


def test_reject_custom_and_disconnect():
    """reject() takes code, status, text and disconnect."""
    verdict = reject(554, "5.7.0", "Go away", disconnect=True)
    assert verdict.reply == Reply(554, "5.7.0", "Go away")
    assert verdict.disconnect is True


def test_tempfail_defaults():
    """tempfail() is a TEMPFAIL with 451 4.7.1."""
    verdict = tempfail()
    assert verdict.action is Action.TEMPFAIL
    assert verdict.reply == Reply(451, "4.7.1", "Try again later")
    assert verdict.is_final


def test_reject_with_4xx_refused():
    """A REJECT verdict with a temporary reply is refused."""
    with pytest.raises(ValueError, match="REJECT verdict needs a 5xx"):
        reject(450, "4.7.1", "x")


def test_tempfail_with_5xx_refused():
    """A TEMPFAIL verdict with a permanent reply is refused."""
    with pytest.raises(ValueError, match="TEMPFAIL verdict needs a 4xx"):
        tempfail(550, "5.7.1", "x")


def test_reject_with_mismatched_status_refused():
    """A reject() whose code and status disagree fails in Reply."""
    with pytest.raises(ValueError, match="does not match"):
        reject(550, "4.7.1", "x")


@pytest.mark.parametrize("action", [Action.REJECT, Action.TEMPFAIL])
def test_failing_verdict_needs_reply(action):
    """REJECT and TEMPFAIL without a reply are refused."""
    with pytest.raises(ValueError):
        Verdict(action)


def test_accept_without_reply():
    """accept() without a reply means "use the default positive reply"."""
    verdict = accept()
    assert verdict.action is Action.ACCEPT
    assert verdict.reply is None
    assert verdict.is_final


def test_accept_with_positive_reply():
    """accept() may carry a 2xx reply of its own."""
    assert accept(Reply(250, "2.1.5", "Fine")).reply == Reply(250, "2.1.5", "Fine")


@pytest.mark.parametrize("reply", [Reply(550, "5.7.1", "x"), Reply(451, "4.7.1", "x")])
def test_accept_with_failure_reply_refused(reply):
    """An ACCEPT carrying a 4xx or 5xx reply is refused."""
    with pytest.raises(ValueError, match="ACCEPT"):
        accept(reply)


def test_continue_with_reply_refused():
    """A CONTINUE verdict carries no reply."""
    with pytest.raises(ValueError, match="CONTINUE"):
        Verdict(Action.CONTINUE, R.OK)


def test_cont_without_headers_is_the_constant():
    """cont() with nothing to add is the shared CONTINUE value."""
    assert cont() is CONTINUE
    assert not CONTINUE.is_final


def test_cont_with_headers():
    """cont() can carry header fields to prepend."""
    verdict = cont((("X-Spam", "no"),))
    assert verdict.action is Action.CONTINUE
    assert verdict.add_headers == (("X-Spam", "no"),)


@pytest.mark.parametrize("name", ["", "X Spam", "X:Spam", "X-Spam\r\nBcc", "X\tA"])
def test_bad_header_name_refused(name):
    """Header names must be non-empty and have no colon or white space."""
    with pytest.raises(ValueError, match="bad header name"):
        cont(((name, "v"),))


@pytest.mark.parametrize("value", ["a\r\nBcc: x@example.com", "a\nb", "a\rb", "a\r\n"])
def test_header_value_with_bare_line_break_refused(value):
    """A header value may not contain CR or LF that would start a new field."""
    with pytest.raises(ValueError, match="bad header value"):
        accept(add_headers=(("X-Test", value),))


def test_folded_header_value_accepted():
    """A header value folded with CRLF + tab or CRLF + space is allowed."""
    verdict = cont((("X-Report", "first part\r\n\tsecond part\r\n third"),))
    assert verdict.add_headers[0][1] == "first part\r\n\tsecond part\r\n third"


def test_from_reply_picks_action_by_class():
    """from_reply() maps 5xx to REJECT, 4xx to TEMPFAIL and 2xx to ACCEPT."""
    assert from_reply(Reply(550, "5.1.1", "x")).action is Action.REJECT
    assert from_reply(Reply(450, "4.2.0", "x")).action is Action.TEMPFAIL
    assert from_reply(Reply(250, "2.1.5", "x")).action is Action.ACCEPT
    assert from_reply(Reply(421, "4.7.0", "x"), disconnect=True).disconnect is True
    assert from_reply(Reply(550, "5.1.1", "x")).reply == Reply(550, "5.1.1", "x")


def test_verdict_is_frozen():
    """A Verdict cannot be changed after it was returned."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        CONTINUE.action = Action.ACCEPT  # type: ignore[misc]
