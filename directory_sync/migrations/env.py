"""Alembic environment of the directory: its own version table, run on a given connection."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from directory_sync.database import VERSION_TABLE
from directory_sync.models import Base

config = context.config


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        url = config.get_main_option("sqlalchemy.url")
        if url is None:
            raise RuntimeError("run the directory migrations through directory_sync.database.migrate()")
        with create_engine(url).begin() as conn:
            _run_on(conn)
        return
    _run_on(connection)


def _run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run()
