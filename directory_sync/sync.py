"""Full sync of an extract into the directory: a diff applied in one transaction.

Why this shape:
- A reader must never see a half-synced directory, so each file is applied in one
  transaction, DDL included (SQLite in WAL mode keeps serving the previous snapshot meanwhile).
- Memory stays bounded whatever the file size: rows stream through in batches and the
  database computes the differences.
- Parsing costs about as much as writing, and there is a second core: a large file is split
  with a worker process (pipeline.py), which writes its part into scratch SQLite files, one
  segment after the other, each copied here, in SQL, after this process's own rows (so the
  first line still wins a repeated key) as soon as it is complete, in all three strategies.
- Into empty tables there is nothing to compare: one pass inserts, and the secondary
  indexes are built once at the end. A key already inserted in this run (a structure shared
  by many lines) is not extracted again. While the worker's last rows are copied, those
  indexes built and the commit written (one core's work), the next extract of the same
  import, when it too goes into empty tables, is read ahead by a worker (`_Ahead`); so is it,
  by line, while a re-import applies its changes.
- The daily file differs from yesterday's in a few lines, so a re-import works by line: each
  line's hash is kept on the row it fed (the line entity's: an activity names the
  practitioner and the structure its line fed); a re-import hashes each raw line, parses only
  the lines whose hash is new (staging their bytes, so applying them needs no second read of
  the file), and derives the deletions from the lines that disappeared (a key goes only when
  no new line has it and no row left names it). Importing the same file again therefore
  writes nothing and says so. A line entity's content hash is its line's hash: a line that
  changes in any way (even only its spelling: a reordered column, a line end) is written
  again and counted as updated.
- Without line hashes on every row (first sync after an upgrade, after FHIR wrote mailboxes,
  or `full_compare`), every line's keys and content hashes are compared in SQL.
- A truncated download must not wipe the directory: the deletion brake refuses a run that
  would delete more than `max_delete_share` (default 10 %) of a table unless forced.
- On SQLite, the copy of an extract's committed pages from the WAL into the database file
  (a checkpoint: seconds after a full load) runs in a process of its own while the next
  extract syncs (`_Checkpoints`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from sqlalchemy import Connection, Engine, insert

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
from directory_sync.models import SyncRun
from directory_sync.pipeline import (
    SEGMENTS,
    Extraction,
    KnownLines,
    gc_paused,
    line_hash,
    prepare_sides,
    side_tables,
    split_point,
    wants_worker,
)
from directory_sync.sqlbatch import (
    CHUNK,
    Batches,
    CopyBatches,
    changed_lines,
    count_rows,
    insert_sql,
    load_hashes,
    marks,
    select_fields,
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
    found = [source for path in paths for source in sources(path, zip_limits)]
    reports = []
    ahead = _Ahead(engine, parallel, full_compare)
    with contextlib.closing(ahead), _Checkpoints(engine, len(found)) as checkpoints:
        for i, source in enumerate(found):
            ahead.following = found[i + 1] if i + 1 < len(found) else None
            reports.append(sync_source(engine, source, max_delete_share=max_delete_share, force=force,
                                       full_compare=full_compare, progress=progress,
                                       parallel=parallel, ahead=ahead, checkpoints=checkpoints))
            checkpoints.start()
    return reports


_CHECKPOINTER = """
import os, sqlite3, sys
os.nice(19)
db = sqlite3.connect(sys.argv[1], timeout=30)
for _ in sys.stdin:
    print(*db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone(), flush=True)
"""
"""The checkpoint process: for each line it reads, a checkpoint, and SQLite's answer (busy, pages logged, pages
copied) on a line. At the lowest CPU priority: it takes the CPU the sync leaves (the import waits for it only at
its end, when nothing else runs)."""


class _Checkpoints:
    """SQLite, an import of several extracts: the WAL checkpoint after each extract's commit, run by a process of
    its own while the next extract syncs.

    A commit in WAL mode leaves the changed pages in the log, and SQLite copies them into the database file (a
    checkpoint) in the committing connection once the log is past 1000 pages: after a full load of the national
    file, about a gigabyte, seconds of writing and syncing with one core idle. Here the import's transactions
    run none (`wal_autocheckpoint` 0 on their connection, `paused`), and after each commit a checkpoint process
    started with the import (a new interpreter, small) checkpoints (`start`) beside the next extract's sync: a
    checkpoint copies only committed pages and takes no writer's lock. A process, not a thread: the sync forks
    its workers, and a fork while a thread is inside SQLite could leave one of SQLite's locks held forever in the
    worker. Once the last extract is synced, this process checkpoints what is left (nothing, unless the
    checkpoint process ended early), so the import leaves what an import with SQLite's own checkpoints leaves.
    Nothing to do for a single extract (no next extract to overlap), on PostgreSQL or in an in-memory
    database."""

    def __init__(self, engine: Engine, extracts: int) -> None:
        self.engine = engine
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        self.path = Path(database).resolve() if database and database != ":memory:" and extracts > 1 else None
        self._process: subprocess.Popen[str] | None = None
        self._asked = False

    def __enter__(self) -> Self:
        if self.path is not None:
            try:
                self._process = subprocess.Popen([sys.executable, "-I", "-S", "-c", _CHECKPOINTER, str(self.path)],
                                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            except OSError as exc:  # no interpreter to start (embedded): SQLite's own checkpoints
                log.warning("no directory checkpoint process (%s): SQLite checkpoints as it commits", exc)
                self.path = None
        return self

    @contextlib.contextmanager
    def paused(self, driver: Any) -> Iterator[None]:
        """No automatic checkpoint on the DB-API connection `driver` meanwhile; its own setting back after."""
        if self.path is None:
            yield
            return
        (every,) = driver.execute("PRAGMA wal_autocheckpoint").fetchone()
        driver.execute("PRAGMA wal_autocheckpoint=0")
        try:
            yield
        finally:
            driver.execute(f"PRAGMA wal_autocheckpoint={int(every)}")

    def start(self) -> None:
        """Have the checkpoint process copy what is committed (once the checkpoint before it is done)."""
        self.wait()
        if self._process is None:
            return
        assert self._process.stdin is not None
        try:
            self._process.stdin.write("checkpoint\n")
            self._process.stdin.flush()
        except OSError:
            self._failed()
            return
        self._asked = True

    def wait(self) -> None:
        """Wait for the checkpoint asked, and say how it went."""
        if not self._asked or self._process is None:
            return
        self._asked = False
        assert self._process.stdout is not None
        answer = self._process.stdout.readline().split()  # nothing if it ended
        if len(answer) != 3:
            self._failed()
            return
        _report(*map(int, answer))

    def _failed(self) -> None:
        """The checkpoint process ended (its error is on stderr): what it did not copy is copied at the end."""
        assert self._process is not None
        log.warning("the directory checkpoint process ended (exit code %s); the import checkpoints at its end",
                    self._process.wait())
        self._process = None

    def __exit__(self, *exc: object) -> None:
        self.wait()
        if self._process is not None:
            self._process.communicate()  # closes its input: it ends
            self._process = None
        if self.path is not None:
            with self.engine.connect() as conn:
                _report(*conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one())


def _report(busy: int, logged: int, copied: int) -> None:
    log.debug("directory checkpoint: %d of %d logged pages copied%s", copied, logged, " (busy)" if busy else "")


AHEAD_MAX_SHARE = 0.25
"""The largest next extract read ahead, as a share of the one being synced. Its worker reads the whole file
while this process builds indexes and commits (about a fifth of the time the parse of the same bytes takes),
or applies a re-import's changes: a larger one would leave this process waiting for it instead of reading its
own share of the file."""


class _Ahead:
    """The next extract of an import read ahead, whole, by a worker (pipeline.py) while the sync before it builds
    its indexes and writes its commit, or applies its changes, which keep one core busy and leave the other idle.

    Only for tables the sync running does not write, for a file large enough to be split anyway but small
    beside the one running (AHEAD_MAX_SHARE), and only in the two modes its own sync can be sure of beforehand:
    into empty tables (a first load, the common case of a first import of both national files), or by line
    against the line hashes of tables that all have them (the daily re-import of both files), unless
    `full_compare`. Its sync then takes the worker's scratch files as they are (`take`) instead of reading the
    file itself, if its tables are still as they were (`_Run._extract`: still empty, the same line hashes)."""

    def __init__(self, engine: Engine, parallel: bool | None, full_compare: bool) -> None:
        self.engine = engine
        self.parallel = parallel
        self.full_compare = full_compare
        self.following: ExtractSource | None = None
        self._early: tuple[ExtractSource, Extraction, contextlib.ExitStack] | None = None

    def start(self, running: ExtractSource, busy: list[BoundEntity]) -> None:
        """Start reading the following extract, unless it feeds one of the tables of `busy` (the sync of
        `running`) or tables its sync will compare key by key."""
        source, self.following = self.following, None
        if (source is None or self._early is not None or self.parallel is False
                or source.size > AHEAD_MAX_SHARE * running.size):
            return
        stack = contextlib.ExitStack()
        try:
            reader = stack.enter_context(ExtractReader(source))
            entities = [spec.bind(reader) for spec in SPECS[reader.kind]]
            tables = {e.table.name for e in entities}
            if tables & {e.table.name for e in busy} or not wants_worker(reader, self.parallel):
                stack.close()
                return
            with self.engine.connect() as conn:  # beside the running sync's: the committed tables
                known = None
                if any(count_rows(conn, e.table) for e in entities):
                    if self.full_compare or not _has_line_hashes(conn, entities[-1]):
                        stack.close()
                        return
                    known = KnownLines(load_hashes(conn, entities[-1].table.name))
            sides = stack.enter_context(_scratch_files(self.engine, entities))
            extraction = Extraction(reader, entities, "load" if known is None else "lines", known=known,
                                    sides=sides, split=reader.stats.bytes_read)
            stack.callback(extraction.close)
            extraction.start()
        except Exception:  # its own sync reads it again and reports what is wrong with it
            stack.close()
            log.debug("%s not read ahead", source.name, exc_info=True)
            return
        self._early = (source, extraction, stack)

    def take(self, source: ExtractSource) -> tuple[Extraction, contextlib.ExitStack] | None:
        """The extraction read ahead for `source`, if any, and the stack that closes its reader, stops its
        worker and removes its scratch files; one read ahead for another source is dropped."""
        early, self._early = self._early, None
        if early is None:
            return None
        if early[0] is source:
            return early[1], early[2]
        early[2].close()
        return None

    def close(self) -> None:
        """Stop a worker whose extract was not synced (an error before it) and remove its files."""
        self.following = None
        if self._early is not None:
            self._early[2].close()
            self._early = None


def sync_source(
    engine: Engine,
    source: ExtractSource,
    *,
    max_delete_share: float = DEFAULT_MAX_DELETE_SHARE,
    force: bool = False,
    full_compare: bool = False,
    progress: Progress | None = None,
    parallel: bool | None = None,
    ahead: _Ahead | None = None,
    checkpoints: _Checkpoints | None = None,
) -> SyncReport:
    """Bring the tables an extract feeds to exactly its content, in one transaction.

    `parallel`: parse the file in a worker process while this one writes (None: for large files).
    `ahead`: the import's extracts read ahead; `checkpoints`: its checkpoints, which it runs (`import_paths`).
    """
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    early = ahead.take(source) if ahead is not None else None
    with contextlib.ExitStack() as stack:
        if early is not None:
            stack.enter_context(early[1])
            reader, sides = early[0].reader, early[0].sides
            entities = early[0].entities
        else:
            reader = stack.enter_context(ExtractReader(source))
            entities = [spec.bind(reader) for spec in SPECS[reader.kind]]
            sides = stack.enter_context(_scratch_files(engine, entities)) if wants_worker(reader, parallel) else None
        report = SyncReport(source=source.name, kind=reader.kind, forced=force)
        run = _Run(reader, source, entities, report, progress, max_delete_share, force, sides, ahead,
                   None if early is None else early[0])
        try:
            with gc_paused(), _transaction(engine, sides, checkpoints) as conn:
                before = [count_rows(conn, e.table) for e in entities]
                report.tables = [TableChange(e.spec.name, n) for e, n in zip(entities, before, strict=True)]
                if all(n == 0 for n in before):
                    report.method = "load"
                    run.bulk_load(conn)
                elif not full_compare and _has_line_hashes(conn, entities[-1]):
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


SCRATCH_PREFIX = "mssgw-directory-"
STALE_SCRATCH_SECONDS = 86_400
"""A scratch file older than this was left by an import that was killed: the next import removes it."""


@contextlib.contextmanager
def _scratch_files(engine: Engine, entities: list[BoundEntity]) -> Iterator[list[Path]]:
    """Scratch files for the worker's segments (pipeline.py), their tables made, removed afterwards.

    Together they hold about half of the extract's rows (half a gigabyte for the national file): beside a
    SQLite database, whose disk has room for the directory anyway, rather than in /tmp, which may be memory.
    They hold public directory data only, but are private (mkstemp) like every file the gateway writes."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    where = Path(database).resolve().parent if database and database != ":memory:" else Path(tempfile.gettempdir())
    now = time.time()
    for old in where.glob(f"{SCRATCH_PREFIX}*.db"):
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > STALE_SCRATCH_SECONDS:
                old.unlink()
    paths: list[Path] = []
    try:
        for _ in range(SEGMENTS):
            fd, name = tempfile.mkstemp(prefix=SCRATCH_PREFIX, suffix=".db", dir=where)
            os.close(fd)
            paths.append(Path(name))
        prepare_sides(paths, entities)
        yield paths
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


def _side_schema(i: int) -> str:
    return f"dir_side{i}"


@contextlib.contextmanager
def _transaction(engine: Engine, sides: list[Path] | None, checkpoints: _Checkpoints | None) -> Iterator[Connection]:
    """One transaction for the whole sync, DDL included.

    On SQLite it is begun explicitly (the sqlite3 module would only begin it at the first INSERT, leaving
    the index drops of a load outside it), and the worker's scratch files are attached before: SQLite
    attaches nothing inside a transaction. The transaction reads each of them only once the worker has
    completed it: a read would keep that file's snapshot until the commit. With `checkpoints`, the commit runs
    no checkpoint: they do."""
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        driver: Any = conn.connection.driver_connection  # outside SQLAlchemy's transaction
        attached: list[str] = []
        paused = checkpoints.paused(driver) if checkpoints is not None else contextlib.nullcontext()
        try:
            for i, side in enumerate(sides if sides is not None and sqlite else []):
                driver.execute(f"ATTACH DATABASE ? AS {_side_schema(i)}", (str(side),))
                attached.append(_side_schema(i))
            with paused, conn.begin():
                if sqlite:  # deferred: IMMEDIATE would lock the worker's scratch files too
                    conn.exec_driver_sql("BEGIN")
                yield conn
        finally:
            for schema in attached:
                driver.execute(f"DETACH DATABASE {schema}")


class _Run:
    """One sync of one extract: the three strategies share the row handling below."""

    def __init__(
        self, reader: ExtractReader, source: ExtractSource, entities: list[BoundEntity], report: SyncReport,
        progress: Progress | None, max_delete_share: float, force: bool, sides: list[Path] | None,
        ahead: _Ahead | None, early: Extraction | None,
    ) -> None:
        self.reader = reader
        self.source = source
        self.entities = entities
        self.report = report
        self.progress = progress
        self.max_delete_share = max_delete_share
        self.force = force
        self.sides = sides
        self.ahead = ahead
        self.early = early

    # -- shared pieces ---------------------------------------------------------------------------

    def _lines(self, reader: ExtractReader, phase: str) -> Iterator[tuple[int, bytes]]:
        total = reader.source.size
        progress = self.progress
        return reader.lines(None if progress is None else (lambda done: progress(phase, done, total)))

    def _done(self, phase: str) -> None:
        if self.progress is not None:
            self.progress(phase, self.source.size, self.source.size)

    def _extract(self, conn: Connection, phase: str, mode: str, sinks: list[Batches], raws: Batches | None = None,
                 known: KnownLines | None = None, read_ahead: bool = False) -> None:
        """Every line's rows, per entity, into `sinks` (and in mode "lines" the new lines into `raws`): this
        process's part of the file first, then the worker's, copied from its scratch files one after the
        other as the worker completes them, so that the first line of the file wins a repeated key.

        `read_ahead`: the next extract of the import is read ahead (`_Ahead`) as soon as the file is read, by
        the worker (its last segment complete, before the copy of that segment) or by this process."""
        total = self.source.size
        progress = self.progress
        extraction, self.early = self.early, None
        if extraction is not None and (extraction.mode != mode or extraction.known is not known):
            # Read ahead into tables found empty, or against line hashes, which another writer has changed since:
            # read here alone.
            extraction.close()
            extraction, self.sides = None, None
        if extraction is None:
            extraction = Extraction(self.reader, self.entities, mode, known=known, sides=self.sides,
                                    split=None if self.sides is None else split_point(self.reader, mode))
            extraction.start()
        try:
            for chunk in extraction.chunks():
                for batch, rows in zip(sinks, chunk.rows, strict=True):
                    batch.add_many(rows)
                if raws is not None:
                    raws.add_many(chunk.raws)
                if progress is not None:
                    progress(phase, chunk.bytes_read, total)
            for batch in (*sinks, *([] if raws is None else [raws])):
                batch.flush()
            last = len(extraction.sides or []) - 1
            for i, side in enumerate(extraction.segments(
                    None if progress is None else (lambda done: progress(phase, done, total)))):
                if read_ahead and i == last and self.ahead is not None:  # the worker is done: its core is free
                    self.ahead.start(self.source, self.entities)
                self._copy_side(conn, i, side, mode, sinks, raws, extraction.offset)
            extraction.finish()
            if read_ahead and self.ahead is not None:  # without a worker (nothing if started above)
                self.ahead.start(self.source, self.entities)
        finally:
            extraction.close()
        self._done(phase)

    def _copy_side(self, conn: Connection, i: int, path: Path, mode: str, sinks: list[Batches],
                   raws: Batches | None, offset: int) -> None:
        """The rows of the worker's segment `i` (the file `path`) after those before: in SQL from the attached
        file on SQLite (no row through Python), read back into the same batches on PostgreSQL. Its line
        numbers start after ours."""
        tables = side_tables(self.entities, mode)
        if conn.dialect.name == "sqlite":
            side = _side_schema(i)
            for n, e in enumerate(self.entities):
                name = tables[n][0]
                if mode == "load":
                    sql = (f"INSERT INTO {e.table.name} ({', '.join(e.spec.columns)}) "
                           f"SELECT {', '.join(e.spec.columns)} FROM {side}.{name} "
                           f"WHERE true ON CONFLICT ({e.spec.key_column}) DO NOTHING")
                else:
                    sql = (f"INSERT INTO dir_stage_{n} (k, h, line) SELECT k, h, line + {offset} "
                           f"FROM {side}.{name} WHERE true ON CONFLICT (k) DO NOTHING")
                conn.exec_driver_sql(sql)
            if raws is not None:
                conn.exec_driver_sql(f"INSERT INTO dir_stage_raw (line, raw) SELECT line + {offset}, raw "
                                     f"FROM {side}.raws")
            return
        targets = [*sinks, *([] if raws is None else [raws])]
        with contextlib.closing(sqlite3.connect(path)) as scratch:
            for (name, columns), batch in zip(tables, targets, strict=False):
                cursor = scratch.execute(f"SELECT {', '.join(columns)} FROM {name} ORDER BY rowid")
                while rows := cursor.fetchmany(CHUNK):
                    if mode != "load":  # the line number: third of a staged row, first of a raw line
                        at = 0 if batch is raws else 2
                        rows = [(*r[:at], r[at] + offset, *r[at + 1:]) for r in rows]
                    batch.add_many(rows)
                batch.flush()

    def _check_brake(self) -> None:
        for change, e in zip(self.report.tables, self.entities, strict=True):
            if not self.force and change.before and change.deleted > self.max_delete_share * change.before:
                raise DeletionBrake(e.table.name, change.deleted, change.before, self.max_delete_share)

    # -- into empty tables -------------------------------------------------------------------------

    def bulk_load(self, conn: Connection) -> None:
        """Insert as we read; secondary indexes are dropped and built once at the end."""
        pg = conn.dialect.name == "postgresql"
        inserts: list[Batches] = []
        for i, e in enumerate(self.entities):
            if pg:
                conn.exec_driver_sql(f"CREATE TEMPORARY TABLE dir_load_{i} (LIKE {e.table.name}) ON COMMIT DROP")
                conn.exec_driver_sql(f"ALTER TABLE dir_load_{i} ADD COLUMN _seq BIGINT")
                inserts.append(CopyBatches(conn, f"dir_load_{i}", e.spec.columns))
            else:
                inserts.append(Batches(conn, insert_sql(conn, e, update=False)))
        dropped = [idx for e in self.entities for idx in e.table.indexes]
        for idx in dropped:
            idx.drop(conn)
        self._extract(conn, "load", "load", inserts, read_ahead=True)
        if pg:
            for i, e in enumerate(self.entities):
                conn.exec_driver_sql(f"INSERT INTO {e.table.name} ({', '.join(e.spec.columns)}) "
                                     f"SELECT {select_fields(e, 'l')} FROM dir_load_{i} l "
                                     f"ORDER BY _seq ON CONFLICT ({e.spec.key_column}) DO NOTHING")
        for idx in dropped:
            idx.create(conn)
        for change, e in zip(self.report.tables, self.entities, strict=True):
            change.inserted = count_rows(conn, e.table)

    # -- by line, against the line hashes of the last applied file --------------------------------------

    def line_diff(self, conn: Connection) -> None:
        line = self.entities[-1]
        table, key = line.table.name, line.spec.key_column
        hashes = load_hashes(conn, table)
        early = self.early.known if self.early is not None else None
        known = early if early is not None and early.hashes == hashes else KnownLines(hashes)
        stage = self._create_stage(conn)
        # The new lines themselves (a few in a daily file): the second pass reads them from here
        # instead of reading the whole file again.
        blob = "BYTEA" if conn.dialect.name == "postgresql" else "BLOB"
        _drop_temporary(conn, "dir_stage_raw")
        conn.exec_driver_sql(f"CREATE TEMPORARY TABLE dir_stage_raw (line INTEGER PRIMARY KEY, raw {blob} NOT NULL)"
                             f"{' ON COMMIT DROP' if blob == 'BYTEA' else ''}")
        raws = Batches(conn, f"INSERT INTO dir_stage_raw (line, raw) VALUES ({marks(conn, 2)})")
        self._extract(conn, "compare", "lines", stage, raws, known, read_ahead=True)

        # The rows whose line disappeared, and the keys they name: candidates for deletion.
        removed = Batches(conn, f"INSERT INTO dir_stage_removed (h) VALUES ({marks(conn, 1)}) "
                                f"ON CONFLICT (h) DO NOTHING")
        removed.add_many(list(zip(known.absent())))
        removed.flush()
        del known
        refs = [e.spec.key_column for e in self.entities[:-1]]  # columns of the line entity's table
        cols = ", ".join(f"t.{c}" for c in (*refs, key))
        # CROSS JOIN: SQLite then reads the few removed hashes and looks each up in the line hash index; with a
        # plain JOIN it scanned the whole table (two million activities) and looked each row's hash up instead.
        fed = conn.exec_driver_sql(f"SELECT {cols} FROM dir_stage_removed r CROSS JOIN {table} t "
                                   f"WHERE t.line_hash = r.h").all()

        # A row of the line entity goes unless a new line has its key (a changed mailbox); it goes first,
        # so that what is left names the keys the unchanged lines still feed. A key of another entity goes
        # only if no new line has it and no row left names it. Everything stays in this transaction: a
        # refused run (the brake) rolls back.
        gone: list[int] = []
        last = len(self.entities) - 1
        for i in (last, *range(last)):
            candidates = {row[i] for row in fed if row[i] is not None}
            if not candidates:
                gone.append(0)
                continue
            conn.exec_driver_sql("DELETE FROM dir_stage_cand")
            batch = Batches(conn, f"INSERT INTO dir_stage_cand (k) VALUES ({marks(conn, 1)})")
            for k in candidates:
                batch.add((k,))
            batch.flush()
            conn.exec_driver_sql(f"DELETE FROM dir_stage_cand WHERE k IN (SELECT k FROM dir_stage_{i})")
            if i != last:
                conn.exec_driver_sql(f"DELETE FROM dir_stage_cand WHERE EXISTS "
                                     f"(SELECT 1 FROM {table} t WHERE t.{refs[i]} = dir_stage_cand.k)")
            e = self.entities[i]
            result = conn.exec_driver_sql(f"DELETE FROM {e.table.name} WHERE {e.spec.key_column} IN "
                                          f"(SELECT k FROM dir_stage_cand)")
            gone.append(result.rowcount)
        for change, n in zip(self.report.tables, [*gone[1:], gone[0]], strict=True):
            change.deleted = n
        self._check_brake()
        self._apply_staged(conn, staged_raw_lines(conn))

    # -- every key compared in SQL (no usable line hashes) ---------------------------------------------

    def full_diff(self, conn: Connection) -> None:
        stage = self._create_stage(conn)
        self._extract(conn, "compare", "stage", stage)
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
            _drop_temporary(conn, name)
        for name in names:
            conn.exec_driver_sql(f"CREATE TEMPORARY TABLE {name} (k VARCHAR(320) PRIMARY KEY, h BIGINT NOT NULL, "
                                 f"line INTEGER NOT NULL){suffix}")
        conn.exec_driver_sql(f"CREATE TEMPORARY TABLE dir_stage_changed (line INTEGER NOT NULL, ent INTEGER NOT NULL, "
                             f"is_new INTEGER NOT NULL){suffix}")
        conn.exec_driver_sql(f"CREATE TEMPORARY TABLE dir_stage_removed (h BIGINT PRIMARY KEY){suffix}")
        conn.exec_driver_sql(f"CREATE TEMPORARY TABLE dir_stage_cand (k VARCHAR(320) PRIMARY KEY){suffix}")
        return [Batches(conn, f"INSERT INTO {n} (k, h, line) VALUES ({marks(conn, 3)}) "
                              f"ON CONFLICT (k) DO NOTHING") for n in names]

    def _apply_staged(self, conn: Connection, lines: Iterator[tuple[int, bytes]] | None = None) -> None:
        """Find the staged keys that are new or whose content changed; upsert them from their lines, read
        from `lines` (ascending line numbers, at least every staged line: by line) or else from the file
        again. The line entity's content hash is its line's: a row whose line changed in any way is
        written again, and so keeps the hash of its line.

        By line, a new line whose key has a row fed by a line still in the file repeats that key (two lines
        for one address): the first line keeps it, as in a full import."""
        last = len(self.entities) - 1
        for i, (e, change) in enumerate(zip(self.entities, self.report.tables, strict=True)):
            table, key = e.table.name, e.spec.key_column
            changed = "t.row_hash <> s.h"
            if i == last:  # and a row without its line (from FHIR, or from before line hashes) is written again
                repeated = " AND t.line_hash IN (SELECT h FROM dir_stage_removed)" if lines is not None else ""
                changed = f"(t.row_hash <> s.h{repeated}) OR t.line_hash IS NULL"
            conn.exec_driver_sql(
                f"INSERT INTO dir_stage_changed (line, ent, is_new) "
                f"SELECT s.line, {i}, CASE WHEN t.{key} IS NULL THEN 1 ELSE 0 END "
                f"FROM dir_stage_{i} s LEFT JOIN {table} t ON t.{key} = s.k "
                f"WHERE t.{key} IS NULL OR {changed}")
            counts: dict[int, int] = dict(conn.exec_driver_sql(
                f"SELECT is_new, count(*) FROM dir_stage_changed WHERE ent = {i} GROUP BY is_new").all())
            change.inserted = int(counts.get(1, 0))
            change.updated = int(counts.get(0, 0))
        if any(c.inserted or c.updated for c in self.report.tables):
            self._upsert_changed(conn, lines)

    def _upsert_changed(self, conn: Connection, lines: Iterator[tuple[int, bytes]] | None) -> None:
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
                h = line_hash(raw)
                for ent in pending[1]:
                    item = self.entities[ent].extract(fields, h)
                    if item is not None:
                        upserts[ent].add(item[2])
            for batch in upserts:
                batch.flush()
            self._done("apply")


def _collect(report: SyncReport, stats: ReadStats) -> None:
    report.rows_read = stats.rows
    report.malformed_count = stats.malformed_count
    report.malformed = list(stats.malformed)


def _drop_temporary(conn: Connection, name: str) -> None:
    """Drop a temporary table left on this pooled connection by a failed run (SQLite keeps them until the
    connection closes). Named in the temporary schema: on SQLite, a DROP IF EXISTS of an unqualified name
    that exists nowhere opens a read transaction on every attached database, the worker's scratch file
    included, which would then not show what the worker writes into it."""
    schema = "temp" if conn.dialect.name == "sqlite" else "pg_temp"
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {schema}.{name}")


def _has_line_hashes(conn: Connection, entity: BoundEntity) -> bool:
    """Whether every row of the line entity knows its line (not so after an upgrade, or after FHIR
    wrote mailboxes of its own): only then can a re-import go by line. Both answered by the index."""
    table = entity.table.name
    return bool(conn.exec_driver_sql(f"SELECT EXISTS (SELECT 1 FROM {table}) "
                                     f"AND NOT EXISTS (SELECT 1 FROM {table} WHERE line_hash IS NULL)").scalar_one())


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
