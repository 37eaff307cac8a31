"""The IMAP relay's watch over the clear-text start of a connection: nothing sent with STARTTLS reaches Dovecot.

A man in the middle can append commands to a client's STARTTLS in the same TCP segment; a server that kept them in
its input buffer would run them inside the TLS session, as if the client had sent them (the "STARTTLS command
injection" of CVE-2011-0411, RFC 9051 §6.2.1: the client MUST NOT send anything before the tagged OK). The relay reads
the clear-text lines both ways (skipping literals, RFC 9051 §4.3), and from the client's STARTTLS until Dovecot's
tagged reply it discards whatever the client sends. After a tagged OK it is TLS, end to end: the relay only copies.
A refused STARTTLS (NO or BAD) returns to clear text. Pure: bytes in, bytes out, no I/O.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator

_HEAD = 1024  # a line is recognised by its start; STARTTLS lines and tagged replies are short
_TAIL = 32  # enough to see the literal announced at the end of a line
_STARTTLS = re.compile(rb'([^\x00-\x20\x7f(){%*"\\]+) STARTTLS\r?\n', re.IGNORECASE)  # tag: RFC 9051 §9
_LITERAL = re.compile(rb"~?\{(\d{1,20})\+?\}\r?\n\Z")


class Phase(enum.Enum):
    CLEAR = "clear"
    STARTING_TLS = "starting-tls"
    TLS = "tls"


class _Lines:
    """Splits one direction of a connection into lines, across reads, with literals skipped and memory bounded."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._tail = bytearray()
        self._length = 0
        self._literal = 0
        self._continued = False

    def feed(self, data: bytes) -> Iterator[tuple[bytes | None, int]]:
        """For each line completed in `data`: the line if it starts a command or response (its first _HEAD bytes,
        or None when it is longer or continues one after a literal), and the offset in `data` just after it."""
        i = 0
        while i < len(data):
            if self._literal:
                step = min(self._literal, len(data) - i)
                self._literal -= step
                i += step
                continue
            end = data.find(b"\n", i)
            piece = data[i:] if end < 0 else data[i:end + 1]
            self._add(piece)
            i += len(piece)
            if end < 0:
                return
            starts = not self._continued
            literal = _LITERAL.search(bytes(self._tail))
            self._literal = int(literal.group(1)) if literal else 0
            self._continued = literal is not None
            line = bytes(self._head) if starts and self._length <= _HEAD else None
            self._head.clear()
            self._tail.clear()
            self._length = 0
            yield line, i

    def _add(self, piece: bytes) -> None:
        self._length += len(piece)
        if len(self._head) < _HEAD:
            self._head += piece[: _HEAD - len(self._head)]
        self._tail += piece[-_TAIL:]
        del self._tail[:-_TAIL]


class StartTlsGuard:
    """One connection's clear-text phase: `from_client` returns what may go to the server, `from_server` is shown
    every server read before it is passed to the client (so the switch to TLS happens before the client sees OK)."""

    def __init__(self) -> None:
        self.phase = Phase.CLEAR
        self.discarded = 0
        self._tag = b""
        self._client = _Lines()
        self._server = _Lines()

    def from_client(self, data: bytes) -> bytes:
        if self.phase is Phase.TLS:
            return data
        if self.phase is Phase.STARTING_TLS:
            self.discarded += len(data)
            return b""
        for line, end in self._client.feed(data):
            match = _STARTTLS.fullmatch(line) if line is not None else None
            if match is not None:
                self.phase = Phase.STARTING_TLS
                self._tag = match.group(1)
                self.discarded += len(data) - end
                return data[:end]
        return data

    def from_server(self, data: bytes) -> None:
        if self.phase is Phase.TLS:
            return
        for line, _ in self._server.feed(data):
            if self.phase is not Phase.STARTING_TLS or line is None:
                continue
            if line.startswith(self._tag + b" "):
                status = line[len(self._tag) + 1:][:3].upper()
                self.phase = Phase.TLS if status == b"OK " else Phase.CLEAR
                return
