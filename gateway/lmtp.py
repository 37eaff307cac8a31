"""An asyncio LMTP client (RFC 2033): hands a message to the mailbox store and returns one reply per recipient.

LMTP differs from SMTP after the final dot: the server answers once per accepted recipient, in RCPT order
(RFC 2033 §4.2), so a message can be delivered to some mailboxes and deferred for others. The spool relies on that:
it removes a recipient only on its own `250`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.errors import GatewayError

log = logging.getLogger(__name__)

_ENHANCED = re.compile(rb"^([245]\.\d{1,3}\.\d{1,3})(?: |$)")
_BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_MAX_REPLY_LINES = 100


@dataclass(frozen=True, slots=True)
class LmtpReply:
    """One server reply: the code, the enhanced status code (RFC 3463) when given, and the text (lines joined)."""

    code: int
    enhanced: str | None
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    def __str__(self) -> str:
        return " ".join(p for p in (str(self.code), self.enhanced, self.text) if p)


# Given to the recipients whose DATA reply never came: the message may or may not be in their mailbox, but it is
# safer to try again (a duplicate) than to drop it (a loss).
CONNECTION_LOST = LmtpReply(451, "4.4.2", "Connection to the mailbox store lost before its reply")


class LmtpError(GatewayError):
    """Base class: the session could not run to its end. Transient errors mean "try again later"."""

    transient = True


class LmtpUnavailable(LmtpError):
    """The mailbox store could not be reached, or the connection failed before the message was sent."""

    def __init__(self, endpoint: str, cause: str) -> None:
        self.endpoint = endpoint
        self.cause = cause
        super().__init__(f"LMTP {endpoint}: {cause}")


class LmtpProtocolError(LmtpError):
    """The server refused the session itself (greeting or LHLO) or answered something that is not LMTP."""

    def __init__(self, endpoint: str, stage: str, reply: LmtpReply | None) -> None:
        self.endpoint = endpoint
        self.stage = stage
        self.reply = reply
        self.transient = reply is None or not 500 <= reply.code < 600
        super().__init__(f"LMTP {endpoint}: {stage} refused: {reply if reply is not None else 'malformed reply'}")


def dot_stuff(message: bytes) -> bytes:
    """The DATA payload: CRLF line ends enforced, leading dots doubled, and the final `.` line (RFC 5321 §4.5.2).

    A message that already ends in CRLF is not changed apart from the dots; a lone CR or LF becomes CRLF, since
    LMTP, like SMTP, has no other line end (RFC 5321 §2.3.8).
    """
    data = _BARE_LINE_END.sub(b"\r\n", message)
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\r\n.", b"\r\n..")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def parse_reply(lines: Sequence[bytes]) -> LmtpReply:
    """Parse one (possibly multi-line) reply, `250-...` lines then `250 ...` (RFC 5321 §4.2.1)."""
    if not lines:
        raise ValueError("empty reply")
    texts: list[str] = []
    code: int | None = None
    for i, raw in enumerate(lines):
        line = raw.rstrip(b"\r\n")
        if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3:4] not in b" -"):
            raise ValueError(f"not a reply line: {line[:80]!r}")
        this = int(line[:3])
        if code is not None and this != code:
            raise ValueError("reply lines disagree on the code")
        code = this
        last = len(line) == 3 or line[3:4] == b" "
        if last != (i == len(lines) - 1):
            raise ValueError("continuation marker out of place")
        texts.append(line[4:].decode("utf-8", "replace"))
    assert code is not None
    first = texts[0].encode()
    enhanced: str | None = None
    m = _ENHANCED.match(first)
    if m and m.group(1)[:1] == str(code)[0].encode():
        enhanced = m.group(1).decode()
        texts = [re.sub(r"^[245]\.\d{1,3}\.\d{1,3} ?", "", t) for t in texts]
    return LmtpReply(code, enhanced, " ".join(t for t in texts if t))


def _check_address(address: str) -> None:
    if any(c in address for c in "\r\n\0<>") or any(ord(c) < 32 for c in address):
        raise ValueError(f"refusing an address with control or bracket characters: {address!r}")


class _Session:
    def __init__(self, endpoint: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float) -> None:
        self.endpoint = endpoint
        self.reader = reader
        self.writer = writer
        self.timeout = timeout

    async def read_reply(self) -> LmtpReply:
        lines: list[bytes] = []
        while True:
            try:
                line = await asyncio.wait_for(self.reader.readline(), self.timeout)
            except TimeoutError:
                raise LmtpUnavailable(self.endpoint, f"no reply within {self.timeout:.0f} s") from None
            except (OSError, ValueError) as exc:  # ValueError: a line longer than the stream limit
                raise LmtpUnavailable(self.endpoint, f"reading a reply failed: {exc}") from None
            if not line.endswith(b"\n"):
                raise LmtpUnavailable(self.endpoint, "the server closed the connection")
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-" or len(lines) >= _MAX_REPLY_LINES:
                break
        try:
            return parse_reply(lines)
        except ValueError as exc:
            raise LmtpProtocolError(self.endpoint, f"reply parsing ({exc})", None) from None

    async def send(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), self.timeout)
        except TimeoutError:
            raise LmtpUnavailable(self.endpoint, f"sending stalled for {self.timeout:.0f} s") from None
        except OSError as exc:
            raise LmtpUnavailable(self.endpoint, f"sending failed: {exc}") from None

    async def command(self, line: str) -> LmtpReply:
        await self.send(line.encode("utf-8") + b"\r\n")
        return await self.read_reply()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.writer.drain(), 1)
            await asyncio.wait_for(self.reader.readline(), 1)
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1)


async def _connect(endpoint: str, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """`unix:/path`, `host:port` or `[v6]:port`."""
    try:
        if endpoint.startswith("unix:"):
            return await asyncio.wait_for(asyncio.open_unix_connection(endpoint[5:]), timeout)
        host, sep, port = endpoint.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"an LMTP endpoint is unix:/path or host:port, not {endpoint!r}")
        return await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), timeout)
    except TimeoutError:
        raise LmtpUnavailable(endpoint, f"no connection within {timeout:.0f} s") from None
    except OSError as exc:
        raise LmtpUnavailable(endpoint, f"cannot connect: {exc.strerror or exc}") from None


async def deliver(endpoint: str, sender: str, recipients: Sequence[str], message: bytes, *,
                  timeout: float = 60, helo: str | None = None) -> dict[str, LmtpReply]:
    """Deliver `message` (CRLF line ends) to `recipients` over a connection of its own; one reply per recipient.

    A refused RCPT is that recipient's answer; each accepted one gets its own DATA reply (RFC 2033 §4.2). A refused
    MAIL or DATA becomes every (accepted) recipient's answer. A connection that fails before the message was sent
    raises LmtpUnavailable (nothing was delivered); one that fails after it gives the recipients still waiting
    CONNECTION_LOST (a transient reply), since some mailboxes may already hold the message.
    `sender` may be empty: the null reverse-path of a DSN (RFC 5321 §4.5.5).
    """
    for address in (sender, *recipients):
        _check_address(address)  # before connecting: a malformed envelope is our bug, not the server's
    session = await LmtpSession.open(endpoint, timeout=timeout, helo=helo)
    try:
        return await session.transact(sender, recipients, message)
    finally:
        await session.close()


class LmtpSession:
    """One LMTP connection, greeted and LHLO'd, that can carry several transactions (RFC 2033 §4, RFC 5321 §3.3)."""

    def __init__(self, session: _Session, eight_bit: bool) -> None:
        self._session = session
        self._eight_bit = eight_bit
        self.reusable = True
        self.opened = time.monotonic()

    @classmethod
    async def open(cls, endpoint: str, *, timeout: float = 60, helo: str | None = None) -> LmtpSession:
        reader, writer = await _connect(endpoint, timeout)
        session = _Session(endpoint, reader, writer, timeout)
        try:
            greeting = await session.read_reply()
            if greeting.code != 220:
                raise LmtpProtocolError(endpoint, "greeting", greeting)
            lhlo = await session.command(f"LHLO {helo or socket.gethostname()}")
            if lhlo.code != 250:
                raise LmtpProtocolError(endpoint, "LHLO", lhlo)
        except BaseException:
            await session.close()
            raise
        return cls(session, "8BITMIME" in lhlo.text.upper())

    async def transact(self, sender: str, recipients: Sequence[str], message: bytes) -> dict[str, LmtpReply]:
        """One mail transaction; see `deliver`. After an error the session is no longer `reusable`."""
        unique = list(dict.fromkeys(recipients))
        if not unique:
            return {}
        for address in (sender, *unique):
            _check_address(address)
        payload = dot_stuff(message)
        session = self._session
        endpoint = session.endpoint
        self.reusable = False
        eight_bit = self._eight_bit and not payload.isascii()
        mail = await session.command(f"MAIL FROM:<{sender}>" + (" BODY=8BITMIME" if eight_bit else ""))
        if not mail.ok:
            return {rcpt: mail for rcpt in unique}
        results: dict[str, LmtpReply] = {}
        accepted: list[str] = []
        for rcpt in unique:
            reply = await session.command(f"RCPT TO:<{rcpt}>")
            results[rcpt] = reply
            if reply.ok:
                accepted.append(rcpt)
        if not accepted:
            return results
        data = await session.command("DATA")
        if data.code != 354:
            results.update({rcpt: data for rcpt in accepted})
            return results
        await session.send(payload)
        for i, rcpt in enumerate(accepted):
            try:
                results[rcpt] = await session.read_reply()
            except LmtpError as exc:
                log.warning("LMTP %s: %s; %d recipient(s) left without a reply", endpoint, exc, len(accepted) - i)
                results.update({r: CONNECTION_LOST for r in accepted[i:]})
                return results
        log.debug("LMTP %s: %s", endpoint, ", ".join(f"{r} {reply.code}" for r, reply in results.items()))
        self.reusable = True
        return results

    async def close(self) -> None:
        await self._session.close()


class LmtpPool:
    """Reuses LMTP sessions across deliveries: a new connection costs the mailbox store more than a transaction.

    A session goes back to the pool only after a transaction that ran to its end. A reused session that
    fails before the message was sent (the server closed it while idle) is replaced once by a fresh one:
    nothing was delivered on it, so trying again cannot duplicate.
    """

    def __init__(self, endpoint: str, *, size: int = 8, timeout: float = 60, helo: str | None = None,
                 max_idle: float = 20.0) -> None:
        self.endpoint = endpoint
        self._size = size
        self._timeout = timeout
        self._helo = helo
        self._max_idle = max_idle
        self._idle: list[tuple[float, LmtpSession]] = []

    async def deliver(self, sender: str, recipients: Sequence[str], message: bytes) -> dict[str, LmtpReply]:
        session = await self._take()
        reused = session is not None
        if session is None:
            session = await LmtpSession.open(self.endpoint, timeout=self._timeout, helo=self._helo)
        try:
            try:
                results = await session.transact(sender, recipients, message)
            except LmtpUnavailable:
                if not reused:
                    raise
                await session.close()  # stale: nothing was sent on it
                session = await LmtpSession.open(self.endpoint, timeout=self._timeout, helo=self._helo)
                results = await session.transact(sender, recipients, message)
        except BaseException:
            await session.close()
            raise
        if session.reusable and len(self._idle) < self._size:
            self._idle.append((time.monotonic(), session))
        else:
            await session.close()
        return results

    async def _take(self) -> LmtpSession | None:
        while self._idle:
            since, session = self._idle.pop()
            if time.monotonic() - since < self._max_idle:
                return session
            await session.close()
        return None

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, session in idle:
            await session.close()
