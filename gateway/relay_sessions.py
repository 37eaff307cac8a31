"""Sessions with next hops: how many at once per destination (`RelayLimiter`), and the authenticated TLS
sessions kept open between messages (`SessionCache`, Postfix's SMTP connection cache).

A relay session costs a TCP connection, a TLS handshake with certificates both ways and two EHLOs before the
first MAIL; between two gateways that exchange mail all day, that is most of the cost of a small message.
RFC 5321 §3.3 allows any number of transactions in one session, so a session whose last transaction ended
cleanly (the reply to the final dot, or an RSET answered 250) is kept here, idle, for the next message to the
same hop. An idle session is closed after `idle` seconds (politely: QUIT), after `max_messages` transactions,
or when the peer closes it (a cached session is checked before use; one the peer dropped meanwhile is
discarded by the relay, which then opens a fresh one). At most `per_hop` idle sessions are kept per hop; how
many are *in use* at once is the destination limiter's business (gateway.relay.RelayLimiter).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiosmtplib

from gateway.nexthop import Hop

log = logging.getLogger(__name__)

QUIT_TIMEOUT = 10.0


@dataclass(slots=True, eq=False)
class PeerSession:
    """One open, TLS-authenticated, EHLO'd SMTP session with `hop`, and how many transactions it carried."""

    hop: Hop
    smtp: aiosmtplib.SMTP
    transactions: int = 0
    _expiry: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def usable(self) -> bool:
        return self.smtp.is_connected

    def abort(self) -> None:
        """Drop the connection at once (its state is unknown: never reused)."""
        self.smtp.close()


class SessionCache:
    """Idle sessions by hop. `idle` 0 keeps none: every message opens and closes its own session."""

    def __init__(self, *, idle: float = 5.0, max_messages: int = 100, per_hop: int = 5) -> None:
        self.idle = idle
        self.max_messages = max(1, max_messages)
        self.per_hop = max(1, per_hop)
        self._idle: dict[Hop, list[PeerSession]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.reused = 0

    def take(self, hop: Hop) -> PeerSession | None:
        """The most recently used idle session with `hop` that the peer has not closed, if any (removed from the
        cache: the caller owns it until `give_back` or `close`)."""
        sessions = self._idle.get(hop)
        while sessions:
            session = sessions.pop()
            if session._expiry is not None:
                session._expiry.cancel()
                session._expiry = None
            if session.usable:
                if not sessions:
                    del self._idle[hop]
                self.reused += 1
                return session
            session.abort()
        self._idle.pop(hop, None)
        return None

    def give_back(self, session: PeerSession) -> None:
        """A session whose last transaction ended cleanly: keep it for the next message, or close it."""
        session.transactions += 1
        sessions = self._idle.setdefault(session.hop, [])
        if (self.idle <= 0 or not session.usable or session.transactions >= self.max_messages
                or len(sessions) >= self.per_hop):
            if not sessions:
                del self._idle[session.hop]
            self.close(session)
            return
        session._expiry = asyncio.get_running_loop().call_later(self.idle, self._expire, session)
        sessions.append(session)

    def _expire(self, session: PeerSession) -> None:
        session._expiry = None
        sessions = self._idle.get(session.hop)
        if sessions is not None and session in sessions:
            sessions.remove(session)
            if not sessions:
                del self._idle[session.hop]
        self.close(session)

    def close(self, session: PeerSession) -> None:
        """End a session politely (QUIT, RFC 5321 §4.1.1.10) in the background."""
        if not session.usable:
            session.abort()
            return
        task = asyncio.get_running_loop().create_task(_quit(session), name=f"relay-quit:{session.hop}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def idle_sessions(self, hop: Hop) -> int:
        return len(self._idle.get(hop, ()))

    async def aclose(self) -> None:
        """Close every idle session and wait for the QUITs (gateway shutdown)."""
        for sessions in list(self._idle.values()):
            for session in sessions:
                if session._expiry is not None:
                    session._expiry.cancel()
                self.close(session)
        self._idle.clear()
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)


async def _quit(session: PeerSession) -> None:
    with contextlib.suppress(aiosmtplib.SMTPException, OSError):
        await session.smtp.quit(timeout=QUIT_TIMEOUT)
    session.abort()


@dataclass(slots=True)
class _Destination:
    semaphore: asyncio.Semaphore
    active: int = 0
    waiting: int = 0


class RelayLimiter:
    """At most `per_destination` relay sessions per destination domain at once (issue 6, item 3), so one busy
    or slow peer neither takes every worker nor sees more parallel connections than is polite."""

    def __init__(self, per_destination: int) -> None:
        if per_destination < 1:
            raise ValueError("per_destination must be at least 1")
        self.per_destination = per_destination
        self._destinations: dict[str, _Destination] = {}

    @contextlib.asynccontextmanager
    async def slot(self, domain: str) -> AsyncIterator[None]:
        key = domain.lower().rstrip(".")
        dest = self._destinations.get(key)
        if dest is None:
            dest = self._destinations[key] = _Destination(asyncio.Semaphore(self.per_destination))
        dest.waiting += 1
        try:
            await dest.semaphore.acquire()
        except BaseException:
            dest.waiting -= 1
            self._forget_if_idle(key, dest)
            raise
        dest.waiting -= 1
        dest.active += 1
        try:
            yield
        finally:
            dest.active -= 1
            dest.semaphore.release()
            self._forget_if_idle(key, dest)

    def _forget_if_idle(self, key: str, dest: _Destination) -> None:
        """Drop the entry of a destination nobody uses, so the table does not grow with every domain ever seen."""
        if dest.active == 0 and dest.waiting == 0 and self._destinations.get(key) is dest:
            del self._destinations[key]

    def active(self, domain: str) -> int:
        dest = self._destinations.get(domain.lower().rstrip("."))
        return dest.active if dest else 0

    def waiting(self, domain: str) -> int:
        dest = self._destinations.get(domain.lower().rstrip("."))
        return dest.waiting if dest else 0
