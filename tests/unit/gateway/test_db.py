"""gateway.db: the SQLite database file is the gateway's user's only (issue 7, item 7)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sqlalchemy import text

from config.schema import DatabaseConfig
from gateway.db import create_tables, make_engine


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_database_and_its_wal_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        engine = make_engine(DatabaseConfig(url=f"sqlite:///{tmp_path / 'gateway.db'}"))
        create_tables(engine)
        with engine.begin() as conn:
            conn.execute(text("SELECT 1 FROM queue"))
            companions = sorted(p.name for p in tmp_path.iterdir())
            modes = {p.name: mode(p) for p in tmp_path.iterdir()}
        engine.dispose()
    finally:
        os.umask(old)
    assert "gateway.db-wal" in companions  # WAL mode: the file exists while a connection is open
    assert modes == dict.fromkeys(companions, 0o600)


def test_a_database_made_readable_by_others_is_narrowed(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    db.touch()
    db.chmod(0o644)
    make_engine(DatabaseConfig(url=f"sqlite:///{db}")).dispose()
    assert mode(db) == 0o600
