"""Tests for L{gateway.dotstream}: the DATA section decoder.

The decoder is compared with two deliberately naive helpers written here for
clarity rather than speed: a line-by-line reference decoder and a reference
encoder (dot-stuffing plus terminator).  Property tests split the input at
random points to prove that chunking never changes the result.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.dotstream import DataDecoder

TERMINATOR = b"\r\n.\r\n"


# -- reference helpers -------------------------------------------------------


def reference_decode(wire: bytes) -> tuple[bytes, int] | None:
    """
    Decode a whole DATA section line by line, the way RFC 5321 §4.5.2 reads.

    @return: C{(content, consumed)}, or C{None} when the end was not found.
    """
    content = bytearray()
    position = 0
    while True:
        end_of_line = wire.find(b"\r\n", position)
        if end_of_line < 0:
            return None
        line = wire[position:end_of_line]
        if line == b".":
            return bytes(content), end_of_line + 2
        if line.startswith(b"."):
            line = line[1:]
        content += line + b"\r\n"
        position = end_of_line + 2


def reference_encode(content: bytes) -> bytes:
    """
    Dot-stuff C{content} and append the terminator, as a client would.

    Content that does not end with CRLF gets one, as RFC 5321 §4.1.1.4
    requires of the sender.
    """
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    lines = content.split(b"\r\n")[:-1] if content else []
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"


def has_bare_newline(content: bytes) -> bool:
    """Whether C{content} holds an LF without CR before it or a CR without LF after it."""
    return re.search(rb"\r(?!\n)|(?<!\r)\n", content) is not None


def has_long_line(content: bytes, max_line: int) -> bool:
    """Whether some CRLF-terminated line of C{content}, CRLF included, exceeds C{max_line}."""
    return any(len(line) + 2 > max_line for line in content.split(b"\r\n")[:-1])


def decode_chunks(
    chunks: list[bytes], max_size: int = 10**9, max_line: int = 1000
) -> tuple[DataDecoder, bytes, int]:
    """
    Feed C{chunks} in order, stopping at the end of data like a protocol would.

    @return: the decoder, the concatenated content and the total consumed.
    """
    decoder = DataDecoder(max_size, max_line)
    content = bytearray()
    consumed = 0
    for chunk in chunks:
        piece, used, done = decoder.feed(chunk)
        content += piece
        consumed += used
        if done:
            break
        assert used == len(chunk)
    return decoder, bytes(content), consumed


def split_at(data: bytes, points: list[int]) -> list[bytes]:
    """Cut C{data} at the sorted, de-duplicated C{points}."""
    cuts = [0, *sorted(set(points)), len(data)]
    return [data[a:b] for a, b in zip(cuts, cuts[1:])]


# -- basic behaviour ---------------------------------------------------------


def test_simple_message_keeps_crlf_of_last_line() -> None:
    """The CRLF before the final dot belongs to the content; the terminator does not."""
    decoder, content, consumed = decode_chunks([b"Subject: x\r\n\r\nbody\r\n.\r\n"])
    assert content == b"Subject: x\r\n\r\nbody\r\n"
    assert consumed == 23
    assert decoder.done
    assert decoder.size == len(content)
    assert not decoder.bare_newline
    assert not decoder.long_line


def test_empty_message() -> None:
    """A lone ".\\r\\n" right after DATA ends an empty message."""
    decoder = DataDecoder(100)
    assert decoder.feed(b".\r\n") == (b"", 3, True)
    assert decoder.size == 0


def test_empty_line_message() -> None:
    """A message made of one empty line is a CRLF, not the end of data."""
    decoder, content, consumed = decode_chunks([b"\r\n.\r\n"])
    assert (content, consumed, decoder.done) == (b"\r\n", 5, True)


def test_pipelined_commands_after_end_are_not_consumed() -> None:
    """Octets after the terminator are the next commands and are left to the caller."""
    data = b"hello\r\n.\r\nQUIT\r\n"
    decoder = DataDecoder(100)
    content, consumed, done = decoder.feed(data)
    assert done
    assert content == b"hello\r\n"
    assert data[consumed:] == b"QUIT\r\n"


def test_feed_after_done_consumes_nothing() -> None:
    """Once the end was seen, the decoder returns nothing and consumes nothing."""
    decoder = DataDecoder(100)
    decoder.feed(b".\r\n")
    assert decoder.feed(b"MAIL FROM:<a@b>\r\n") == (b"", 0, True)


def test_empty_chunk_is_harmless() -> None:
    """Feeding an empty chunk returns nothing and changes no state."""
    decoder = DataDecoder(100)
    assert decoder.feed(b"") == (b"", 0, False)
    assert decoder.feed(b".\r\n") == (b"", 3, True)


@pytest.mark.parametrize(("max_size", "max_line"), [(-1, 1000), (10, 1), (10, 0)])
def test_invalid_limits_rejected(max_size: int, max_line: int) -> None:
    """Nonsensical limits are a programming error, reported at construction."""
    with pytest.raises(ValueError):
        DataDecoder(max_size, max_line)


# -- dot-unstuffing (RFC 5321 §4.5.2; aiosmtpd issue 561) --------------------


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (b"..foo\r\n.\r\n", b".foo\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"...\r\n.\r\n", b"..\r\n"),
        (b"a\r\n..\r\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
        (b"a\r\n..b\r\n...c\r\n.\r\n", b"a\r\n.b\r\n..c\r\n"),
        (b"a.b\r\n.\r\n", b"a.b\r\n"),
        (b".x\r\n.\r\n", b"x\r\n"),
        (b"x\r\n. \r\n.\r\n", b"x\r\n \r\n"),
    ],
)
def test_dot_unstuffing(wire: bytes, expected: bytes) -> None:
    """A line starting with a dot loses exactly that dot; other dots stay."""
    decoder, content, consumed = decode_chunks([wire])
    assert decoder.done
    assert content == expected
    assert consumed == len(wire)


@pytest.mark.parametrize(
    "line",
    [b".", b"..", b"...", b".foo", b"..foo", b". ", b".\t", b".\r", b"..\r\r", b""],
)
def test_dot_lines_round_trip(line: bytes) -> None:
    """Lines that start with dots survive stuffing and unstuffing unchanged (aiosmtpd#561)."""
    message = b"first\r\n" + line + b"\r\n" + line + b"\r\nlast\r\n"
    wire = reference_encode(message)
    decoder, content, consumed = decode_chunks([wire])
    assert content == message
    assert consumed == len(wire)
    one_by_one = decode_chunks([wire[i : i + 1] for i in range(len(wire))])
    assert one_by_one[1] == message


# -- SMTP smuggling: only CRLF "." CRLF ends the data ------------------------


SMUGGLED = b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"


@pytest.mark.parametrize(
    ("fake_end", "decoded"),
    [
        (b"\n.\n", b"\n.\n"),
        (b"\r.\r", b"\r.\r"),
        (b"\n.\r\n", b"\n.\r\n"),
        (b"\r.\r\n", b"\r.\r\n"),
        (b"\n.\r", b"\n.\r"),
        (b"\r.\n", b"\r.\n"),
        (b"\r\n.\n", b"\r\n\n"),
        (b"\r\n.\r", b"\r\n\r"),
        (b"\r\n.\r\r\n", b"\r\n\r\r\n"),
        (b"\r\n.\n\r\n", b"\r\n\n\r\n"),
        (b"\r\r\n.\n", b"\r\r\n\n"),
    ],
)
def test_smuggling_variants_are_content(fake_end: bytes, decoded: bytes) -> None:
    """
    Bare-LF or bare-CR spellings of the terminator never end the data.

    They stay in the message (after the usual unstuffing of a dot that follows
    a real CRLF), the smuggled commands are content, and C{bare_newline} is set
    so the caller can refuse the message.
    """
    wire = b"hello" + fake_end + SMUGGLED + b"tail\r\n.\r\nNOOP\r\n"
    decoder, content, consumed = decode_chunks([wire])
    assert decoder.done
    assert content == b"hello" + decoded + SMUGGLED + b"tail\r\n"
    assert wire[consumed:] == b"NOOP\r\n"
    assert decoder.bare_newline


def test_dot_after_bare_lf_is_not_at_line_start() -> None:
    """Only CRLF starts a line for the dot rules, so "\\n..x" keeps both dots."""
    decoder, content, _ = decode_chunks([b"a\n..x\r\n.\r\n"])
    assert content == b"a\n..x\r\n"
    assert decoder.bare_newline


# -- chunking ----------------------------------------------------------------


SAMPLE = b"abc\r\n..dot\r\n.\rx\r\n\r\n.\r\nNOOP\r\n"


def test_split_into_two_at_every_position() -> None:
    """Cutting the input once, anywhere (also inside CRLF.CRLF), never changes the result."""
    expected = decode_chunks([SAMPLE])
    for cut in range(len(SAMPLE) + 1):
        decoder, content, consumed = decode_chunks([SAMPLE[:cut], SAMPLE[cut:]])
        assert (content, consumed) == expected[1:], cut
        assert decoder.size == expected[0].size
        assert decoder.bare_newline == expected[0].bare_newline


def test_split_into_three_at_every_pair_of_positions() -> None:
    """Cutting the input twice, anywhere, never changes the result."""
    expected = decode_chunks([SAMPLE])[1:]
    for first in range(len(SAMPLE) + 1):
        for second in range(first, len(SAMPLE) + 1):
            chunks = [SAMPLE[:first], SAMPLE[first:second], SAMPLE[second:]]
            assert decode_chunks(chunks)[1:] == expected, (first, second)


def test_one_byte_at_a_time() -> None:
    """A client that sends one octet per packet gets the same message and end."""
    wire = b".x\r\n..\r\nline\n.\r\r\n.\r\nQUIT\r\n"
    expected = decode_chunks([wire])
    decoder, content, consumed = decode_chunks([wire[i : i + 1] for i in range(len(wire))])
    assert (content, consumed) == expected[1:]
    assert wire[consumed:] == b"QUIT\r\n"
    assert decoder.bare_newline


def test_terminator_split_reports_consumed_within_last_chunk() -> None:
    """When the terminator spans chunks, C{consumed} counts only its octets in the last chunk."""
    decoder = DataDecoder(100)
    assert decoder.feed(b"x\r\n.") == (b"x", 4, False)
    assert decoder.feed(b"\r") == (b"", 1, False)
    assert decoder.feed(b"\nRSET\r\n") == (b"\r\n", 1, True)


def test_held_octets_that_turn_out_to_be_content_are_released() -> None:
    """A possible terminator start that is not one is returned with the next chunk."""
    decoder = DataDecoder(100)
    assert decoder.feed(b"x\r\n.\r") == (b"x", 5, False)
    assert decoder.feed(b"y\r\n.\r\n") == (b"\r\n\ry\r\n", 6, True)


def test_long_line_without_crlf_is_streamed() -> None:
    """
    A 50 MB line without CRLF is returned as it arrives, not buffered.

    At every step all but at most the four held-back octets have been returned,
    which is what bounds memory for hostile clients.
    """
    chunk = b"x" * 65536
    decoder = DataDecoder(10**9)
    fed = returned = 0
    for _ in range(800):
        content, consumed, done = decoder.feed(chunk)
        assert consumed == len(chunk) and not done
        fed += len(chunk)
        returned += len(content)
        assert fed - returned <= 4
    assert decoder.long_line
    content, consumed, done = decoder.feed(b"\r\n.\r\n")
    assert done and consumed == 5
    assert decoder.size == fed + 2


# -- limits and flags --------------------------------------------------------


def test_size_at_limit_is_accepted() -> None:
    """Content of exactly C{max_size} octets is not too big."""
    decoder, content, _ = decode_chunks([b"123456789\r\n.\r\n"], max_size=11)
    assert content == b"123456789\r\n"
    assert decoder.size == 11
    assert not decoder.too_big


def test_size_over_limit_stops_content_but_finds_end() -> None:
    """Past C{max_size}, content is cut at the limit, C{size} keeps counting, the end is found."""
    wire = b"0123456789\r\n" * 5 + b".\r\nQUIT\r\n"
    decoder = DataDecoder(20)
    pieces = []
    for i in range(0, len(wire), 7):
        content, consumed, done = decoder.feed(wire[i : i + 7])
        pieces.append(content)
        if done:
            break
    assert done
    assert b"".join(pieces) == (b"0123456789\r\n" * 5)[:20]
    assert decoder.too_big
    assert decoder.size == 60
    assert wire[i + consumed :] == b"QUIT\r\n"


def test_zero_size_limit_accepts_only_empty_message() -> None:
    """With C{max_size=0} any content makes the message too big."""
    decoder, content, _ = decode_chunks([b"x\r\n.\r\n"], max_size=0)
    assert content == b""
    assert decoder.too_big
    assert not decode_chunks([b".\r\n"], max_size=0)[0].too_big


def test_size_counts_unstuffed_octets() -> None:
    """The transparency dot is not part of the message and not counted."""
    decoder, content, _ = decode_chunks([b"..\r\n.\r\n"])
    assert content == b".\r\n"
    assert decoder.size == 3


def test_line_limit_boundary() -> None:
    """A 998-octet line plus CRLF is within the default limit; 999 octets is not."""
    assert not decode_chunks([b"x" * 998 + b"\r\n.\r\n"])[0].long_line
    assert decode_chunks([b"x" * 999 + b"\r\n.\r\n"])[0].long_line


def test_line_limit_ignores_transparency_dot() -> None:
    """RFC 5321 §4.5.3.1.6 does not count the dot added for transparency."""
    wire = b"." + b"." * 998 + b"\r\n.\r\n"  # 1001 octets on the wire, 1000 decoded
    assert not decode_chunks([wire])[0].long_line


def test_long_line_detected_across_chunks_and_before_crlf() -> None:
    """A long line split over chunks is noticed, as soon as it passes the limit."""
    decoder = DataDecoder(10**6, max_line=10)
    decoder.feed(b"abc\r\n12345")
    assert not decoder.long_line
    decoder.feed(b"678")
    assert not decoder.long_line  # 8 octets + CRLF still fits
    decoder.feed(b"9")
    assert decoder.long_line


def test_bare_lf_and_bare_cr_flags() -> None:
    """A bare LF or a bare CR anywhere sets C{bare_newline}; CRLF does not."""
    assert decode_chunks([b"a\nb\r\n.\r\n"])[0].bare_newline
    assert decode_chunks([b"a\rb\r\n.\r\n"])[0].bare_newline
    assert decode_chunks([b"\n.\r\n"])[0].bare_newline
    assert not decode_chunks([b"a\r\nb\r\n.\r\n"])[0].bare_newline


def test_crlf_split_over_chunks_is_not_bare() -> None:
    """A CR at the end of one chunk and an LF at the start of the next form a CRLF."""
    assert not decode_chunks([b"a\r", b"\nb\r\n.\r\n"])[0].bare_newline
    assert decode_chunks([b"a\r", b"b\r\n.\r\n"])[0].bare_newline
    assert decode_chunks([b"a", b"\nb\r\n.\r\n"])[0].bare_newline


# -- properties --------------------------------------------------------------

# An alphabet rich in the octets that matter makes interesting inputs likely.
wire_octets = st.binary(max_size=80).map(
    lambda raw: bytes(b"\r\n.x"[octet % 4] if octet < 200 else octet for octet in raw)
)


@settings(max_examples=500)
@given(
    body=wire_octets,
    data=st.data(),
    max_size=st.integers(0, 60),
    max_line=st.integers(2, 12),
)
def test_any_chunking_matches_reference(
    body: bytes, data: st.DataObject, max_size: int, max_line: int
) -> None:
    """Any input cut at any points decodes like the line-by-line reference, flags included."""
    wire = body + TERMINATOR + b"NEXT"
    expected = reference_decode(wire)
    assert expected is not None
    expected_content, expected_consumed = expected

    points = data.draw(st.lists(st.integers(0, len(wire)), max_size=10))
    decoder, content, consumed = decode_chunks(split_at(wire, points), max_size, max_line)
    assert decoder.done
    assert consumed == expected_consumed
    assert content == expected_content[:max_size]
    assert decoder.size == len(expected_content)
    assert decoder.too_big == (len(expected_content) > max_size)
    assert decoder.bare_newline == has_bare_newline(expected_content)
    assert decoder.long_line == has_long_line(expected_content, max_line)


@settings(max_examples=300)
@given(body=wire_octets, data=st.data())
def test_any_chunking_matches_one_shot(body: bytes, data: st.DataObject) -> None:
    """Incomplete input too: pieces differ, but the concatenated content and state agree."""
    whole = DataDecoder(10**6, 8)
    whole_content, whole_consumed, whole_done = whole.feed(body)
    points = data.draw(st.lists(st.integers(0, len(body)), max_size=10))
    decoder, content, consumed = decode_chunks(split_at(body, points), 10**6, 8)
    assert (content, consumed, decoder.done) == (whole_content, whole_consumed, whole_done)
    assert (decoder.size, decoder.bare_newline, decoder.long_line) == (
        whole.size,
        whole.bare_newline,
        whole.long_line,
    )
    # Whatever was held back is released identically once the end arrives.
    assert decoder.feed(TERMINATOR) == whole.feed(TERMINATOR)


@settings(max_examples=500)
@given(content=st.binary(max_size=200).map(lambda raw: raw.replace(b"\x00", b".")), data=st.data())
def test_encode_then_decode_round_trip(content: bytes, data: st.DataObject) -> None:
    """Dot-stuffing plus terminator, decoded in random chunks, gives the message back."""
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    wire = reference_encode(content)
    trailing = b"QUIT\r\n"
    stream = wire + trailing
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    decoder, decoded, consumed = decode_chunks(split_at(stream, points))
    assert decoded == content
    assert consumed == len(wire)
    assert decoder.size == len(content)


line_text = st.binary(max_size=10).map(lambda raw: raw.replace(b"\r", b"").replace(b"\n", b""))


@settings(max_examples=200)
@given(lines=st.lists(st.tuples(st.integers(0, 3), line_text), max_size=12))
def test_dot_lines_round_trip_property(lines: list[tuple[int, bytes]]) -> None:
    """Lines starting with any number of dots survive stuffing and octet-by-octet decoding."""
    message = b"".join(b"." * dots + text + b"\r\n" for dots, text in lines)
    wire = reference_encode(message)
    decoder, decoded, consumed = decode_chunks([wire[i : i + 1] for i in range(len(wire))])
    assert decoded == message
    assert consumed == len(wire)
    assert not decoder.bare_newline
