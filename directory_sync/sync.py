"""Full sync of an extract into the directory: a diff applied in one transaction.

Why this shape:
- A reader must never see a half-synced directory, so each file is applied in one
  transaction (SQLite in WAL mode keeps serving the previous snapshot meanwhile).
- Memory stays bounded whatever the file size: rows stream through in batches and the
  database computes the differences.
- Parsing costs about as much as writing: for a large file the lines are hashed and parsed in
  a worker process (pipeline.py) while this process only executes the SQL, in all three
  strategies. That pays only while the second core is free: the rows cost about 10 % more
  CPU in all (marshalled through a pipe).
- Into empty tables there is nothing to compare: one pass inserts, and the secondary
  indexes are built once at the end (the snapshot's too, unless another extract's lines are
  already in it: then this extract's lines are staged and inserted in index order). A key
  already inserted in this run (a structure shared by many lines) is not extracted again.
- The daily file differs from yesterday's in a few lines, so a re-import works by line: the
  hash of every applied line is kept (`dir_extract_line`, with the keys the line fed); a
  re-import hashes each raw line, parses only the lines whose hash is new (staging their
  bytes, so applying them needs no second read of the file), and derives the deletions from
  the lines that disappeared (a key goes only when no remaining line feeds it). Importing the
  same file again therefore writes nothing and says so.
- Without that snapshot (first sync after an upgrade, after a FHIR increment touched the
  tables, or `full_compare`), every line's keys and content hashes are compared in SQL.
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

from sqlalchemy import Connection, Engine, func, insert, select

from directory_sync.errors import DeletionBrake
from directory_sync.extracts import (
    DEFAULT_ZIP_LIMITS,
    ExtractKind,
    ExtractReader,
    ExtractSource,
    MalformedRow,
    ReadStats,
    ZipLimits,
    sources,
)
from directory_sync.mapping import SPECS, BoundEntity
from directory_sync.models import SyncRun, extract_line
from directory_sync.pipeline import Chunk, KnownLines, LineExtractor, extracted_chunks, gc_paused
from directory_sync.sqlbatch import (
    Batches,
    CopyBatches,
    changed_lines,
    count_rows,
    insert_sql,
    load_hashes,
    marks,
    staged_raw_lines,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_DELETE_SHARE = 0.10

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
    method: str = ""
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
    full_compare: bool = False,
    progress: Progress | None = None,
    parallel: bool | None = None,
    zip_limits: ZipLimits = DEFAULT_ZIP_LIMITS,
) -> list[SyncReport]:
    """Sync every extract found in `paths` (plain files or ZIPs, whose members must keep within `zip_limits`);
    one transaction per extract."""
    reports = []
    for path in paths:
        for source in sources(path, zip_limits):
            reports.append(sync_source(engine, source, max_delete_share=max_delete_share, force=force,
                                       full_compare=full_compare, progress=progress,
                                       parallel=parallel))
    return reports


def sync_source(
    engine: Engine,
    source: ExtractSource,
    *,
    max_delete_share: float = DEFAULT_MAX_DELETE_SHARE,
    force: bool = False,
    full_compare: bool = False,
    progress: Progress | None = None,
    parallel: bool | None = None,
) -> SyncReport:
    """Bring the tables an extract feeds to exactly its content, in one transaction.

    `parallel`: parse the file in a worker process while this one writes (None: for large files).
    """
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    with ExtractReader(source) as reader:
        report = SyncReport(source=source.name, kind=reader.kind, forced=force)
        entities = [spec.bind(reader) for spec in SPECS[reader.kind]]
        run = _Run(reader, source, entities, report, progress, max_delete_share, force, parallel)
        try:
            with gc_paused(), engine.begin() as conn:
                before = [count_rows(conn, e.table) for e in entities]
                report.tables = [TableChange(e.spec.name, n) for e, n in zip(entities, before, strict=True)]
                snapshot = _snapshot_size(conn, reader.kind)
                if all(n == 0 for n in before):
                    report.method = "load"
                    run.bulk_load(conn)
                elif snapshot and not full_compare:
                    report.method = "lines"
                    run.line_diff(conn)
                else:
                    report.method = "compare"
                    run.full_diff(conn)
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
    log.info("%s (%s)", report.summary(), report.method)
    return report


class _Run:
    """One sync of one extract: the three strategies share the row handling below."""

    def __init__(
        self, reader: ExtractReader, source: ExtractSource, entities: list[BoundEntity], report: SyncReport,
        progress: Progress | None, max_delete_share: float, force: bool, parallel: bool | None,
    ) -> None:
        self.reader = reader
        self.source = source
        self.entities = entities
        self.report = report
        self.progress = progress
        self.max_delete_share = max_delete_share
        self.force = force
        self.kind = reader.kind.value
        self.parallel = parallel
        self.extractor = LineExtractor(reader, entities)

    # -- shared pieces ---------------------------------------------------------------------------

    def _lines(self, reader: ExtractReader, phase: str) -> Iterator[tuple[int, bytes]]:
        total = reader.source.size
        progress = self.progress
        return reader.lines(None if progress is None else (lambda done: progress(phase, done, total)))

    def _done(self, phase: str) -> None:
        if self.progress is not None:
            self.progress(phase, self.source.size, self.source.size)

    def _chunks(self, phase: str, mode: str, known: KnownLines | None = None) -> Iterator[Chunk]:
        """The extract's lines, chunk by chunk (see pipeline.py), with progress."""
        total = self.source.size
        progress = self.progress
        for chunk in extracted_chunks(self.reader, self.entities, mode, parallel=self.parallel, known=known):
            if progress is not None:
                progress(phase, chunk.bytes_read, total)
            yield chunk

    def _snapshot_writer(self, conn: Connection) -> Batches:
        """Rows (line_hash, key0, key1, key2) of this extract's snapshot; the kind is added here."""
        cols = ("kind", "line_hash", "key0", "key1", "key2")
        if conn.dialect.name == "postgresql":
            return CopyBatches(conn, extract_line.name, cols, prefix=(self.kind,))
        # The kind is one of ExtractKind's values, written into the statement rather than bound per row.
        return Batches(conn, f"INSERT INTO {extract_line.name} ({', '.join(cols)}) "
                             f"VALUES ('{ExtractKind(self.kind).value}', {marks(conn, 4)})")

    def _check_brake(self) -> None:
        for change, e in zip(self.report.tables, self.entities, strict=True):
            if not self.force and change.before and change.deleted > self.max_delete_share * change.before:
                raise DeletionBrake(e.table.name, change.deleted, change.before, self.max_delete_share)

    # -- into empty tables -------------------------------------------------------------------------

    def bulk_load(self, conn: Connection) -> None:
        """Insert as we read; secondary indexes are dropped and built once at the end."""
        conn.execute(extract_line.delete().where(extract_line.c.kind == self.kind))
        pg = conn.dialect.name == "postgresql"
        inserts: list[Batches] = []
        for i, e in enumerate(self.entities):
            if pg:
                conn.exec_driver_sql(f"CREATE TEMPORARY TABLE dir_load_{i} (LIKE {e.table.name}) ON COMMIT DROP")
                conn.exec_driver_sql(f"ALTER TABLE dir_load_{i} ADD COLUMN _seq BIGINT")
                inserts.append(CopyBatches(conn, f"dir_load_{i}", e.spec.columns, numbered=True))
            else:
                inserts.append(Batches(conn, insert_sql(conn, e, update=False)))
        # The snapshot of another extract may already fill dir_extract_line: rather than build its
        # index again over every kind, this kind's lines are staged and inserted in index order.
        staged = not pg and conn.exec_driver_sql(
            f"SELECT 1 FROM {extract_line.name} WHERE kind <> {marks(conn, 1)} LIMIT 1", (self.kind,)).first()
        if staged:
            conn.exec_driver_sql("DROP TABLE IF EXISTS dir_load_lines")
            conn.exec_driver_sql("CREATE TEMPORARY TABLE dir_load_lines (line_hash BIGINT NOT NULL, key0 VARCHAR(320), "
                                 "key1 VARCHAR(320), key2 VARCHAR(320))")
            snapshot = Batches(conn, f"INSERT INTO dir_load_lines VALUES ({marks(conn, 4)})")
        else:
            snapshot = self._snapshot_writer(conn)
        dropped = [*([] if staged else extract_line.indexes), *(idx for e in self.entities for idx in e.table.indexes)]
        for idx in dropped:
            idx.drop(conn)
        for chunk in self._chunks("load", "load"):
            for batch, rows in zip(inserts, chunk.rows, strict=True):
                batch.add_many(rows)
            snapshot.add_many(chunk.snapshot)
        for batch in (*inserts, snapshot):
            batch.flush()
        if staged:
            conn.exec_driver_sql(f"INSERT INTO {extract_line.name} (kind, line_hash, key0, key1, key2) "
                                 f"SELECT '{ExtractKind(self.kind).value}', line_hash, key0, key1, key2 "
                                 f"FROM dir_load_lines ORDER BY line_hash")
            conn.exec_driver_sql("DROP TABLE dir_load_lines")
        if pg:
            for i, e in enumerate(self.entities):
                cols = ", ".join(e.spec.columns)
                conn.exec_driver_sql(f"INSERT INTO {e.table.name} ({cols}) SELECT {cols} FROM dir_load_{i} "
                                     f"ORDER BY _seq ON CONFLICT ({e.spec.key_column}) DO NOTHING")
        for idx in dropped:
            idx.create(conn)
        self._done("load")
        for change, e in zip(self.report.tables, self.entities, strict=True):
            change.inserted = count_rows(conn, e.table)

    # -- by line, against the snapshot of the last applied file --------------------------------------

    def line_diff(self, conn: Connection) -> None:
        known = KnownLines(load_hashes(conn, self.kind))
        stage = self._create_stage(conn)
        snapshot = self._snapshot_writer(conn)
        # The new lines themselves (a few in a daily file): the second pass reads them from here
        # instead of reading the whole file again.
        blob = "BYTEA" if conn.dialect.name == "postgresql" else "BLOB"
        conn.exec_driver_sql("DROP TABLE IF EXISTS dir_stage_raw")
        conn.exec_driver_sql(f"CREATE TEMPORARY TABLE dir_stage_raw (line INTEGER PRIMARY KEY, raw {blob} NOT NULL)"
                             f"{' ON COMMIT DROP' if blob == 'BYTEA' else ''}")
        raws = Batches(conn, f"INSERT INTO dir_stage_raw (line, raw) VALUES ({marks(conn, 2)})")
        for chunk in self._chunks("compare", "lines", known):
            for batch, new_rows in zip(stage, chunk.rows, strict=True):
                batch.add_many(new_rows)
            snapshot.add_many(chunk.snapshot)
            raws.add_many(chunk.raws)
        prev, present = known.hashes, known.present
        del known
        for batch in (*stage, raws):
            batch.flush()
        self._done("compare")

        # Lines that disappeared: the keys they fed are candidates for deletion.
        removed = Batches(conn, f"INSERT INTO dir_stage_removed (h) VALUES ({marks(conn, 1)})")
        for h, seen_now in zip(prev, present):
            if not seen_now:
                removed.add((h,))
        removed.flush()
        del prev, present
        kind_param = (self.kind,)
        candidates: list[set[str]] = []
        for i in range(len(self.entities)):
            rows = conn.exec_driver_sql(
                f"SELECT DISTINCT l.key{i} FROM {extract_line.name} l JOIN dir_stage_removed r "
                f"ON r.h = l.line_hash WHERE l.kind = {marks(conn, 1)} AND l.key{i} IS NOT NULL", kind_param).all()
            candidates.append({r[0] for r in rows})
        conn.exec_driver_sql(
            f"DELETE FROM {extract_line.name} WHERE kind = {marks(conn, 1)} "
            f"AND line_hash IN (SELECT h FROM dir_stage_removed)", kind_param)
        snapshot.flush()

        # A candidate goes only if no line of the new file still feeds it: not a new line (staged),
        # not an unchanged one (one sequential scan of the snapshot, only when some remain).
        gone: list[set[str]] = []
        if conn.dialect.name == "sqlite":  # force the snapshot as the outer, sequentially read table
            scan = ("SELECT DISTINCT c.k FROM {lines} l CROSS JOIN dir_stage_cand c "
                    "WHERE c.k = l.key{i} AND +l.kind = {mark}")
        else:
            scan = "SELECT DISTINCT c.k FROM {lines} l JOIN dir_stage_cand c ON c.k = l.key{i} WHERE l.kind = {mark}"
        for i, cand in enumerate(candidates):
            if not cand:
                gone.append(set())
                continue
            conn.exec_driver_sql("DELETE FROM dir_stage_cand")
            batch = Batches(conn, f"INSERT INTO dir_stage_cand (k) VALUES ({marks(conn, 1)})")
            for k in cand:
                batch.add((k,))
            batch.flush()
            conn.exec_driver_sql(f"DELETE FROM dir_stage_cand WHERE k IN (SELECT k FROM dir_stage_{i})")
            left = {r[0] for r in conn.exec_driver_sql("SELECT k FROM dir_stage_cand").all()}
            if left:
                sql = scan.format(lines=extract_line.name, i=i, mark=marks(conn, 1))
                left -= {r[0] for r in conn.exec_driver_sql(sql, kind_param).all()}
            gone.append(left)
        for change, g in zip(self.report.tables, gone, strict=True):
            change.deleted = len(g)
        self._check_brake()
        for e, g in zip(self.entities, gone, strict=True):
            if g:
                delete = Batches(conn, f"DELETE FROM {e.table.name} WHERE {e.spec.key_column} = {marks(conn, 1)}")
                for k in g:
                    delete.add((k,))
                delete.flush()
        self._apply_staged(conn, staged_raw_lines(conn))

    # -- every key compared in SQL (no usable snapshot) ----------------------------------------------

    def full_diff(self, conn: Connection) -> None:
        conn.execute(extract_line.delete().where(extract_line.c.kind == self.kind))
        stage = self._create_stage(conn)
        snapshot = self._snapshot_writer(conn)
        for chunk in self._chunks("compare", "stage"):
            for batch, rows in zip(stage, chunk.rows, strict=True):
                batch.add_many(rows)
            snapshot.add_many(chunk.snapshot)
        for batch in (*stage, snapshot):
            batch.flush()
        self._done("compare")
        for i, (e, change) in enumerate(zip(self.entities, self.report.tables, strict=True)):
            table, key = e.table.name, e.spec.key_column
            gone = f"NOT EXISTS (SELECT 1 FROM dir_stage_{i} s WHERE s.k = {table}.{key})"
            change.deleted = int(conn.exec_driver_sql(f"SELECT count(*) FROM {table} WHERE {gone}").scalar_one())
        self._check_brake()
        for i, (e, change) in enumerate(zip(self.entities, self.report.tables, strict=True)):
            if change.deleted:
                table, key = e.table.name, e.spec.key_column
                conn.exec_driver_sql(
                    f"DELETE FROM {table} WHERE NOT EXISTS (SELECT 1 FROM dir_stage_{i} s WHERE s.k = {table}.{key})")
        self._apply_staged(conn)

    # -- staging and the second pass ------------------------------------------------------------------

    def _create_stage(self, conn: Connection) -> list[Batches]:
        pg = conn.dialect.name == "postgresql"
        suffix = " ON COMMIT DROP" if pg else ""
        names = [f"dir_stage_{i}" for i in range(len(self.entities))]
        for name in [*names, "dir_stage_changed", "dir_stage_removed", "dir_stage_cand"]:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
        for name in names:
            conn.exec_driver_sql(f"CREATE TEMPORARY TABLE {name} (k VARCHAR(320) PRIMARY KEY, h BIGINT NOT NULL, "
                                 f"line INTEGER NOT NULL){suffix}")
        conn.exec_driver_sql(f"CREATE TEMPORARY TABLE dir_stage_changed (line INTEGER NOT NULL, ent INTEGER NOT NULL, "
                             f"is_new INTEGER NOT NULL){suffix}")
        conn.exec_driver_sql(f"CREATE TEMPORARY TABLE dir_stage_removed (h BIGINT NOT NULL){suffix}")
        conn.exec_driver_sql(f"CREATE TEMPORARY TABLE dir_stage_cand (k VARCHAR(320) PRIMARY KEY){suffix}")
        return [Batches(conn, f"INSERT INTO {n} (k, h, line) VALUES ({marks(conn, 3)}) ON CONFLICT (k) DO NOTHING")
                for n in names]

    def _apply_staged(self, conn: Connection, lines: Iterator[tuple[int, bytes]] | None = None) -> None:
        """Find the staged keys that are new or whose content changed; upsert them from their lines, read
        from `lines` (ascending line numbers, at least every staged line) or else from the file again."""
        for i, (e, change) in enumerate(zip(self.entities, self.report.tables, strict=True)):
            table, key = e.table.name, e.spec.key_column
            conn.exec_driver_sql(
                f"INSERT INTO dir_stage_changed (line, ent, is_new) "
                f"SELECT s.line, {i}, CASE WHEN t.{key} IS NULL THEN 1 ELSE 0 END "
                f"FROM dir_stage_{i} s LEFT JOIN {table} t ON t.{key} = s.k "
                f"WHERE t.{key} IS NULL OR t.row_hash <> s.h")
            counts: dict[int, int] = dict(conn.exec_driver_sql(
                f"SELECT is_new, count(*) FROM dir_stage_changed WHERE ent = {i} GROUP BY is_new").all())
            change.inserted = int(counts.get(1, 0))
            change.updated = int(counts.get(0, 0))
        if not any(c.inserted or c.updated for c in self.report.tables):
            return
        conn.exec_driver_sql("CREATE INDEX dir_stage_changed_line ON dir_stage_changed (line)")
        upserts = [Batches(conn, insert_sql(conn, e, update=True)) for e in self.entities]
        wanted = changed_lines(conn)
        pending = next(wanted, None)
        with ExtractReader(self.source) as again:
            for line_no, raw in self._lines(again, "apply") if lines is None else lines:
                while pending is not None and pending[0] < line_no:
                    pending = next(wanted, None)
                if pending is None:
                    break
                if pending[0] != line_no:
                    continue
                fields = again.parse(line_no, raw)
                if fields is None:
                    continue
                for ent in pending[1]:
                    item = self.entities[ent].extract(fields)
                    if item is not None:
                        upserts[ent].add(item[2])
            for batch in upserts:
                batch.flush()
            self._done("apply")


def _collect(report: SyncReport, stats: ReadStats) -> None:
    report.rows_read = stats.rows
    report.malformed_count = stats.malformed_count
    report.malformed = list(stats.malformed)


def _snapshot_size(conn: Connection, kind: ExtractKind) -> int:
    query = select(func.count()).select_from(extract_line).where(extract_line.c.kind == kind.value)
    return int(conn.execute(query).scalar_one())


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
