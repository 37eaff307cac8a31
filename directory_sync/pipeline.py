"""Per-line extraction of an extract: in this process, or split with a worker process.

A full import spends about as long parsing, hashing and building row tuples as SQLite spends
writing them, and the machine has a second core. A large file is cut in two at a line
boundary (`split_point`): this process reads the first part while a forked worker reads the
second. The worker writes what it finds into scratch SQLite files of its own (`sides`, one
segment of its part after the other): the rows to insert (mode "load") or to stage (modes
"stage" and "lines"), and in mode "lines" the new lines themselves. The sync copies each
segment into the directory inside its transaction, after this process's own rows (so that the
first line of the file still wins a repeated key, sync.py) and as soon as the worker says it is
complete (`segments()`): the copy of the first segments runs while the worker reads the last.
No row crosses a pipe: the pipe only carries the worker's progress, its finished segments and,
at the end, its counts (malformed lines are numbered from the worker's first line:
`Extraction.finish` renumbers them). The same `LineExtractor` runs alone for small files.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import hashlib
import itertools
import multiprocessing
import os
import pickle
import sqlite3
import struct
import urllib.parse
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

from directory_sync.errors import RowRejected
from directory_sync.extracts import (
    MAX_REPORTED_MALFORMED,
    ExtractReader,
    ExtractSource,
    MalformedRow,
    ReadStats,
)
from directory_sync.mapping import SPECS, BoundEntity

CHUNK_LINES = 500
PARALLEL_MIN_BYTES = 16 * 1024 * 1024
"""Below this size a worker process costs more to start than it saves."""
WORKER_SHARE = {"load": 0.6, "stage": 0.5, "lines": 0.5}
"""The share of the file's bytes the worker reads, per mode. Loading, this process also writes its rows into
the directory's indexed tables, then copies the worker's: the worker takes more of the file."""
SEGMENTS = 6
"""Scratch files the worker fills one after the other: the more, the less copying is left once it ends (SQLite
attaches at most 10 databases to a connection)."""
SIDE_PAGE_SIZE = 65536
"""The page size of the scratch files, SQLite's largest: the worker appends rows and never updates one, so the fewer
pages to fill and write the better (about 12 % less CPU writing them than with 4096, 2 % less than with 16384)."""
STAGE_COLUMNS = ("k", "h", "line")
"""A staged row: key, content hash, line number."""

Item = tuple[str, int, tuple[Any, ...]]


@dataclass(slots=True)
class Chunk:
    """What CHUNK_LINES lines gave: per entity, its rows.

    In mode "load", the insert parameters; in modes "stage" and "lines", (key, content hash, line
    number). In mode "lines", only the lines that are not in the last applied file, and their bytes
    in `raws` (line number, raw line).
    """

    bytes_read: int
    rows: list[list[tuple[Any, ...]]]
    raws: list[tuple[int, bytes]] = field(default_factory=list)


_BUCKET_BITS = 16
_BUCKET_SHIFT = 64 - _BUCKET_BITS
_BUCKET_OFFSET = 1 << (_BUCKET_BITS - 1)
_FLIPPED = bytes.maketrans(b"\x00\x01", b"\x01\x00")


class KnownLines:
    """The sorted line hashes of the last applied file, and which of them the new file still has.

    Looked up per 16-bit bucket (where the hashes with each value of their top 16 bits start):
    a look-up bisects some tens of entries instead of millions.
    """

    def __init__(self, hashes: array[int]) -> None:
        self.hashes = hashes
        self.present = bytearray(len(hashes))
        self._starts = array("q", [bisect.bisect_left(hashes, (b - _BUCKET_OFFSET) << _BUCKET_SHIFT)
                                   for b in range((1 << _BUCKET_BITS) + 1)])

    def absent(self) -> Iterator[int]:
        """The hashes of the last file's lines not marked present, in C (there are millions of flags)."""
        return itertools.compress(self.hashes, self.present.translate(_FLIPPED))

    def add_marks(self, present: bytearray) -> None:
        """Count as present too what another reader marked in its copy of `present` (the worker, by the fork):
        the flags are 0 or 1, so an OR of the two arrays as integers, in C."""
        ours, theirs = int.from_bytes(self.present, "little"), int.from_bytes(present, "little")
        self.present = bytearray((ours | theirs).to_bytes(len(self.present), "little"))

    def mark(self, h: int) -> bool:
        """Whether a line of hash `h` was in the last file (then marked as still present)."""
        hashes, starts = self.hashes, self._starts
        b = (h >> _BUCKET_SHIFT) + _BUCKET_OFFSET
        i = bisect.bisect_left(hashes, h, starts[b], starts[b + 1])
        n = len(hashes)
        if i >= n or hashes[i] != h:
            return False
        present = self.present
        while i < n and hashes[i] == h:
            present[i] = 1
            i += 1
        return True


_LINE_HASH = hashlib.blake2b(digest_size=8)
"""Copied for each line: a copy costs less than a new hash object, whose parameters are parsed each time."""
_SIGNED = struct.Struct(">q").unpack


def line_hash(raw: bytes) -> int:
    """64-bit hash of one raw line (without its line end): the unit a re-import compares. Its BLAKE2b-64
    digest, read as a signed big-endian integer (a BIGINT column)."""
    digest = _LINE_HASH.copy()
    digest.update(raw)
    value: int = _SIGNED(digest.digest())[0]
    return value


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic collector off while millions of short-lived tuples stream through (it would scan
    every batch again and again); the rows make no cycles, so nothing is left for it afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class SeenKeys:
    """Keys already sent in this run, so a structure shared by many lines is extracted once.

    A key that arrives above every key before it cannot have been seen, and while keys keep
    arriving in order (practitioners: the file is grouped by person) a repeat is the previous
    key: such keys are not kept, so the set holds only keys that arrived out of order (the
    structures). Bounded: past MAX keys it forgets everything and starts again. ON CONFLICT DO
    NOTHING in the database stays the real guarantee (first line wins); this only saves work.
    """

    MAX = 600_000

    def __init__(self) -> None:
        self._keys: set[str] = set()
        self._last: str | None = None
        self._top: str = ""

    def has(self, key: str) -> bool:
        return key == self._last or key in self._keys

    def add(self, key: str) -> None:
        self._last = key
        if key > self._top:
            self._top = key
            return
        keys = self._keys
        if len(keys) >= self.MAX:
            keys.clear()
        keys.add(key)


class LineExtractor:
    """What each line of one extract feeds, for the entities bound to its reader."""

    def __init__(self, reader: ExtractReader, entities: list[BoundEntity]) -> None:
        self.reader = reader
        self.entities = entities

    def chunks(self, mode: str, known: KnownLines | None = None, stop: int | None = None) -> Iterator[Chunk]:
        """Every well-formed line of the extract (that starts before byte `stop`), CHUNK_LINES lines at a
        time; keys seen once are not sent again (except by line: a new line is wanted whole). Malformed
        lines are counted (by the reader, or here when an entity rejects them) and skipped. Mode "lines":
        only the lines whose hash is not in `known` (the others are marked there and counted as read).

        Runs once per line of a national file (2 million): kept flat on purpose, with everything it calls
        per line bound to a local name."""
        reader = self.reader
        parse = reader.parse
        stats = reader.stats
        reject = stats.reject
        by_line = mode == "lines"
        staged = mode != "load"
        seen = [SeenKeys() if e.key_position is not None and not by_line else None for e in self.entities]
        # Per entity: its extractor; and when its keys are tracked, where its key stands and the tracker.
        plan = [(e.extract, e.key_position or 0, s.has if s is not None else None) for e, s in zip(self.entities, seen)]
        add_keys = [s.add if s is not None else None for s in seen]
        mark = known.mark if known is not None else None
        new_hash, signed = _LINE_HASH.copy, _SIGNED
        rows: list[list[tuple[Any, ...]]] = [[] for _ in self.entities]
        adds = [r.append for r in rows]
        raws: list[tuple[int, bytes]] = []
        count = 0
        for line_no, raw in reader.lines(stop=stop):
            digest = new_hash()  # line_hash(raw), inlined
            digest.update(raw)
            h = signed(digest.digest())[0]
            if mark is not None:
                count += 1
                if count >= CHUNK_LINES:
                    yield Chunk(stats.bytes_read, rows, raws)
                    rows = [[] for _ in self.entities]
                    adds = [r.append for r in rows]
                    raws = []
                    count = 0
                if mark(h):
                    stats.rows += 1
                    continue
            fields = parse(line_no, raw)
            if fields is None:
                continue
            try:
                items = [None if has is not None and has(fields[position].strip()) else extract(fields, h)
                         for extract, position, has in plan]
            except RowRejected as exc:
                stats.rows -= 1
                reject(line_no, exc.reason)
                continue
            # The whole line is accepted: its rows, and the keys they bring.
            for item, add, add_key in zip(items, adds, add_keys):
                if item is not None:
                    add(item[2] if not staged else (item[0], item[1], line_no))
                    if add_key is not None:
                        add_key(item[0])
            if by_line:
                raws.append((line_no, raw))
                continue
            count += 1
            if count >= CHUNK_LINES:
                yield Chunk(stats.bytes_read, rows)
                rows = [[] for _ in self.entities]
                adds = [r.append for r in rows]
                count = 0
        yield Chunk(stats.bytes_read, rows, raws)


def wants_worker(reader: ExtractReader, parallel: bool | None) -> bool:
    """Whether to split the file with a worker: by default for a file of PARALLEL_MIN_BYTES or more when this
    process may run on two CPUs or more."""
    if parallel is None:
        return reader.source.size >= PARALLEL_MIN_BYTES and len(os.sched_getaffinity(0)) >= 2
    return parallel


def split_point(reader: ExtractReader, mode: str) -> int:
    """Where the worker's part starts (a byte offset past the header) for `mode`: see WORKER_SHARE."""
    start = reader.stats.bytes_read
    return start + int((reader.source.size - start) * (1 - WORKER_SHARE[mode]))


def side_tables(entities: list[BoundEntity], mode: str) -> list[tuple[str, tuple[str, ...]]]:
    """The tables of each scratch file of the worker: per entity its rows (`load_<i>`: the insert columns, an
    empty field already NULL; `stage_<i>`: STAGE_COLUMNS), then the new lines (`raws`: line, raw bytes)."""
    if mode == "load":
        return [(f"load_{i}", e.spec.columns) for i, e in enumerate(entities)]
    return [*((f"stage_{i}", STAGE_COLUMNS) for i in range(len(entities))), ("raws", ("line", "raw"))]


def prepare_sides(sides: list[Path], entities: list[BoundEntity]) -> None:
    """Create the tables of every mode in each scratch file, before the importing process attaches them and
    the worker is forked. Their schema then never changes while the worker writes: a schema that changed
    would make SQLite read again every attached file, one the worker is writing included."""
    tables = dict(side_tables(entities, "load") + side_tables(entities, "stage"))
    for side in sides:
        with contextlib.closing(sqlite3.connect(side, isolation_level=None)) as db:
            db.execute(f"PRAGMA page_size={SIDE_PAGE_SIZE}")
            for name, columns in tables.items():
                db.execute(f"CREATE TABLE {name} ({', '.join(columns)})")


def _side_inserts(entities: list[BoundEntity], mode: str) -> list[str]:
    """The inserts into `side_tables`: loading, the fields' '' become NULL here, in the worker, rather than
    in the copy into the directory, which the importing process runs."""
    values = [e.spec.values_sql() for e in entities] if mode == "load" else []
    return [f"INSERT INTO {name} VALUES ({values[i] if i < len(values) else ', '.join('?' * len(columns))})"
            for i, (name, columns) in enumerate(side_tables(entities, mode))]


class Extraction:
    """The lines of one extract in `mode`: all read here, or (`sides`, scratch SQLite files with their tables and
    no rows, see `prepare_sides`, and `split`) the part before `split` read here and the rest by a worker into
    `sides`, one segment after the other.

    `start()` forks the worker; `chunks()` gives this process's rows; then `segments()` the worker's segments
    as they are complete, and `offset` says how to number their lines; then `finish()` adds the worker's
    counts; `close()` stops a worker still running (an error here)."""

    def __init__(self, reader: ExtractReader, entities: list[BoundEntity], mode: str, *,
                 known: KnownLines | None = None, sides: list[Path] | None = None, split: int | None = None) -> None:
        self.reader = reader
        self.entities = entities
        self.mode = mode
        self.known = known
        self.sides = sides if split is not None else None
        self.split = split
        self._worker: Any = None
        self._receive: Pipe | None = None
        self._worker_bytes = 0
        self._complete = 0
        self._result: tuple[ReadStats, bytearray | None] | None = None

    def start(self) -> None:
        """Fork the worker, when the file is split."""
        if self.sides is None:
            return
        # fork: the worker starts at once, imports nothing and runs no main module again; it only reads
        # the file and writes its scratch files and the pipe (no lock, connection or thread of this
        # process is used there). `known` reaches it by the fork itself (copy on write).
        ctx = multiprocessing.get_context("fork")
        self._receive, send = ctx.Pipe(duplex=False)
        self._worker = ctx.Process(target=_work, name="directory-extract", daemon=True,
                                   args=(self.reader.source, self.mode, self.known, self.sides, self.split, send))
        self._worker.start()
        send.close()

    def chunks(self) -> Iterator[Chunk]:
        """This process's chunks; `bytes_read` counts the worker's progress too."""
        extractor = LineExtractor(self.reader, self.entities)
        if self._receive is None:
            yield from extractor.chunks(self.mode, self.known)
            return
        for chunk in extractor.chunks(self.mode, self.known, stop=self.split):
            while self._result is None and self._receive.poll():
                self._take(self._receive.recv_bytes())
            chunk.bytes_read += self._worker_bytes
            yield chunk

    @property
    def offset(self) -> int:
        """What to add to the line numbers in the worker's scratch files (once `chunks()` is done)."""
        return self.reader.line_no

    def segments(self, progress: Callable[[int], None] | None = None) -> Iterator[Path]:
        """The worker's scratch files in order, each once it is complete (none without a worker), reporting
        the bytes done in all while waiting."""
        if self.sides is None or self._receive is None:
            return
        here = self.reader.stats.bytes_read
        for i, side in enumerate(self.sides):
            while i >= self._complete:
                self._take(self._receive_message())
                if progress is not None:
                    progress(here + self._worker_bytes)
            yield side

    def finish(self) -> None:
        """Wait for the worker's counts (after its last segment); add them to the reader's, its marks to
        `known`."""
        if self._receive is None:
            return
        stats = self.reader.stats
        while self._result is None:
            self._take(self._receive_message())
        theirs, present = self._result
        offset = self.offset
        stats.rows += theirs.rows
        stats.malformed_count += theirs.malformed_count
        room = MAX_REPORTED_MALFORMED - len(stats.malformed)
        stats.malformed += [MalformedRow(m.line + offset, m.reason) for m in theirs.malformed[:max(room, 0)]]
        stats.bytes_read += theirs.bytes_read
        if self.known is not None and present is not None:
            self.known.add_marks(present)
        self.close()

    def _receive_message(self) -> bytes:
        assert self._receive is not None
        try:
            return self._receive.recv_bytes()
        except EOFError:
            self._worker.join()
            raise RuntimeError(f"the extract worker ended without an answer (exit code "
                               f"{self._worker.exitcode})") from None

    def _take(self, message: bytes) -> None:
        tag, body = message[:1], message[1:]
        if tag == b"P":
            self._worker_bytes = int.from_bytes(body, "big")
        elif tag == b"D":
            self._complete += 1
        elif tag == b"S":
            self._result = pickle.loads(body)
        else:
            raise pickle.loads(body)  # the worker's own exception (a damaged ZIP, ...)

    def close(self) -> None:
        """Release the pipe and the worker; a worker that has not answered (an error here) is stopped."""
        if self._receive is not None:
            self._receive.close()
        if self._worker is not None:
            if self._result is None:
                self._worker.terminate()
            self._worker.join()
            self._worker = None


def _work(source: ExtractSource, mode: str, known: KnownLines | None, sides: list[Path], split: int,
          pipe: Pipe) -> None:
    """The worker process: read the extract from `split` on into the scratch files, an equal share of its
    part into each in turn, saying when each is complete; then send the counts."""
    send: Callable[[bytes], None] = pipe.send_bytes
    try:
        with gc_paused(), ExtractReader(source) as reader:
            entities = [spec.bind(reader) for spec in SPECS[reader.kind]]
            inserts = _side_inserts(entities, mode)
            reader.skip_to(split)
            base = reader.stats.bytes_read  # the importing process reads up to here
            last = len(sides) - 1
            ends = [base + (reader.source.size - base) * (i + 1) // len(sides) for i in range(last)]
            chunks = LineExtractor(reader, entities).chunks(mode, known)
            for i, side in enumerate(sides):
                with _segment(side, inserts) as write:
                    for chunk in chunks:
                        write(chunk)
                        send(b"P" + (reader.stats.bytes_read - base).to_bytes(8, "big"))
                        if i < last and reader.stats.bytes_read >= ends[i]:
                            break
                send(b"D")
            reader.stats.bytes_read -= base
            send(b"S" + pickle.dumps((reader.stats, None if known is None else known.present)))
    except BrokenPipeError:
        pass  # the importing process gave up (its own error): nothing to tell it
    except Exception as exc:  # noqa: BLE001 - handed to the importing process, which raises it
        send(b"E" + _picklable(exc))
    finally:
        pipe.close()


@contextlib.contextmanager
def _segment(side: Path, inserts: list[str]) -> Iterator[Callable[[Chunk], None]]:
    """One scratch file of the worker (its tables made by `prepare_sides`): `write(chunk)` adds a chunk's rows
    (the last insert takes the new lines); complete and closed on leaving."""
    # Without locks (vfs unix-none): this process inherited, by the fork, SQLite's record of the locks the
    # importing process holds on these very files (attached there), and would wait for them; the importing
    # process reads a file only once told that it is complete.
    uri = f"file:{urllib.parse.quote(str(side))}?vfs=unix-none"
    with contextlib.closing(sqlite3.connect(uri, uri=True, isolation_level=None)) as db:
        # A scratch file: nothing to recover after a crash, so no journal and no fsync.
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("BEGIN")

        def write(chunk: Chunk) -> None:
            for sql, rows in zip(inserts, chunk.rows):
                if rows:
                    db.executemany(sql, rows)
            if chunk.raws:
                db.executemany(inserts[-1], chunk.raws)

        yield write
        db.execute("COMMIT")


def _picklable(exc: Exception) -> bytes:
    """The exception pickled, or a RuntimeError saying what it was when it cannot be rebuilt."""
    try:
        body = pickle.dumps(exc)
        pickle.loads(body)
    except Exception:  # noqa: BLE001 - any type that cannot make the round trip is sent as text
        body = pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
    return body
