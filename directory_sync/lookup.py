"""Recipient lookup for the SMTP session (DESIGN.md flow 1: `550 5.1.1` when unknown).

A lookup is one statement: a primary-key read of `dir_mailbox` joined to the indexed
certificates, run on a small thread pool so the event loop never waits on the database. The
domain is compared case-insensitively (RFC 5321 §2.4), the local part exactly as published.

Issue 5 asks for 50,000 lookups a second on one core, so the per-call Python around the
statement is kept small: one cursor per thread, reused (the driver's statement cache already
keeps the prepared statement), the RPPS worked out by the statement, and a `Recipient` built as
one tuple.

On SQLite, beginning and ending a read costs three system calls (a lock and an unlock of the
shared-memory read mark, a stat of the file): about 4 µs on a virtual machine, a third of a
lookup. Lookups that follow each other within BURST_GAP_SECONDS on one connection therefore
read from one snapshot, for at most SNAPSHOT_SECONDS: under load a lookup may see the directory
as it was up to that long before, a committed state, never a half-synced one; a lookup after a
pause sees the last commit. A snapshot left open once the lookups stop would keep the WAL from
being checkpointed: a background thread ends it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from directory_sync.errors import DirectoryUnavailable
from directory_sync.mapping import address_key

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class RecipientCertificate:
    """A certificate the S/MIME layer may encrypt to; only its fingerprint is ever logged."""

    fingerprint_sha256: str
    subject: str
    not_after: dt.datetime
    der: bytes


class Recipient(NamedTuple):
    """A published MSSanté mailbox and its owner, as the directory knows them.

    Immutable and typed like the project's frozen dataclasses, but a named tuple: building a
    frozen dataclass (one object.__setattr__ per field) took about a tenth of a whole lookup.
    Callers read its attributes only.
    """

    address: str
    mailbox_type: str
    id_nat_ps: str | None
    rpps: str | None
    civility: str | None
    last_name: str | None
    first_name: str | None
    profession: str | None
    structure_id: str | None
    structure_name: str | None
    service: str | None
    liste_rouge: bool
    certificates: tuple[RecipientCertificate, ...]


# In the order of Recipient's fields, up to liste_rouge; an identifier of type 8 is an RPPS number.
_MAILBOX_COLUMNS = ("m.address", "m.mailbox_type", "m.id_nat_ps", "CASE WHEN m.id_type = '8' THEN m.id_pp END",
                    "m.civility", "m.last_name", "m.first_name", "m.profession", "m.structure_id",
                    "m.structure_name", "m.service", "m.liste_rouge")
_CERT_COLUMNS = ("fingerprint_sha256", "subject", "not_before", "not_after", "der")
# One round trip: the mailbox and, beside it, each encryption certificate of the mailbox or of
# its owner (one row per certificate; NULLs when it has none). A single statement reads a
# single snapshot: a lookup never mixes two syncs.
_LOOKUP_SQL = (
    f"SELECT {', '.join(_MAILBOX_COLUMNS)}, {', '.join('c.' + c for c in _CERT_COLUMNS)} "
    "FROM dir_mailbox m LEFT JOIN dir_certificate c ON c.usage IN ('encryption', 'any') "
    "AND (c.address_key = m.address_key OR c.id_nat_ps = m.id_nat_ps) WHERE m.address_key = {p}"
)
_N = len(_MAILBOX_COLUMNS)
# Read connections map the database file (SQLite): a lookup then copies no page through read().
_SQLITE_MMAP = 1 << 30
SNAPSHOT_SECONDS = 0.05
"""SQLite: the longest a lookup connection reads from one snapshot."""
BURST_GAP_SECONDS = 0.001
"""SQLite: a lookup that starts within this of the end of the one before on its connection reads from that one's
snapshot (while it is younger than SNAPSHOT_SECONDS); after a longer pause, from a new one."""
IDLE_CHECK_SECONDS = 0.5
"""SQLite: how often, while a snapshot is open, the thread that ends idle ones looks (seldom: it takes the GIL)."""


class _Reader:
    """One lookup thread's connection and cursor, and on SQLite the read snapshot it keeps between lookups that
    follow each other closely. Its lock is held by a lookup, or by the thread that ends idle snapshots."""

    __slots__ = ("began", "conn", "cursor", "ended", "lock")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.cursor = conn.cursor()
        self.lock = threading.Lock()
        self.began: float | None = None
        """When its snapshot began (time.monotonic), None without one."""
        self.ended = 0.0
        """When its last lookup ended."""

    def reusable(self, now: float) -> bool:
        """Whether a lookup starting at `now` may read from the snapshot."""
        began = self.began
        return began is not None and now - self.ended <= BURST_GAP_SECONDS and now - began <= SNAPSHOT_SECONDS

    def end_snapshot(self) -> None:
        if self.began is not None:
            self.began = None
            self.cursor.execute("COMMIT")


class DirectoryLookup:
    """`await lookup(address)`: the recipient, or None when the address is not published.

    The hot path is one fixed, joined SQL statement on a DB-API connection and cursor of its own
    per pool thread (detached from the engine's pool, in autocommit): building SQLAlchemy
    statements costs more than the indexed read itself. A read never mixes two syncs: each lookup
    is one statement, and on SQLite lookups in a burst share one snapshot (see the module's
    docstring); on PostgreSQL each read is its own transaction.
    """

    def __init__(self, engine: Engine, *, threads: int = 4) -> None:
        self._engine = engine
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dir-lookup")
        self._local = threading.local()
        self._sqlite = engine.dialect.name == "sqlite"
        self._sql = _LOOKUP_SQL.format(p="?" if engine.dialect.paramstyle == "qmark" else "%s")
        self._errors: tuple[type[BaseException], ...] = (SQLAlchemyError, engine.dialect.loaded_dbapi.Error)
        self._readers: list[_Reader] = []
        self._lock = threading.Lock()
        self._opened = threading.Event()  # a snapshot began: the idle ones are to be ended
        self._closing = threading.Event()
        self._ender: threading.Thread | None = None

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        _stop_ending(self._opened, self._closing)
        if self._ender is not None:
            self._ender.join()
        with self._lock:
            for reader in self._readers:
                with reader.lock:
                    reader.conn.close()
            self._readers.clear()

    async def lookup(self, address: str) -> Recipient | None:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.lookup_blocking, address)

    def _reader(self) -> _Reader:
        """This thread's reader, its connection opened at first use."""
        proxy = self._engine.raw_connection()
        conn: Any = proxy.driver_connection
        proxy.detach()  # ours alone: its settings never reach a connection the pool hands out
        if self._sqlite:
            conn.isolation_level = None
            conn.execute(f"PRAGMA mmap_size={_SQLITE_MMAP}")
            conn.execute("PRAGMA query_only=ON")
        else:
            conn.autocommit = True
        reader = self._local.reader = _Reader(conn)
        with self._lock:
            self._readers.append(reader)
            if self._sqlite and self._ender is None:
                self._ender = threading.Thread(
                    target=_end_idle_snapshots, name="dir-lookup-snapshots", daemon=True,
                    args=(self._readers, self._lock, self._opened, self._closing, self._errors))
                self._ender.start()
                weakref.finalize(self, _stop_ending, self._opened, self._closing)  # collected unclosed
        return reader

    def _drop_reader(self) -> None:
        reader: _Reader | None = getattr(self._local, "reader", None)
        self._local.reader = None
        if reader is not None:
            with self._lock:
                if reader in self._readers:
                    self._readers.remove(reader)
            try:
                with reader.lock:  # not while the thread that ends idle snapshots uses it
                    reader.conn.close()
            except Exception:  # noqa: BLE001 - the connection is being thrown away
                log.debug("could not close a broken lookup connection")

    def lookup_blocking(self, address: str, now: dt.datetime | None = None) -> Recipient | None:
        key = address_key(address)
        if key is None:
            return None
        try:
            reader = getattr(self._local, "reader", None) or self._reader()
            with reader.lock:
                if self._sqlite:
                    start = time.monotonic()
                    if not reader.reusable(start):
                        reader.end_snapshot()
                        reader.cursor.execute("BEGIN")  # the snapshot is taken by the lookup's read
                        reader.began = start
                        self._opened.set()
                rows = reader.cursor.execute(self._sql, (key,)).fetchall()
                reader.ended = time.monotonic()
        except self._errors as exc:
            self._drop_reader()
            log.warning("directory lookup failed: %s", type(exc).__name__)
            raise DirectoryUnavailable(type(exc).__name__) from exc
        if not rows:
            return None
        row = rows[0]
        certificates = () if row[_N] is None else _usable([r[_N:] for r in rows], now or dt.datetime.now(dt.UTC))
        (addr, mtype, id_nat_ps, rpps, civility, last, first, profession, sid, sname, service, red) = row[:_N]
        return Recipient(addr, mtype, id_nat_ps, rpps, civility, last, first, profession, sid, sname, service,
                         bool(red), certificates)


def _end_idle_snapshots(readers: list[_Reader], lock: threading.Lock, opened: threading.Event,
                        closing: threading.Event, errors: tuple[type[BaseException], ...]) -> None:
    """SQLite, a thread of its own: end the snapshots of the `readers` whose lookups stopped (an open snapshot keeps
    the WAL from being checkpointed past it), every IDLE_CHECK_SECONDS once one began (`opened`); asleep while none is
    open, until `closing`. It holds nothing of its DirectoryLookup, which may then be collected unclosed."""
    while opened.wait() and not closing.wait(IDLE_CHECK_SECONDS):
        opened.clear()
        with lock:
            current = list(readers)
        for reader in current:
            if not reader.lock.acquire(blocking=False):  # a lookup is running: its snapshot stays for now
                opened.set()
                continue
            try:
                if not reader.reusable(time.monotonic()):
                    reader.end_snapshot()
            except errors as exc:  # its thread's next lookup fails and opens a new connection
                log.warning("could not end a directory lookup snapshot: %s", type(exc).__name__)
            finally:
                if reader.began is not None:
                    opened.set()
                reader.lock.release()


def _stop_ending(opened: threading.Event, closing: threading.Event) -> None:
    closing.set()
    opened.set()


def _usable(certificates: list[Any], when: dt.datetime) -> tuple[RecipientCertificate, ...]:
    """The certificates valid at `when` (not_before <= when < not_after), the longest-lived first."""
    usable = []
    for fp, subject, not_before, not_after, der in certificates:
        start, end = _aware(not_before), _aware(not_after)
        if start <= when < end:
            usable.append(RecipientCertificate(fp, subject, end, bytes(der)))
    usable.sort(key=lambda c: c.not_after, reverse=True)
    return tuple(usable)


def _aware(value: dt.datetime | str) -> dt.datetime:
    """SQLite hands back the stored text (naive, UTC); PostgreSQL an aware datetime."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
