"""Batched SQL for the sync: executemany (SQLite) or COPY (PostgreSQL) writers, chunked reads.

Kept apart from sync.py, which decides what to write; this module only knows how to write
it fast and with bounded memory on both databases.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, Table, func, select

from directory_sync.mapping import BoundEntity

BATCH = 2000
CHUNK = 20_000


class Batches:
    """Rows for one SQL statement, sent by executemany every BATCH rows."""

    def __init__(self, conn: Connection, sql: str) -> None:
        self.conn = conn
        self.sql = sql
        self.rows: list[tuple[Any, ...]] = []

    def add(self, row: tuple[Any, ...]) -> None:
        rows = self.rows
        rows.append(row)
        if len(rows) >= BATCH:
            self.flush()

    def add_many(self, rows: list[tuple[Any, ...]]) -> None:
        if self.rows:
            self.rows.extend(rows)
        else:
            self.rows = rows
        if len(self.rows) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.conn.exec_driver_sql(self.sql, self.rows)  # type: ignore[arg-type]
            self.rows = []


class CopyBatches(Batches):
    """PostgreSQL: the same rows sent with COPY, which is several times faster than INSERT, each with a
    sequence number in front (`_seq`: the order of the file, which the copy into the table keeps)."""

    def __init__(self, conn: Connection, table: str, columns: tuple[str, ...]) -> None:
        super().__init__(conn, f"COPY {table} (_seq, {', '.join(columns)}) FROM STDIN")
        self.seq = 0

    def add(self, row: tuple[Any, ...]) -> None:
        self.seq += 1
        super().add((self.seq, *row))

    def add_many(self, rows: list[tuple[Any, ...]]) -> None:
        for row in rows:
            self.add(row)

    def flush(self) -> None:
        if not self.rows:
            return
        driver = self.conn.connection.driver_connection
        assert driver is not None
        with driver.cursor() as cur, cur.copy(self.sql) as copy:
            for row in self.rows:
                copy.write_row(row)
        self.rows = []


def count_rows(conn: Connection, table: Table) -> int:
    return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def load_hashes(conn: Connection, table: str) -> array[int]:
    """The sorted line hashes kept on the rows of a line entity's table: 8 bytes each (16 MB for 2 M lines).

    Read on the DB-API cursor in chunks (server-side on PostgreSQL): no result-row objects for
    millions of integers, and never all of them in memory at once.
    """
    hashes: array[int] = array("q")
    driver: Any = conn.connection.driver_connection
    cursor = driver.cursor(name="dir_line_hashes") if conn.dialect.name == "postgresql" else driver.cursor()
    try:
        cursor.execute(f"SELECT line_hash FROM {table} WHERE line_hash IS NOT NULL ORDER BY line_hash")
        first = itemgetter(0)
        while rows := cursor.fetchmany(CHUNK):
            hashes.extend(map(first, rows))
    finally:
        cursor.close()
    return hashes


def marks(conn: Connection, n: int) -> str:
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    return ", ".join([mark] * n)


def insert_sql(conn: Connection, entity: BoundEntity, *, update: bool) -> str:
    """The insert of `entity.extract`'s parameters; an empty field is stored as NULL."""
    cols = entity.spec.columns
    key = entity.spec.key_column
    sql = f"INSERT INTO {entity.table.name} ({', '.join(cols)}) VALUES ({entity.spec.values_sql(conn.dialect.paramstyle)}) "
    if not update:
        return sql + f"ON CONFLICT ({key}) DO NOTHING"
    sets = ", ".join(f"{c} = excluded.{c}" for c in cols if c != key)
    return sql + f"ON CONFLICT ({key}) DO UPDATE SET {sets}"


def select_fields(entity: BoundEntity, source: str) -> str:
    """The columns of `entity` selected from a table of the same columns that holds '' for an empty field."""
    fields = {c for c, _ in entity.spec.fields}
    return ", ".join(f"CASE WHEN {source}.{c} <> '' THEN {source}.{c} END" if c in fields else f"{source}.{c}"
                     for c in entity.spec.columns)


def changed_lines(conn: Connection) -> Iterator[tuple[int, list[int]]]:
    """(line, entity indexes) in line order, read in chunks so memory stays bounded."""
    last = 0
    while True:
        chunk = conn.exec_driver_sql(
            f"SELECT line, ent FROM dir_stage_changed WHERE line > {last} ORDER BY line, ent LIMIT {CHUNK}").all()
        if not chunk:
            return
        # A line's entities may straddle the chunk end: drop that last line and read it again.
        final = chunk[-1][0]
        rows = [r for r in chunk if r[0] != final] if len(chunk) == CHUNK else chunk
        rows = rows or chunk
        current: int | None = None
        ents: list[int] = []
        for line, ent in rows:
            if line != current:
                if current is not None:
                    yield current, ents
                current, ents = line, []
            ents.append(ent)
        if current is not None:
            yield current, ents
        last = current if current is not None else final
        if len(chunk) < CHUNK:
            return


def staged_raw_lines(conn: Connection) -> Iterator[tuple[int, bytes]]:
    """(line, raw bytes) of dir_stage_raw in line order, read in chunks so memory stays bounded."""
    last = 0
    while True:
        chunk = conn.exec_driver_sql(
            f"SELECT line, raw FROM dir_stage_raw WHERE line > {last} ORDER BY line LIMIT {CHUNK}").all()
        for line, raw in chunk:
            yield line, bytes(raw)
        if len(chunk) < CHUNK:
            return
        last = chunk[-1][0]
