"""The gateway's SQL database: the engine (SQLite in WAL mode by default, PostgreSQL for
larger sites) and the metadata of the gateway's own tables (accounts, queue).

The engine that records accepted mail is fully durable (SQLite `synchronous=FULL`): a queue
row committed before a `250` must survive a power cut, not only a process crash. Delivery
bookkeeping (claims, per-recipient results) may use a relaxed engine (SQLite
`synchronous=NORMAL` in WAL mode, PostgreSQL `synchronous_commit=off`): a process crash loses
nothing either way, and a power cut can only undo a "delivered" mark, which means a duplicate
delivery, never a lost message. It saves an fsync per delivery step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, MetaData, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.schema import CreateColumn

from config.loader import read_secret
from config.schema import DatabaseConfig

log = logging.getLogger(__name__)

metadata = MetaData()


def make_engine(cfg: DatabaseConfig, *, durable: bool = True) -> Engine:
    """Create the engine for `cfg`, with the password (if any) read from its secret reference.

    `durable=False` gives the relaxed engine for delivery bookkeeping (see the module docstring).
    """
    url = make_url(cfg.url)
    if cfg.password is not None:
        url = url.set(password=read_secret(cfg.password))
    if url.get_backend_name() == "sqlite":
        _private_sqlite_file(url.database)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas(durable))
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
        if not durable:
            event.listen(engine, "connect", _pg_relaxed)
    if durable:
        log.info("database: %s", url.render_as_string(hide_password=True))
    return engine


def _private_sqlite_file(database: str | None) -> None:
    """The database holds password hashes and the queue: readable by the gateway's user only (0600) whatever the
    umask of the command that first opens it. SQLite gives its -wal and -shm files the database file's mode, so a
    database created here keeps them private too; files made wider before are narrowed."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return  # SQLite reports what is wrong with the path when it opens it
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for companion in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(companion.stat().st_mode) & 0o077:
                companion.chmod(0o600)


def create_tables(engine: Engine) -> None:
    """Create the gateway's tables if missing (the accounts and queue schemas are additive)."""
    # Importing the modules registers their tables on `metadata`.
    from gateway import accounts, spool  # noqa: F401

    metadata.create_all(engine)
    _add_missing_columns(engine)


def _add_missing_columns(engine: Engine) -> None:
    """Columns added to an existing table since it was created (the gateway's tables only grow)."""
    existing = inspect(engine)
    with engine.begin() as conn:
        for table in metadata.sorted_tables:
            if not existing.has_table(table.name):
                continue
            have = {c["name"] for c in existing.get_columns(table.name)}
            for column in table.columns:
                if column.name not in have:
                    ddl = CreateColumn(column).compile(dialect=engine.dialect)
                    conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {ddl}"))
                    log.info("database: added column %s.%s", table.name, column.name)


def _sqlite_pragmas(durable: bool) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()
    return on_connect


def _pg_relaxed(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("SET synchronous_commit TO off")
    cur.close()
    dbapi_conn.commit()
