"""Reading what an SMTP client sends with bounded memory: command lines that end in CRLF and nothing else
(RFC 5321 §2.3.8), and DATA up to the lone dot (RFC 5321 §4.1.1.4, §4.5.2) within the size limit, the line
limit, the listener's memory budget and the DATA timeouts. The listeners of gateway/submission.py use it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from config.schema import LimitsConfig

log = logging.getLogger(__name__)

BARE_LINE_END = ("500 5.5.2 Syntax error: a command line ends with CRLF and holds no other CR or LF"
                 " (RFC 5321 section 2.3.8)")
LINE_TOO_LONG = "500 5.5.2 Line too long (RFC 5321 section 4.5.3.1.6)"
BUSY = "452 4.3.1 The gateway is receiving too much mail right now, please try again later"


class CommandLineError(Exception):
    """A command line this gateway refuses before parsing it; `reply` is what the client gets."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class StrictLineReader(asyncio.StreamReader):
    """aiosmtpd reads each command up to LF (`readuntil()`, and `readline()` for AUTH answers); this reader
    refuses a line that ends in a bare LF or holds a CR elsewhere, so that no bare CR or LF is ever taken
    for a line end. DATA is read up to CRLF (`readuntil(b"\\r\\n")`) and its bare CR and LF are the handlers'
    to judge."""

    _overrun = False
    """The line being read is already too long (aiosmtpd drains it, then answers `500`)."""

    async def readuntil(self, separator: Any = b"\n") -> bytes:
        try:
            line = await super().readuntil(separator)
        except asyncio.LimitOverrunError:
            self._overrun = True
            raise
        overrun, self._overrun = self._overrun, False
        if separator == b"\n" and not overrun and (not line.endswith(b"\r\n") or b"\r" in line[:-2]):
            raise CommandLineError(BARE_LINE_END)
        return line

    async def read_lines(self) -> bytes:
        """DATA: a line up to CRLF (waiting for it, `LimitOverrunError` as `readuntil`), with every further
        complete line already received: a message that arrived in one read is handled in one pass."""
        first = await self.readuntil(b"\r\n")
        buffer: bytearray = self._buffer  # type: ignore[attr-defined]
        end = buffer.rfind(b"\r\n")
        if end < 0:
            return first
        more = bytes(buffer[:end + 2])
        if max(map(len, more.split(b"\r\n"))) + 2 > self._limit:  # type: ignore[attr-defined]
            return first  # a line past the limit: `readuntil` refuses it when its turn comes
        del buffer[:end + 2]
        self._maybe_resume_transport()  # type: ignore[attr-defined]  # what readuntil does after taking
        return first + more

    def unread(self, data: bytes) -> None:
        """Put back, in front, what was taken past the end of a DATA (the next commands of a pipelining client)."""
        buffer: bytearray = self._buffer  # type: ignore[attr-defined]
        buffer[:0] = data

    def pending(self) -> int:
        """Bytes received and not read yet (what a client sent ahead of our reply)."""
        return len(self._buffer)  # type: ignore[attr-defined]

    def discard(self) -> int:
        """Drop what was received and not read; the count of bytes dropped."""
        buffer: bytearray = self._buffer  # type: ignore[attr-defined]
        count = len(buffer)
        buffer.clear()
        return count


class MemoryBudget:
    """Bytes of DATA that the connections of one listener hold in memory (`limits.max_buffered_data` caps it)."""

    def __init__(self) -> None:
        self.held = 0


class DataReceiver:
    """One DATA, read into memory. Once a limit is passed what was kept is dropped and the rest is read and
    thrown away, never kept: memory stays within the size limit plus one read, however much the client sends;
    the refusal is given after the final dot (RFC 5321 §4.2.5)."""

    def __init__(self, reader: StrictLineReader, limits: LimitsConfig, budget: MemoryBudget,
                 set_timer: Callable[[float], None], clock: Callable[[], float]) -> None:
        self._reader = reader
        self._limits = limits
        self._budget = budget
        self._set_timer = set_timer
        self._clock = clock
        self._buffer = bytearray()
        self._held = 0

    async def receive(self) -> bytes | str:
        """The content, dot-stuffing undone (RFC 5321 §4.5.2), or the refusal to send. `set_timer` is given,
        before each read, the seconds the client has for it: `data_timeout`, or less when the whole DATA would
        last over `max_data_duration` (the caller closes the connection when it runs out).

        Lines are taken as many at a time as have arrived (`read_lines`) and handled with bytes methods: the
        end is the first line that is a lone dot; a line starting with a dot loses it."""
        limits = self._limits
        deadline = self._clock() + limits.max_data_duration
        refusal: str | None = None
        size = 0
        at_line_start = True
        while True:
            self._set_timer(max(0.01, min(limits.data_timeout, deadline - self._clock())))
            try:
                block = await self._reader.read_lines()
            except asyncio.LimitOverrunError as exc:
                size += len(await self._reader.read(exc.consumed))
                at_line_start = False
                refusal = refusal or LINE_TOO_LONG
                self._drop()
                continue
            if at_line_start and block.startswith(b".\r\n"):
                end = 0
            else:
                end = block.find(b"\r\n.\r\n")
                end = -1 if end < 0 else end + 2
            if end >= 0:
                self._reader.unread(block[end + 3:])
                block = block[:end]
            stuffed = at_line_start and block.startswith(b".")
            at_line_start = True
            size += len(block)
            if refusal is None and size > limits.max_message_size:
                refusal = f"552 5.3.4 Message too big: the limit is {limits.max_message_size} bytes"
            elif refusal is None and self._budget.held + len(block) > limits.max_buffered_data:
                log.warning("DATA refused: this listener holds %d bytes of mail in memory", self._budget.held)
                refusal = BUSY
            if refusal is not None:
                self._drop()
            else:
                # The dot that starts a line goes: after a CRLF inside the block, and at its start (replace leaves it).
                content = block.replace(b"\r\n.", b"\r\n")
                self._buffer += content[1:] if stuffed else content
                self._budget.held += len(block)
                self._held += len(block)
            if end >= 0:
                break
        if refusal is not None:
            return refusal
        content = bytes(self._buffer)
        self._buffer = bytearray()
        return content

    def release(self) -> None:
        """Give this DATA's bytes back to the budget (once the handler is done with the content)."""
        self._drop()

    def _drop(self) -> None:
        self._buffer = bytearray()
        self._budget.held -= self._held
        self._held = 0
