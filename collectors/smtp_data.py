"""The body of an SMTP ``DATA`` command, read in bounded segments instead of line by line.

Why not aiosmtpd's own reader: it keeps one ``bytearray`` per line and, once the terminating
dot arrives, strips the leading dots, joins and frees them all in one go on the event loop. For a
4 MB mail of 400,000 short lines that is one unbroken stretch of 80-140 ms (profiled; see
docs/BENCHMARKS.md, receivers under pressure (b)). Here the body arrives in pieces of at most
``CHUNK`` bytes; each segment is measured, unstuffed and appended to one buffer with a few
C-speed ``bytes`` calls, and the loop gets a turn after every segment.

Semantics are aiosmtpd 1.4's (RFC 5321 4.5.2): the body ends at a line that is a lone dot; one
leading dot is removed from every line; a body over ``size_limit`` or with a line longer than
``line_limit`` (CRLF included) is read to its end and then refused, by whichever bound the
stream crossed first (``Body.state``).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable

CHUNK = 64 * 1024  # bytes handled in one go on the loop
YIELD_PIECES = 64  # a turn for the loop at least this often, however small the pieces
CRLF = b"\r\n"
DOT = b".\r\n"


class State(enum.Enum):
    NOMINAL = "nominal"
    TOO_LONG = "too long"  # a line over line_limit: aiosmtpd answers 500
    TOO_MUCH = "too much"  # over size_limit: aiosmtpd answers 552


class Body:
    """Incremental DATA body. ``feed`` takes raw (dot-stuffed) bytes as they come, ``finish``
    settles ``state`` at the dot, ``content`` gives the unstuffed mail. Once a bound is crossed
    the data is dropped (memory) and only the state is kept.

    Invariant: a segment never ends in ``\\r`` or ``\\r\\n`` (those bytes are carried to the next
    one), so no CRLF, and no ``\\r\\n.``, straddles two segments; the stream starts with a
    virtual CRLF (the one that ended the ``DATA`` command), so the first line is a line like any
    other."""

    def __init__(self, size_limit: int | None, line_limit: int) -> None:
        self._size_limit = size_limit or None
        self._line_limit = line_limit
        self._out = bytearray()
        self._carry = CRLF  # the virtual CRLF, then the held-back tail of the last feed
        self._virtual = True  # the virtual CRLF is still at the head of the next segment
        self._line = 0  # bytes of the unfinished line so far
        self._size = -len(CRLF)  # raw bytes of the finished lines (the virtual CRLF is none)
        self.state = State.NOMINAL

    def feed(self, raw: bytes | bytearray) -> None:
        text = self._carry + raw
        cut = len(text) - (2 if text.endswith(CRLF) else 1 if text.endswith(b"\r") else 0)
        self._carry = bytes(text[cut:])
        self._segment(text[:cut])

    def finish(self) -> None:
        """The dot line came: the held-back tail is the last line's CRLF; ``state`` is final."""
        self._segment(self._carry)
        self._carry = b""

    def content(self) -> bytes:
        """The mail as aiosmtpd's ``original_content`` would be (after ``finish``)."""
        assert not self._carry, "finish() first"
        return bytes(self._out)

    def _segment(self, seg: bytes | bytearray) -> None:
        if not seg or self.state is not State.NOMINAL:
            return
        lines = seg.split(CRLF)  # the first continues the unfinished line, the last is unfinished
        first = self._line + len(lines[0])
        if len(lines) == 1:
            done, longest, unfinished = 0, -1, first
        else:
            done = self._line + len(seg) - len(lines[-1])
            longest = max(first, max(map(len, lines[1:-1]), default=0))
            unfinished = len(lines[-1])
        crossed = longest + len(CRLF) > self._line_limit or unfinished > self._line_limit
        if crossed or (self._size_limit is not None and self._size + done > self._size_limit):
            self.state = self._first_bound(lines)
        if self.state is not State.NOMINAL:
            self._out = bytearray()  # as aiosmtpd: discard at once, read on to the dot
            return
        self._size += done
        self._line = first if len(lines) == 1 else unfinished
        unstuffed = seg.replace(b"\r\n.", CRLF)
        if self._virtual:  # every segment is non-empty, so the first starts with the virtual CRLF
            unstuffed = unstuffed[len(CRLF) :]
            self._virtual = False
        self._out += unstuffed

    def _first_bound(self, lines: list[bytes] | list[bytearray]) -> State:
        """Which bound the segment crosses first, line by line as aiosmtpd meets them: its
        ``readuntil`` overruns on a line of more than ``line_limit`` bytes before the CRLF (500
        before the line is counted); a shorter line is counted (552 if over ``size_limit``) and
        then checked with its CRLF (500)."""
        size, line, last = self._size, self._line, len(lines) - 1
        for i, text in enumerate(lines):
            length = line + len(text)
            if length > self._line_limit:
                return State.TOO_LONG
            if i == last:  # unfinished: neither counted nor checked yet
                break
            size += length + len(CRLF)
            if self._size_limit is not None and size > self._size_limit:
                return State.TOO_MUCH
            if length + len(CRLF) > self._line_limit:
                return State.TOO_LONG
            line = 0
        return State.NOMINAL


async def read_body(
    reader: asyncio.StreamReader, body: Body, alive: Callable[[], bool], chunk: int = CHUNK
) -> bool:
    """Feed ``body`` from ``reader`` up to and without the terminating dot line, then
    ``body.finish()``; whatever follows (a pipelined command) stays in the reader. False if the
    connection went away first.

    The search is for ``.\\r\\n``, which lies wholly in the reader, and the CRLF before it is
    checked in what was already read: the first line may be the lone dot, right after the CRLF
    of the ``DATA`` command. ``readuntil`` raises ``LimitOverrunError`` (the reader's limit is
    aiosmtpd's line length) when the dot line is not near: then the part that cannot hold its
    start is taken, at most ``chunk`` bytes at once."""
    tail = CRLF  # the last two bytes read so far
    pending = bytearray()
    pieces = 0
    while alive():
        try:
            piece = await reader.readuntil(DOT)
        except asyncio.LimitOverrunError as exc:
            piece = await reader.read(min(exc.consumed, chunk))
        except asyncio.IncompleteReadError:  # EOF before the dot (aiosmtpd cancels us first)
            return False
        if piece.endswith(DOT):
            before = piece[-5:-3] if len(piece) >= 5 else (tail + piece[:-3])[-2:]
            if before == CRLF:
                pending += piece[: -len(DOT)]
                body.feed(pending)
                body.finish()
                return True
        tail = piece[-2:] if len(piece) >= 2 else (tail + piece)[-2:]
        pending += piece
        pieces += 1
        if len(pending) >= chunk:
            body.feed(pending)
            pending = bytearray()
            await asyncio.sleep(0)
        elif pieces % YIELD_PIECES == 0:
            await asyncio.sleep(0)
    return False
