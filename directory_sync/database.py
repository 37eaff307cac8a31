"""Engines and schema migrations for the directory tables.

SQLite runs in WAL mode so that lookups keep reading the last committed directory while a
sync writes the next one in a single transaction. The directory keeps its own Alembic
version table (`directory_alembic_version`): the gateway's own tables share the database
and have their own migration history.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event, make_url

from config.loader import read_secret
from config.schema import DatabaseConfig

log = logging.getLogger(__name__)

VERSION_TABLE = "directory_alembic_version"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str, *, password: str | None = None, **kwargs: Any) -> Engine:
    """An engine for a SQLAlchemy URL; SQLite gets WAL, a busy timeout and foreign keys.

    Temporary storage stays on disk: building the indexes of a full import sorts millions of
    keys, which would otherwise all be held in memory. The pool hands out the connection
    returned last (LIFO): each SQLite connection keeps its own page cache (up to 64 MB), and
    taking the oldest idle one, as a queue would, fills one more cache than needed (a
    re-import's second extract did: 56 MB more).
    """
    sa_url = make_url(url)
    if password is not None:
        sa_url = sa_url.set(password=password)
    if sa_url.get_backend_name() == "sqlite":
        sqlite3.register_adapter(type(None), _null)
        kwargs.setdefault("connect_args", {"check_same_thread": False, "timeout": 30})
        kwargs.setdefault("pool_use_lifo", True)
        engine = create_engine(sa_url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(sa_url, **kwargs)


def engine_from_config(db: DatabaseConfig) -> Engine:
    """The engine described by the gateway configuration (the password read from its secret)."""
    password = read_secret(db.password) if db.password is not None else None
    return make_engine(db.url, password=password)


def _null(value: None) -> None:
    """Bind None as NULL straight away.

    The sqlite3 module adapts every parameter that is not a str, int, float or bytes through
    the adaptation protocol, failed attribute look-ups included; with an adapter registered
    for None the look-up succeeds at once. (Extract fields are bound as they stand, '' for an
    empty one, and the statements turn '' into NULL: cheaper still, see EntitySpec.values_sql.)
    """
    return value


PAGE_SIZE = 16384
"""The page size of a new SQLite directory: a full import of the national extracts costs the importing process
5-10 % less CPU than with SQLite's 4096 (fewer pages to split, log and index), lookups and re-imports no more.
It only applies while the file is empty: an existing database keeps its own, as does one the gateway created
first (gateway/db.py leaves SQLite's default to its own small, frequent writes)."""


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA page_size={PAGE_SIZE}")  # before WAL, which fixes it
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA cache_size=-65536")
    finally:
        cur.close()


def alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the directory tables to `revision` (idempotent)."""
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    log.info("directory schema at %s (%s)", revision, engine.url.render_as_string(hide_password=True))


def downgrade(engine: Engine, revision: str = "base") -> None:
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
