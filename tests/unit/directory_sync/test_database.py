from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import Engine, inspect, text

from directory_sync.database import PAGE_SIZE, VERSION_TABLE, downgrade, make_engine, migrate
from directory_sync.models import Base


def test_migrations_create_every_model_table_and_their_own_version_table(engine: Engine) -> None:
    names = set(inspect(engine).get_table_names())
    assert {t.name for t in Base.metadata.sorted_tables} <= names
    assert VERSION_TABLE in names
    assert "alembic_version" not in names  # the gateway's own history stays free
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar_one() == "0003"


def test_migrate_is_idempotent(engine: Engine) -> None:
    migrate(engine)
    migrate(engine)
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT count(*) FROM {VERSION_TABLE}")).scalar_one() == 1


def test_downgrade_then_upgrade_on_a_fresh_sqlite(tmp_path: Path) -> None:
    eng = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    migrate(eng)
    downgrade(eng)
    assert "dir_mailbox" not in inspect(eng).get_table_names()
    migrate(eng)
    assert "dir_mailbox" in inspect(eng).get_table_names()
    with eng.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
        assert conn.execute(text("PRAGMA page_size")).scalar_one() == PAGE_SIZE
    eng.dispose()


def test_an_existing_sqlite_database_keeps_its_page_size(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:
        old.execute("PRAGMA journal_mode=WAL")
        old.execute("CREATE TABLE kept (x)")
    eng = make_engine(f"sqlite:///{path}")
    migrate(eng)
    with eng.connect() as conn:
        assert conn.execute(text("PRAGMA page_size")).scalar_one() == 4096
        assert conn.execute(text("SELECT count(*) FROM dir_mailbox")).scalar_one() == 0
    eng.dispose()


def test_sqlite_models_match_the_migration(engine: Engine) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        diff = [d for d in compare_metadata(ctx, Base.metadata)]
    assert diff == []


def test_the_line_snapshot_moves_onto_the_rows_and_back(tmp_path: Path) -> None:
    """0003 drops dir_extract_line and gives the line entities a line_hash (NULL for the rows already
    there: the next import compares every key); a downgrade gives back an empty snapshot."""
    eng = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    migrate(eng, "0002")
    with eng.begin() as conn:
        conn.execute(text("INSERT INTO dir_mailbox (address_key, address, mailbox_type, liste_rouge, source, row_hash) "
                          "VALUES ('a@b.fr', 'a@b.fr', 'PER', 0, 'extract', 1)"))
        conn.execute(text("INSERT INTO dir_extract_line (kind, line_hash, key0) "
                          "VALUES ('Extraction_Correspondance_MSSante', 7, 'a@b.fr')"))
    migrate(eng)
    assert "dir_extract_line" not in inspect(eng).get_table_names()
    with eng.connect() as conn:
        assert conn.execute(text("SELECT address_key, line_hash FROM dir_mailbox")).all() == [("a@b.fr", None)]
    downgrade(eng, "0002")
    with eng.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM dir_extract_line")).scalar_one() == 0
        assert conn.execute(text("SELECT address_key FROM dir_mailbox")).all() == [("a@b.fr",)]
    eng.dispose()


def test_the_sqlite_pool_hands_out_the_connection_returned_last(tmp_path: Path) -> None:
    """Each SQLite connection keeps its own page cache: the one returned last, whose cache is warm, is reused
    (a queue would hand out the oldest idle one and fill a second cache)."""
    eng = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with eng.connect() as first, eng.connect() as second:  # `second` is returned first, `first` last
        ids = id(first.connection.driver_connection), id(second.connection.driver_connection)
    with eng.connect() as again:
        assert id(again.connection.driver_connection) == ids[0]
    eng.dispose()
