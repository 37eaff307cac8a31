"""Recipient lookup for the SMTP session (DESIGN.md flow 1: `550 5.1.1` when unknown).

A lookup is one statement: a primary-key read of `dir_mailbox` joined to the indexed
certificates, run on a small thread pool so the event loop never waits on the database. The
domain is compared case-insensitively (RFC 5321 §2.4), the local part exactly as published.

Issue 5 asks for 50,000 lookups a second on one core, so the per-call Python around the
statement is kept small: one cursor per thread, reused (the driver's statement cache already
keeps the prepared statement), the RPPS worked out by the statement, and a `Recipient` built as
one tuple.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
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


class DirectoryLookup:
    """`await lookup(address)`: the recipient, or None when the address is not published.

    The hot path is one fixed, joined SQL statement on a DB-API connection and cursor of its own
    per pool thread (detached from the engine's pool, in autocommit): building SQLAlchemy
    statements costs more than the indexed read itself. Each read is its own transaction, so a
    lookup always sees the last committed sync, never a half-applied one.
    """

    def __init__(self, engine: Engine, *, threads: int = 4) -> None:
        self._engine = engine
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dir-lookup")
        self._local = threading.local()
        self._sqlite = engine.dialect.name == "sqlite"
        self._sql = _LOOKUP_SQL.format(p="?" if engine.dialect.paramstyle == "qmark" else "%s")
        self._errors: tuple[type[BaseException], ...] = (SQLAlchemyError, engine.dialect.loaded_dbapi.Error)
        self._connections: list[Any] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    async def lookup(self, address: str) -> Recipient | None:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.lookup_blocking, address)

    def _cursor(self) -> Any:
        """This thread's cursor, on its connection opened at first use."""
        conn = self._open()
        self._local.conn = conn
        with self._lock:
            self._connections.append(conn)
        cursor = self._local.cursor = conn.cursor()
        return cursor

    def _open(self) -> Any:
        proxy = self._engine.raw_connection()
        conn: Any = proxy.driver_connection
        proxy.detach()  # ours alone: its settings never reach a connection the pool hands out
        if self._sqlite:
            conn.isolation_level = None
            conn.execute(f"PRAGMA mmap_size={_SQLITE_MMAP}")
            conn.execute("PRAGMA query_only=ON")
        else:
            conn.autocommit = True
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = self._local.cursor = None
        if conn is not None:
            with self._lock:
                if conn in self._connections:
                    self._connections.remove(conn)
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - the connection is being thrown away
                log.debug("could not close a broken lookup connection")

    def lookup_blocking(self, address: str, now: dt.datetime | None = None) -> Recipient | None:
        key = address_key(address)
        if key is None:
            return None
        try:
            cursor = getattr(self._local, "cursor", None)
            if cursor is None:
                cursor = self._cursor()
            rows = cursor.execute(self._sql, (key,)).fetchall()
        except self._errors as exc:
            self._drop_connection()
            log.warning("directory lookup failed: %s", type(exc).__name__)
            raise DirectoryUnavailable(type(exc).__name__) from exc
        if not rows:
            return None
        row = rows[0]
        certificates = () if row[_N] is None else _usable([r[_N:] for r in rows], now or dt.datetime.now(dt.UTC))
        (addr, mtype, id_nat_ps, rpps, civility, last, first, profession, sid, sname, service, red) = row[:_N]
        return Recipient(addr, mtype, id_nat_ps, rpps, civility, last, first, profession, sid, sname, service,
                         bool(red), certificates)


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
