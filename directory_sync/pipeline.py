"""Per-line extraction of an extract, in this process or in a worker process that overlaps the writes.

A full import spends about as long parsing, hashing and building row tuples as SQLite spends
writing them. The machine has a second core: for a large file a worker process reads and
parses the file while this process only executes the inserts. The worker sends one chunk of
rows per CHUNK_LINES lines through a pipe (marshal: about 1 µs per row to rebuild here, where
parsing costs ten); the pipe's buffer bounds what is in flight to about two chunks, so memory
stays bounded. Malformed lines are counted with their numbers in the worker and handed back
with the last message. The same `LineExtractor` runs inline for small files and in tests.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import hashlib
import marshal
import multiprocessing
import os
import pickle
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from typing import Any

from directory_sync.errors import RowRejected
from directory_sync.extracts import ExtractReader, ExtractSource, ReadStats
from directory_sync.mapping import SPECS, BoundEntity

MAX_KEYS = 3
CHUNK_LINES = 5000
PARALLEL_MIN_BYTES = 16 * 1024 * 1024
"""Below this size a worker process costs more to start than it saves."""

Keys = tuple[str | None, ...]
Item = tuple[str, int, tuple[Any, ...]]
Plan = list[tuple[Any, Any, "SeenKeys | None"]]


@dataclass(slots=True)
class Chunk:
    """What CHUNK_LINES lines gave: per entity its rows, and the snapshot rows (line hash, keys...).

    Per entity, in mode "load" the insert parameters; in modes "stage" and "lines" (key, content hash,
    line number). In mode "lines", only the lines that are not in the last applied file, and their bytes
    in `raws` (line number, raw line).
    """

    bytes_read: int
    rows: list[list[tuple[Any, ...]]]
    snapshot: list[tuple[Any, ...]]
    raws: list[tuple[int, bytes]] = field(default_factory=list)


_BUCKET_BITS = 16
_BUCKET_SHIFT = 64 - _BUCKET_BITS
_BUCKET_OFFSET = 1 << (_BUCKET_BITS - 1)


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


def line_hash(raw: bytes) -> int:
    """64-bit hash of one raw line (without its line end): the unit a re-import compares."""
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big", signed=True)


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

    def has(self, key: str | None) -> bool:
        return key is not None and (key == self._last or key in self._keys)

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

    def plan(self, seen: list[SeenKeys] | None) -> Plan:
        """Per entity: its extractor, and its raw-key reader with the keys seen so far when it has them."""
        return [(e.extract, e.raw_key, seen[i]) if seen is not None and e.has_raw_key else (e.extract, None, None)
                for i, e in enumerate(self.entities)]

    def extract(self, line_no: int, fields: list[str], plan: Plan) -> tuple[list[Item | None], Keys] | None:
        """Per entity, its (key, hash, params), or None (no such entity in the line, or a key already seen in
        this run); and the line's keys padded to MAX_KEYS. None when the line is malformed (counted).
        Runs once per line of a national file: kept flat on purpose."""
        items: list[Item | None] = []
        keys: list[str | None] = []
        try:
            for extract, raw_key, known in plan:
                if known is not None:
                    key = raw_key(fields)
                    if known.has(key):
                        items.append(None)
                        keys.append(key)
                        continue
                item = extract(fields)
                items.append(item)
                keys.append(None if item is None else item[0])
        except RowRejected as exc:
            stats = self.reader.stats
            stats.rows -= 1
            stats.reject(line_no, exc.reason)
            return None
        for (_, _, known), item in zip(plan, items, strict=True):
            if known is not None and item is not None:
                known.add(item[0])  # only once the whole line is accepted
        keys.extend([None] * (MAX_KEYS - len(keys)))
        return items, tuple(keys)

    def chunks(self, mode: str, known: KnownLines | None = None) -> Iterator[Chunk]:
        """Every well-formed line of the extract, CHUNK_LINES lines at a time; keys seen once are not sent
        again. Malformed lines are counted (by the reader or `extract`) and skipped. Mode "lines": only
        the lines whose hash is not in `known` (the others are marked there and counted as read)."""
        reader = self.reader
        parse = reader.parse
        extract = self.extract
        stats = reader.stats
        by_line = mode == "lines"
        plan = self.plan(None if by_line else [SeenKeys() for _ in self.entities])
        staged = mode != "load"
        mark = known.mark if known is not None else None
        rows: list[list[tuple[Any, ...]]] = [[] for _ in self.entities]
        adds = [r.append for r in rows]
        snapshot: list[tuple[Any, ...]] = []
        snap = snapshot.append
        raws: list[tuple[int, bytes]] = []
        count = 0
        for line_no, raw in reader.lines():
            if mark is not None:
                count += 1
                if count >= CHUNK_LINES:
                    yield Chunk(stats.bytes_read, rows, snapshot, raws)
                    rows = [[] for _ in self.entities]
                    adds = [r.append for r in rows]
                    snapshot = []
                    snap = snapshot.append
                    raws = []
                    count = 0
                h = line_hash(raw)
                if mark(h):
                    stats.rows += 1
                    continue
                fields = parse(line_no, raw)
                if fields is None:
                    continue
                found = extract(line_no, fields, plan)
                if found is None:
                    continue
                for add, item in zip(adds, found[0]):
                    if item is not None:
                        add((item[0], item[1], line_no))
                snap((h, *found[1]))
                raws.append((line_no, raw))
                continue
            fields = parse(line_no, raw)
            if fields is None:
                continue
            found = extract(line_no, fields, plan)
            if found is None:
                continue
            for add, item in zip(adds, found[0]):
                if item is not None:
                    add((item[0], item[1], line_no) if staged else item[2])
            snap((line_hash(raw), *found[1]))
            count += 1
            if count >= CHUNK_LINES:
                yield Chunk(stats.bytes_read, rows, snapshot)
                rows = [[] for _ in self.entities]
                adds = [r.append for r in rows]
                snapshot = []
                snap = snapshot.append
                count = 0
        yield Chunk(stats.bytes_read, rows, snapshot, raws)


def extracted_chunks(
    reader: ExtractReader, entities: list[BoundEntity], mode: str, *, parallel: bool | None = None,
    known: KnownLines | None = None,
) -> Iterator[Chunk]:
    """The chunks of `LineExtractor.chunks`, computed here or (`parallel`, by default for a file of
    PARALLEL_MIN_BYTES or more when this process may run on two CPUs or more) in a worker process; either way `reader.stats` ends with the counts
    and `known.present` with the lines found again."""
    if parallel is None:
        parallel = reader.source.size >= PARALLEL_MIN_BYTES and len(os.sched_getaffinity(0)) >= 2
    if not parallel:
        yield from LineExtractor(reader, entities).chunks(mode, known)
        return
    # fork: the worker starts at once, imports nothing and runs no main module again; it only reads
    # the file and writes the pipe (no lock, connection or thread of this process is used there).
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    # `known` reaches the worker by the fork itself (copy on write), not through the pipe.
    worker = ctx.Process(target=_work, args=(reader.source, mode, known, send), name="directory-extract",
                         daemon=True)
    worker.start()
    send.close()
    try:
        while True:
            try:
                message = receive.recv_bytes()
            except EOFError:
                raise RuntimeError(f"the extract worker ended without an answer (exit code {worker.exitcode})") \
                    from None
            tag, body = message[:1], message[1:]
            if tag == b"C":
                bytes_read, rows, snapshot, raws = marshal.loads(body)
                yield Chunk(bytes_read, rows, snapshot, raws)
            elif tag == b"S":
                stats: ReadStats
                stats, present = pickle.loads(body)
                if known is not None:
                    known.present = present
                reader.stats.rows = stats.rows
                reader.stats.malformed_count = stats.malformed_count
                reader.stats.malformed = stats.malformed
                reader.stats.bytes_read = stats.bytes_read
                return
            else:
                raise pickle.loads(body)  # the worker's own exception (a damaged ZIP, ...)
    finally:
        receive.close()
        worker.join(timeout=5)
        if worker.is_alive():
            worker.terminate()
            worker.join()


def _work(source: ExtractSource, mode: str, known: KnownLines | None, pipe: Pipe) -> None:
    """The worker process: read and parse the whole extract, send the chunks, then the counts."""
    send: Callable[[bytes], None] = pipe.send_bytes
    try:
        with gc_paused(), ExtractReader(source) as reader:
            entities = [spec.bind(reader) for spec in SPECS[reader.kind]]
            for chunk in LineExtractor(reader, entities).chunks(mode, known):
                send(b"C" + marshal.dumps((chunk.bytes_read, chunk.rows, chunk.snapshot, chunk.raws)))
            send(b"S" + pickle.dumps((reader.stats, None if known is None else known.present)))
    except BrokenPipeError:
        pass  # the importing process gave up (its own error): nothing to tell it
    except Exception as exc:  # noqa: BLE001 - handed to the importing process, which raises it
        send(b"E" + _picklable(exc))
    finally:
        pipe.close()


def _picklable(exc: Exception) -> bytes:
    """The exception pickled, or a RuntimeError saying what it was when it cannot be rebuilt."""
    try:
        body = pickle.dumps(exc)
        pickle.loads(body)
    except Exception:  # noqa: BLE001 - any type that cannot make the round trip is sent as text
        body = pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
    return body
