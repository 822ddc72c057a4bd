# -*- test-case-name: tests.test_dotstream -*-
"""Decode the DATA section of an SMTP transaction without doing any I/O.

The decoder turns the octets a client sends after "354" into message content:
it removes the dot added for transparency, finds the one true end of data, and
reports size, bare line ending and line length problems so that the caller can
pick a reply.  It never decides the reply itself and never reads or writes a
socket or a file; the protocol adapter feeds it whatever chunks the transport
delivered and stores what it returns.

The end of data is recognised only as C{CRLF "." CRLF}.  Every other spelling
(C{LF "." LF}, C{CR "." CR}, C{LF "." CRLF}, C{CRLF "." LF}, ...) is message
content, because a gateway that ends DATA where the next hop does not lets a
client smuggle a second message past the checks (CVE-2023-51764 and friends).

Standards:
    RFC 5321 §2.3.8 (lines end with CRLF only), §4.1.1.4 (DATA and its
    terminator), §4.5.2 (transparency: dot-stuffing), §4.5.3.1.6 (text line
    limit, not counting the stuffed dot), §4.5.3.1.7 (message size), RFC 1870
    (SIZE).

See also:
    L{gateway.smtpstate} (feeds this decoder and builds the replies),
    Postfix smtpd_forbid_bare_newline (CVE-2023-51764), aiosmtpd
    GHSA-pr2m-px7j-xg65 and issue 561 (dot-unstuffing regression),
    U{https://www.postfix.org/smtp-smuggling.html}.
"""

from __future__ import annotations

__all__ = ["DataDecoder"]

# The end of data.  Decoding starts as if this sequence's leading CRLF (the
# one that ended the DATA command) had just been read.
_TERMINATOR = b"\r\n.\r\n"
# A line that starts with a dot, seen from the CRLF that ended the previous
# line.  Replacing it with CRLF removes the transparency dot.
_STUFFED = b"\r\n."
_CRLF = b"\r\n"

# Suffixes of a chunk that may be the start of _TERMINATOR (longest first).
# Such a suffix is held back until the next chunk says what it is; every
# occurrence of _STUFFED and of CRLF is then inside one decoded segment.
_HELD_SUFFIXES = (b"\r\n.\r", b"\r\n.", b"\r\n", b"\r")


class DataDecoder:
    """
    Incremental, sans-I/O decoder for one DATA section.

    Why it is shaped like this: a gateway receives thousands of small messages
    a second and sometimes one of 50 MB, in chunks of arbitrary size.  The
    decoder therefore works on whole chunks with C-level C{bytes} operations
    (C{find}, C{count}, C{replace}, C{split}) and keeps at most four raw octets
    between calls (a possible beginning of C{CRLF "." CRLF}); it never buffers
    a line or a message.  Content may come back in pieces whose boundaries do
    not match the chunk boundaries; concatenated, they are exactly the
    unstuffed message.

    Line endings are kept as received.  Only CRLF ends a line for the dot
    rules: a dot after a bare LF or bare CR is ordinary content, neither
    removed nor taken as the end.  A line that starts with a dot after a CRLF
    loses that dot even when the rest of the line is unusual (C{CRLF "." LF}
    decodes to C{CRLF LF}); it is never the end of data.

    Size limit: once the content would exceed C{max_size} octets,
    L{too_big} is set and the content returned stops at exactly C{max_size}
    octets (the returned pieces are always a prefix of the message, at most
    C{max_size} long).  Decoding goes on, returning empty content, so that the
    end of data is still found and the caller can answer 552 at the right
    place instead of reading the rest of the message as commands.

    @ivar max_size: the largest acceptable content, in octets.
    @ivar max_line: the longest acceptable line, in octets including its CRLF
        and not counting a transparency dot (RFC 5321 §4.5.3.1.6).
    @ivar size: content octets seen so far (after unstuffing), including the
        octets dropped after the limit; compare it with C{SIZE=} or log it.
    @ivar too_big: C{size} exceeded C{max_size}; no further content is
        returned.
    @ivar bare_newline: a bare LF (not preceded by CR) or a bare CR (not
        followed by LF) occurred somewhere in the content.
    @ivar long_line: some line is longer than C{max_line} octets including its
        CRLF.  It may be set as soon as the unfinished line is too long,
        before its CRLF arrives (every content line ends with a CRLF because
        the terminator begins with one).
    @ivar done: the terminator was seen; further calls to L{feed} consume
        nothing.
    """

    __slots__ = (
        "max_size",
        "max_line",
        "size",
        "too_big",
        "bare_newline",
        "long_line",
        "done",
        "_held",
        "_virtual",
        "_line_length",
    )

    def __init__(self, max_size: int, max_line: int = 1000) -> None:
        """
        @param max_size: the largest acceptable content in octets (the
            listener's message size limit); C{0} accepts only an empty message.
        @param max_line: the longest acceptable line in octets, CRLF included;
            RFC 5321 requires at least 1000.
        @raise ValueError: if C{max_size} is negative or C{max_line} is shorter
            than a bare CRLF.
        """
        if max_size < 0:
            raise ValueError(f"max_size must not be negative, got {max_size}")
        if max_line < 2:
            raise ValueError(f"max_line must be at least 2 (a CRLF), got {max_line}")
        self.max_size = max_size
        self.max_line = max_line
        self.size = 0
        self.too_big = False
        self.bare_newline = False
        self.long_line = False
        self.done = False
        # Raw octets received but not yet decoded: always a proper prefix of
        # _TERMINATOR.  It starts as the CRLF that ended the DATA command, so
        # the beginning of the message is treated exactly like the beginning
        # of any other line; that CRLF is not content (_virtual).
        self._held = _CRLF
        self._virtual = True
        # Octets of the current, unfinished line decoded so far.
        self._line_length = 0

    def feed(self, data: bytes) -> tuple[bytes, int, bool]:
        """
        Consume the next chunk of the DATA section.

        Why C{consumed} exists: a pipelining client may send its next command
        in the same packet as the end of data, and those octets belong to the
        command parser, not to this message.

        @param data: the octets received from the client, of any length; an
            empty chunk is allowed and changes nothing.
        @return: C{(content, consumed, done)}.  C{content} is unstuffed message
            content to append to the stored message (possibly empty, for
            example while a possible terminator is held back or after the size
            limit).  C{consumed} is how many octets of C{data} belong to the
            DATA section: all of them until the end is found, then up to and
            including the terminating C{CRLF "." CRLF}; C{data[consumed:]} is
            the client's next commands.  C{done} is C{True} once the
            terminator has been seen.  After that, every call returns
            C{(b"", 0, True)}.
        """
        if self.done:
            return b"", 0, True
        if not data:
            return b"", 0, False
        held = self._held
        buffer = held + data
        end = buffer.find(_TERMINATOR)
        if end >= 0:
            # The CRLF before the final dot ends the last content line.
            segment = buffer[: end + 2]
            consumed = end + len(_TERMINATOR) - len(held)
            self._held = b""
            self.done = True
        else:
            keep = 0
            for suffix in _HELD_SUFFIXES:
                if buffer.endswith(suffix):
                    keep = len(suffix)
                    break
            if keep:
                segment = buffer[:-keep]
                self._held = buffer[-keep:]
            else:
                segment = buffer
                self._held = b""
            consumed = len(data)
        return self._decode(segment), consumed, self.done

    def _decode(self, segment: bytes) -> bytes:
        """
        Unstuff one segment and update the counters and flags.

        A segment never splits a CRLF or a C{CRLF "."} pair, and never ends
        with a CR (see L{_HELD_SUFFIXES}), so counting line endings inside it
        and across segments gives the same answer.

        @param segment: raw octets, starting with the virtual CRLF while
            C{_virtual} is set.
        @return: the content to hand to the caller, cut at the size limit.
        """
        if not segment:
            return b""
        if not self.bare_newline:
            # Every LF and every CR must be part of a CRLF; the virtual CRLF
            # is balanced, so it does not disturb the comparison.
            crlf = segment.count(_CRLF)
            if segment.count(b"\n") != crlf or segment.count(b"\r") != crlf:
                self.bare_newline = True
        decoded = segment.replace(_STUFFED, _CRLF)
        if self._virtual:
            # Held octets are only ever cut before a CR, so the virtual CRLF
            # is whole at the front of the first non-empty segment.
            decoded = decoded[2:]
            self._virtual = False
        length = len(decoded)
        if not length:
            return b""
        if not self.long_line:
            self._check_lines(decoded)
        before = self.size
        self.size = before + length
        if self.too_big:
            return b""
        if self.size > self.max_size:
            self.too_big = True
            return decoded[: self.max_size - before]
        return decoded

    def _check_lines(self, decoded: bytes) -> None:
        """
        Track the current line's length and set L{long_line}.

        The common case (a short segment, or one whose lines are all short)
        costs one C{split}; a 50 MB line without CRLF costs one C{rfind} per
        chunk and keeps only an integer between chunks.

        @param decoded: unstuffed content that continues the current line.
        """
        limit = self.max_line - 2  # octets allowed before the CRLF
        length = len(decoded)
        if self._line_length + length <= limit:
            last = decoded.rfind(_CRLF)
            if last < 0:
                self._line_length += length
            else:
                self._line_length = length - last - 2
            return
        lines = decoded.split(_CRLF)
        current = self._line_length + len(lines[0])
        if len(lines) > 1:
            if current > limit or max(map(len, lines[1:-1]), default=0) > limit:
                self.long_line = True
                return
            current = len(lines[-1])
        if current > limit:
            self.long_line = True
            return
        self._line_length = current
