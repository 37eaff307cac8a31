"""Full sync of an extract into the directory: a diff applied in one transaction.

Why this shape:
- A reader must never see a half-synced directory, so each file is applied in one
  transaction (SQLite in WAL mode keeps serving the previous snapshot meanwhile).
- Memory stays bounded whatever the file size: rows stream through in batches, and the
  difference is computed by the database, not in Python. Pass 1 loads (key, content hash,
  line number) into a temporary table; SQL finds the new and changed keys and the keys that
  disappeared; pass 2 re-reads the file and upserts only the changed lines. Importing the
  same file again therefore writes nothing and says so.
- Into an empty table there is nothing to compare: a single pass inserts directly.
- A truncated download must not wipe the directory: the deletion brake refuses a run that
  would delete more than `max_delete_share` (default 10 %) of a table unless forced.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Table, func, insert, select

from directory_sync.errors import DeletionBrake
from directory_sync.extracts import (
    ExtractKind,
    ExtractReader,
    ExtractSource,
    MalformedRow,
    ReadStats,
    sources,
)
from directory_sync.mapping import SPECS, BoundEntity, RowRejected
from directory_sync.models import SyncRun

log = logging.getLogger(__name__)

DEFAULT_MAX_DELETE_SHARE = 0.10
BATCH = 5000
CHUNK = 20_000

Progress = Callable[[str, int, int], None]
"""progress(phase, bytes done, bytes total)."""


@dataclass(slots=True)
class TableChange:
    table: str
    before: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0

    @property
    def after(self) -> int:
        return self.before + self.inserted - self.deleted


@dataclass(slots=True)
class SyncReport:
    """What the sync of one extract did; `changed` is False when the file matched the directory."""

    source: str
    kind: ExtractKind
    rows_read: int = 0
    malformed_count: int = 0
    malformed: list[MalformedRow] = field(default_factory=list)
    tables: list[TableChange] = field(default_factory=list)
    seconds: float = 0.0
    forced: bool = False
    run_id: int | None = None

    @property
    def changed(self) -> bool:
        return any(t.inserted or t.updated or t.deleted for t in self.tables)

    def summary(self) -> str:
        head = f"{self.source}: {self.kind.value}, {self.rows_read} rows read, {self.malformed_count} malformed"
        if not self.changed:
            return f"{head}; nothing changed ({self.seconds:.1f} s)"
        parts = [f"{t.table} +{t.inserted} ~{t.updated} -{t.deleted} (now {t.after})" for t in self.tables]
        return f"{head}; " + "; ".join(parts) + f" ({self.seconds:.1f} s)"


def import_paths(
    engine: Engine,
    paths: Iterable[Path | str],
    *,
    max_delete_share: float = DEFAULT_MAX_DELETE_SHARE,
    force: bool = False,
    progress: Progress | None = None,
) -> list[SyncReport]:
    """Sync every extract found in `paths` (plain files or ZIPs); one transaction per extract."""
    reports = []
    for path in paths:
        for source in sources(path):
            reports.append(sync_source(engine, source, max_delete_share=max_delete_share, force=force,
                                       progress=progress))
    return reports


def sync_source(
    engine: Engine,
    source: ExtractSource,
    *,
    max_delete_share: float = DEFAULT_MAX_DELETE_SHARE,
    force: bool = False,
    progress: Progress | None = None,
) -> SyncReport:
    """Bring the tables an extract feeds to exactly its content, in one transaction."""
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    with ExtractReader(source) as reader:
        report = SyncReport(source=source.name, kind=reader.kind, forced=force)
        entities = [spec.bind(reader) for spec in SPECS[reader.kind]]
        try:
            with engine.begin() as conn:
                before = {e.spec.name: _count(conn, e.table) for e in entities}
                report.tables = [TableChange(e.spec.name, before[e.spec.name]) for e in entities]
                if all(n == 0 for n in before.values()):
                    _bulk_load(conn, reader, entities, report, progress)
                else:
                    _diff_load(conn, reader, source, entities, report, progress, max_delete_share, force)
                _collect(report, reader.stats)
                report.seconds = time.perf_counter() - t0
                report.run_id = _record(conn, report, started, "ok" if report.changed else "unchanged", None)
        except DeletionBrake as exc:
            _collect(report, reader.stats)
            report.seconds = time.perf_counter() - t0
            with engine.begin() as conn:
                report.run_id = _record(conn, report, started, "refused", str(exc))
            log.warning("sync of %s refused: %s", source.name, exc)
            raise
        except Exception as exc:
            _collect(report, reader.stats)
            report.seconds = time.perf_counter() - t0
            with engine.begin() as conn:
                _record(conn, report, started, "failed", f"{type(exc).__name__}: {exc}")
            raise
    log.info("%s", report.summary())
    return report


def _collect(report: SyncReport, stats: ReadStats) -> None:
    report.rows_read = stats.rows
    report.malformed_count = stats.malformed_count
    report.malformed = list(stats.malformed)


def _count(conn: Connection, table: Table) -> int:
    return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _placeholders(conn: Connection, n: int) -> str:
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    return ", ".join([mark] * n)


def _insert_sql(conn: Connection, entity: BoundEntity, *, update: bool) -> str:
    cols = entity.spec.columns
    key = entity.spec.key_column
    sql = f"INSERT INTO {entity.table.name} ({', '.join(cols)}) VALUES ({_placeholders(conn, len(cols))}) "
    if not update:
        return sql + f"ON CONFLICT ({key}) DO NOTHING"
    sets = ", ".join(f"{c} = excluded.{c}" for c in cols if c != key)
    return sql + f"ON CONFLICT ({key}) DO UPDATE SET {sets}"


def _rows(reader: ExtractReader, progress: Progress | None, phase: str) -> Iterator[tuple[int, list[str]]]:
    total = reader.source.size
    callback = None if progress is None else (lambda done: progress(phase, done, total))
    yield from reader.rows(callback)


def _done(reader: ExtractReader, progress: Progress | None, phase: str) -> None:
    if progress is not None:
        progress(phase, reader.source.size, reader.source.size)


def _bulk_load(
    conn: Connection, reader: ExtractReader, entities: list[BoundEntity], report: SyncReport,
    progress: Progress | None,
) -> None:
    sqls = [_insert_sql(conn, e, update=False) for e in entities]
    batches: list[list[tuple[Any, ...]]] = [[] for _ in entities]
    stats = reader.stats
    for line_no, row in _rows(reader, progress, "load"):
        try:
            extracted = [e.extract(row) for e in entities]
        except RowRejected as exc:
            stats.rows -= 1
            stats.reject(line_no, exc.reason)
            continue
        for i, item in enumerate(extracted):
            if item is not None:
                batches[i].append(item[2])
                if len(batches[i]) >= BATCH:
                    conn.exec_driver_sql(sqls[i], batches[i])  # type: ignore[arg-type]
                    batches[i] = []
    for sql, batch in zip(sqls, batches, strict=True):
        if batch:
            conn.exec_driver_sql(sql, batch)  # type: ignore[arg-type]
    _done(reader, progress, "load")
    for change, e in zip(report.tables, entities, strict=True):
        change.inserted = _count(conn, e.table)


def _diff_load(
    conn: Connection, reader: ExtractReader, source: ExtractSource, entities: list[BoundEntity],
    report: SyncReport, progress: Progress | None, max_delete_share: float, force: bool,
) -> None:
    pg = conn.dialect.name == "postgresql"
    temp = "CREATE TEMPORARY TABLE"
    suffix = " ON COMMIT DROP" if pg else ""
    names = [f"dir_stage_{i}" for i in range(len(entities))]
    for name in [*names, "dir_stage_changed"]:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
    for name in names:
        conn.exec_driver_sql(f"{temp} {name} (k VARCHAR(320) PRIMARY KEY, h BIGINT NOT NULL, line INTEGER NOT NULL)"
                             f"{suffix}")
    conn.exec_driver_sql(f"{temp} dir_stage_changed (line INTEGER NOT NULL, ent INTEGER NOT NULL, "
                         f"is_new INTEGER NOT NULL){suffix}")

    # Pass 1: keys and hashes only.
    stage_sql = [f"INSERT INTO {n} (k, h, line) VALUES ({_placeholders(conn, 3)}) ON CONFLICT (k) DO NOTHING"
                 for n in names]
    batches: list[list[tuple[Any, ...]]] = [[] for _ in entities]
    stats = reader.stats
    for line_no, row in _rows(reader, progress, "compare"):
        try:
            extracted = [e.extract(row) for e in entities]
        except RowRejected as exc:
            stats.rows -= 1
            stats.reject(line_no, exc.reason)
            continue
        for i, item in enumerate(extracted):
            if item is not None:
                batches[i].append((item[0], item[1], line_no))
                if len(batches[i]) >= BATCH:
                    conn.exec_driver_sql(stage_sql[i], batches[i])  # type: ignore[arg-type]
                    batches[i] = []
    for sql, batch in zip(stage_sql, batches, strict=True):
        if batch:
            conn.exec_driver_sql(sql, batch)  # type: ignore[arg-type]
    _done(reader, progress, "compare")

    # The difference, computed by the database.
    for i, (e, change, stage) in enumerate(zip(entities, report.tables, names, strict=True)):
        table, key = e.table.name, e.spec.key_column
        gone = f"NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.k = {table}.{key})"
        change.deleted = int(conn.exec_driver_sql(f"SELECT count(*) FROM {table} WHERE {gone}").scalar_one())
        if not force and change.before and change.deleted > max_delete_share * change.before:
            raise DeletionBrake(table, change.deleted, change.before, max_delete_share)
        conn.exec_driver_sql(
            f"INSERT INTO dir_stage_changed (line, ent, is_new) "
            f"SELECT s.line, {i}, CASE WHEN t.{key} IS NULL THEN 1 ELSE 0 END "
            f"FROM {stage} s LEFT JOIN {table} t ON t.{key} = s.k "
            f"WHERE t.{key} IS NULL OR t.row_hash <> s.h"
        )
        counts: dict[int, int] = dict(conn.exec_driver_sql(
            f"SELECT is_new, count(*) FROM dir_stage_changed WHERE ent = {i} GROUP BY is_new").all())
        change.inserted = int(counts.get(1, 0))
        change.updated = int(counts.get(0, 0))
        if change.deleted:
            conn.exec_driver_sql(f"DELETE FROM {table} WHERE {gone}")
    if not any(c.inserted or c.updated for c in report.tables):
        return

    # Pass 2: re-read the file, upsert only the changed lines.
    conn.exec_driver_sql("CREATE INDEX dir_stage_changed_line ON dir_stage_changed (line)")
    upsert_sql = [_insert_sql(conn, e, update=True) for e in entities]
    upserts: list[list[tuple[Any, ...]]] = [[] for _ in entities]
    wanted = _changed_lines(conn)
    pending = next(wanted, None)
    with ExtractReader(source) as again:
        for line_no, row in _rows(again, progress, "apply"):
            while pending is not None and pending[0] < line_no:
                pending = next(wanted, None)
            if pending is None:
                break
            if pending[0] != line_no:
                continue
            for ent in pending[1]:
                item = entities[ent].extract(row)
                if item is not None:
                    upserts[ent].append(item[2])
                    if len(upserts[ent]) >= BATCH:
                        _flush(conn, upsert_sql[ent], upserts[ent])
        for sql, batch in zip(upsert_sql, upserts, strict=True):
            _flush(conn, sql, batch)
        _done(again, progress, "apply")


def _flush(conn: Connection, sql: str, batch: list[tuple[Any, ...]]) -> None:
    if batch:
        conn.exec_driver_sql(sql, batch)  # type: ignore[arg-type]
        batch.clear()


def _changed_lines(conn: Connection) -> Iterator[tuple[int, list[int]]]:
    """(line, entity indexes) in line order, read in chunks so memory stays bounded."""
    last = 0
    while True:
        chunk = conn.exec_driver_sql(
            f"SELECT line, ent FROM dir_stage_changed WHERE line > {last} ORDER BY line, ent LIMIT {CHUNK}").all()
        if not chunk:
            return
        # A line's entities may straddle the chunk end: drop that last line and read it again.
        final = chunk[-1][0]
        if len(chunk) == CHUNK:
            rows = [r for r in chunk if r[0] != final] or chunk
        else:
            rows = chunk
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


def _record(conn: Connection, report: SyncReport, started: dt.datetime, status: str, message: str | None) -> int:
    """One row per run; a refused or failed run applied nothing, so it counts no change."""
    applied = status in ("ok", "unchanged")
    result = conn.execute(insert(SyncRun).values(
        kind=report.kind.value, source=report.source, started_at=started, finished_at=dt.datetime.now(dt.UTC),
        status=status, forced=report.forced, rows_read=report.rows_read, rows_malformed=report.malformed_count,
        inserted=sum(t.inserted for t in report.tables) if applied else 0,
        updated=sum(t.updated for t in report.tables) if applied else 0,
        deleted=sum(t.deleted for t in report.tables) if applied else 0, message=message,
    ))
    pk = result.inserted_primary_key
    return int(pk[0]) if pk is not None else 0
