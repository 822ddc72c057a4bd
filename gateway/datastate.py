"""One message while it is being received: the DATA decoder, the spool
file it streams into, the (bounded) copy of its header block, and what
went wrong, if anything.

Why the header block is held back until it is complete: a border MTA must
drop C{Authentication-Results:} fields that claim our authserv-id before
anything downstream can trust them (RFC 8601 §5), and plugins need the
parsed header block.  Everything after the header streams straight to the
spool, so memory does not grow with the message.

Standards: RFC 5321 §4.5.3.1 (limits), RFC 8601 §5.
See also: L{gateway.dotstream}, L{gateway.queue.MessageWriter}.
"""

from __future__ import annotations

from gateway import reply as R
from gateway.dotstream import DataDecoder
from gateway.queue import MessageWriter, QueueError
from gateway.reply import Reply
from gateway.trace import strip_forged_results


class IncomingMessage:
    """One message being received: the decoder, the spool file, the header
    block (bounded copy) and what went wrong, if anything."""

    def __init__(self, writer: MessageWriter, max_size: int, max_line: int, max_header: int) -> None:
        self.writer = writer
        self.decoder = DataDecoder(max_size, max_line)
        self.header_block = bytearray()
        self.headers_done = False
        self.header_too_big = False
        self.max_header = max_header
        self.storage_error: QueueError | None = None
        self.started = 0.0
        self.authserv_id: str | None = None
        self.forged_removed = 0

    def add(self, content: bytes) -> None:
        """Take decoded content: held back until the header block is
        complete (so forged Authentication-Results can be dropped), then
        streamed to the spool file."""
        if self.headers_done:
            self._write(content)
            return
        start = max(0, len(self.header_block) - 3)
        self.header_block += content
        if self.header_block.startswith(b"\r\n"):
            self._release(0)
            return
        end = self.header_block.find(b"\r\n\r\n", start)
        if end >= 0:
            self._release(end + 2)
        elif len(self.header_block) > self.max_header:
            self.header_too_big = True
            self.headers_done = True
            held, self.header_block = bytes(self.header_block), bytearray()
            self._write(held)

    def finish(self) -> None:
        """End of DATA: a message that is all header is released now."""
        if not self.headers_done:
            self._release(len(self.header_block))

    def _release(self, header_end: int) -> None:
        held = bytes(self.header_block)
        header, rest = held[:header_end], held[header_end:]
        if self.authserv_id and b"authentication-results" in header.lower():
            header, self.forged_removed = strip_forged_results(header, self.authserv_id)
        self.header_block = bytearray(header + b"\r\n")
        self.headers_done = True
        self._write(header + rest)

    def _write(self, content: bytes) -> None:
        if self.storage_error is None and content:
            try:
                self.writer.write(content)
            except QueueError as exc:
                self.storage_error = exc

    def problem(self) -> Reply | None:
        """The reply for a message that must not be queued, or None."""
        if self.storage_error is not None:
            return R.STORAGE_FAILED
        decoder = self.decoder
        if decoder.too_big:
            return R.MESSAGE_TOO_BIG
        if decoder.bare_newline:
            return R.BARE_NEWLINE
        if decoder.long_line:
            return R.TEXT_LINE_TOO_LONG
        if self.header_too_big:
            return R.HEADER_TOO_BIG
        return None

    def abort(self) -> None:
        self.writer.abort()
