"""The gateway's SQL database: the engine (SQLite in WAL mode by default, PostgreSQL for
larger sites) and the metadata of the gateway's own tables (accounts, queue).

SQLite is opened with `synchronous=FULL`: a queue row committed before a `250` must
survive a power cut, not only a process crash.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Engine, MetaData, create_engine, event
from sqlalchemy.engine import make_url

from config.loader import read_secret
from config.schema import DatabaseConfig

log = logging.getLogger(__name__)

metadata = MetaData()


def make_engine(cfg: DatabaseConfig) -> Engine:
    """Create the engine for `cfg`, with the password (if any) read from its secret reference."""
    url = make_url(cfg.url)
    if cfg.password is not None:
        url = url.set(password=read_secret(cfg.password))
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
    log.info("database: %s", url.render_as_string(hide_password=True))
    return engine


def create_tables(engine: Engine) -> None:
    """Create the gateway's tables if missing (the accounts and queue schemas are additive)."""
    # Importing the modules registers their tables on `metadata`.
    from gateway import accounts, spool  # noqa: F401, PLC0415

    metadata.create_all(engine)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
