"""The extract parsed in a worker process (large files) gives exactly what the inline parse gives.

These tests force the worker on small files (`parallel=True`); the other sync tests run inline.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
import time
from array import array
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from directory_sync import pipeline, sync
from directory_sync.errors import ArchiveRefused
from directory_sync.mapping import content_digest, hash64
from directory_sync.models import Activity, Mailbox, Practitioner, Structure, SyncRun
from directory_sync.pipeline import CHUNK_LINES
from directory_sync.sync import SCRATCH_PREFIX, import_paths
from directory_sync.synthetic import mssante_lines, personne_activite_lines, write_extract

MODELS = (Practitioner, Structure, Activity, Mailbox)


def _dump(engine: Engine) -> dict[str, list[tuple[object, ...]]]:
    out = {}
    with engine.connect() as conn:
        for model in MODELS:
            table = model.__table__  # type: ignore[attr-defined]
            out[model.__name__] = [tuple(r) for r in conn.execute(
                select(table).order_by(*table.primary_key.columns)).all()]
    return out


def _wipe(engine: Engine) -> None:
    with engine.begin() as conn:
        for model in MODELS:
            conn.execute(model.__table__.delete())  # type: ignore[attr-defined]


def _damaged(lines: list[str]) -> list[str]:
    """Four malformed lines (lines[0] is the header): one past the first chunk, and one near the end, in
    the worker's part, whose line numbers it counts from its own first line."""
    lines = list(lines)
    lines[10] = lines[10][:40] + "\n"  # cut short
    lines[200] = lines[200].rstrip("\n") + "|extra|\n"
    lines[CHUNK_LINES + 7] = "\n".join([lines[CHUNK_LINES + 7].rstrip("\n"), "only|three|fields"]) + "\n"
    lines[-5] = lines[-5][:50] + "\n"
    return lines


@pytest.mark.parametrize("make", [personne_activite_lines, mssante_lines], ids=["personne_activite", "mssante"])
def test_the_worker_loads_what_the_inline_parse_loads(engine: Engine, tmp_path: Path, make) -> None:  # type: ignore[no-untyped-def]
    path = write_extract(tmp_path / "x.txt", _damaged(list(make(CHUNK_LINES + 1500))))
    (inline,) = import_paths(engine, [path], parallel=False)
    expected = _dump(engine)
    _wipe(engine)
    progress: list[tuple[str, int, int]] = []
    (worker,) = import_paths(engine, [path], parallel=True, progress=lambda *p: progress.append(p))
    assert _dump(engine) == expected
    assert (worker.rows_read, worker.malformed_count, worker.malformed) == \
           (inline.rows_read, inline.malformed_count, inline.malformed)
    assert worker.malformed_count >= 4
    assert CHUNK_LINES + 9 in [m.line for m in worker.malformed]  # the line added past the first chunk
    assert worker.malformed[-1].line == CHUNK_LINES + 1500 - 2  # in the worker's part, numbered in the file
    assert [(t.table, t.inserted) for t in worker.tables] == [(t.table, t.inserted) for t in inline.tables]
    assert progress[-1][1] == progress[-1][2] == path.stat().st_size
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(progress))  # both parts counted once
    # The line hashes the worker wrote serve the next re-import by line: the same file again changes nothing.
    (again,) = import_paths(engine, [path], parallel=True)
    assert again.method == "lines" and not again.changed


def test_a_full_compare_in_the_worker_ends_where_a_fresh_import_would(engine: Engine, tmp_path: Path) -> None:
    old = write_extract(tmp_path / "old.txt", personne_activite_lines(CHUNK_LINES + 100))
    new = write_extract(tmp_path / "new.txt",
                        personne_activite_lines(CHUNK_LINES + 100, changed_share=0.05, removed_share=0.02))
    import_paths(engine, [old], parallel=True)
    (report,) = import_paths(engine, [new], parallel=True, full_compare=True)
    assert report.method == "compare" and report.changed
    synced = _dump(engine)
    _wipe(engine)
    import_paths(engine, [new], parallel=False)
    assert _dump(engine) == synced


def test_an_archive_damaged_midway_fails_in_the_worker_and_changes_nothing(engine: Engine, tmp_path: Path) -> None:
    import_paths(engine, [write_extract(tmp_path / "a.txt", mssante_lines(100))])
    before = _dump(engine)
    member = "Extraction_Correspondance_MSSante.txt"
    path = write_extract(tmp_path / "bad.zip", mssante_lines(60_000), zipped=True, member=member)
    data = bytearray(path.read_bytes())
    middle = len(data) * 3 // 4  # past what the importing process reads for the header
    data[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveRefused, match=member):
        import_paths(engine, [path], parallel=True, force=True)
    assert _dump(engine) == before
    with engine.connect() as conn:
        assert conn.execute(select(SyncRun.status).order_by(SyncRun.id.desc()).limit(1)).scalar_one() == "failed"


@pytest.mark.parametrize("make", [personne_activite_lines, mssante_lines], ids=["personne_activite", "mssante"])
def test_a_reimport_by_line_in_the_worker_does_what_the_inline_one_does(  # type: ignore[no-untyped-def]
    engine: Engine, tmp_path: Path, make,
) -> None:
    old = write_extract(tmp_path / "old.txt", make(CHUNK_LINES + 800))
    new_lines = list(make(CHUNK_LINES + 800, changed_share=0.03, removed_share=0.01))
    new_lines[CHUNK_LINES + 50] = new_lines[CHUNK_LINES + 50][:30] + "\n"  # a new line, and malformed
    new_lines[-3] = new_lines[-3][:30] + "\n"  # another, in the worker's part
    new = write_extract(tmp_path / "new.txt", new_lines)
    results = []
    for parallel in (False, True):
        _wipe(engine)
        import_paths(engine, [old], parallel=parallel)
        (report,) = import_paths(engine, [new], parallel=parallel)
        assert report.method == "lines" and report.changed
        results.append((_dump(engine), report.rows_read, report.malformed,
                        [(t.table, t.inserted, t.updated, t.deleted) for t in report.tables]))
    assert results[0] == results[1]
    assert [m.line for m in results[1][2]] == [CHUNK_LINES + 51, len(new_lines) - 2]
    assert sum(t[3] for t in results[1][3]) > 0  # the removed lines deleted something


def test_a_zipped_extract_split_with_the_worker_loads_what_the_plain_file_loads(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker inflates the ZIP member up to its part (a member cannot seek); its scratch file is private
    while it exists and gone afterwards; one that a killed import left a day ago is removed, a recent one
    (another import running) is not."""
    lines = list(personne_activite_lines(3 * CHUNK_LINES))
    import_paths(engine, [write_extract(tmp_path / "plain.txt", lines)], parallel=False)
    expected = _dump(engine)
    _wipe(engine)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    if engine.dialect.name == "sqlite":  # beside the database
        scratch = Path(engine.url.database or "").resolve().parent
    else:
        monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    stale, running = scratch / f"{SCRATCH_PREFIX}old.db", scratch / f"{SCRATCH_PREFIX}running.db"
    stale.write_bytes(b"")
    running.write_bytes(b"")
    os.utime(stale, (time.time() - 2 * 86_400,) * 2)
    before = set(scratch.iterdir()) - {stale}
    modes: list[int] = []
    monkeypatch.setattr(pipeline.Extraction, "finish", _watching(pipeline.Extraction.finish, modes))
    member = "PS_LibreAcces_Personne_activite.txt"
    (report,) = import_paths(engine, [write_extract(tmp_path / "pa.zip", lines, zipped=True, member=member)],
                             parallel=True)
    assert report.method == "load" and report.rows_read == 3 * CHUNK_LINES
    assert _dump(engine) == expected
    assert modes == [0o600] * pipeline.SEGMENTS
    assert set(scratch.iterdir()) == before


def _watching(finish, modes: list[int]):  # type: ignore[no-untyped-def]
    def watched(self):  # type: ignore[no-untyped-def]
        modes.extend(side.stat().st_mode & 0o777 for side in self.sides)
        return finish(self)
    return watched


def _reading_ahead(monkeypatch: pytest.MonkeyPatch, then=None):  # type: ignore[no-untyped-def]
    """Record the sources whose sync took an extraction read ahead; `then()` runs as it takes it (the sync
    before is committed, this one has not begun)."""
    taken: list[str] = []
    take = sync._Ahead.take

    def watched(self, source):  # type: ignore[no-untyped-def]
        early = take(self, source)
        if early is not None:
            taken.append(source.name)
            if then is not None:
                then()
        return early

    monkeypatch.setattr(sync._Ahead, "take", watched)
    return taken


def test_the_next_extract_read_ahead_into_empty_tables_loads_what_it_loads_alone(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the first file's indexes are built, a worker reads the whole second one (other tables, empty);
    the second sync takes its scratch files: same directory, same counts and line numbers of the malformed
    lines. Neither a second file of the same kind (the tables the first one fills) nor one larger than
    AHEAD_MAX_SHARE of the first is read ahead."""
    pa = write_extract(tmp_path / "pa.txt", _damaged(list(personne_activite_lines(8 * CHUNK_LINES))))
    mss = write_extract(tmp_path / "mss.txt", _damaged(list(mssante_lines(CHUNK_LINES + 600))))
    assert mss.stat().st_size < sync.AHEAD_MAX_SHARE * pa.stat().st_size
    alone = [import_paths(engine, [path], parallel=False)[0] for path in (pa, mss)]
    expected = _dump(engine)
    _wipe(engine)
    taken = _reading_ahead(monkeypatch)
    reports = import_paths(engine, [pa, mss], parallel=True)
    assert taken == [str(mss)]
    assert _dump(engine) == expected
    assert [(r.method, r.rows_read, r.malformed) for r in reports] == [
        (r.method, r.rows_read, r.malformed) for r in alone]
    _wipe(engine)
    taken.clear()
    import_paths(engine, [pa, pa], parallel=True)
    assert taken == []
    assert _dump(engine)["Activity"] == expected["Activity"]
    _wipe(engine)
    import_paths(engine, [mss, pa], parallel=True)
    assert taken == []
    assert _dump(engine) == expected


def test_an_extract_read_ahead_whose_tables_were_filled_meanwhile_is_read_again(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another writer fills the second file's tables after its read ahead began (between the two syncs): its
    sync compares instead of loading, without the worker's scratch files (stopped), and ends with the file's
    content."""
    pa = write_extract(tmp_path / "pa.txt", list(personne_activite_lines(8 * CHUNK_LINES)))
    mss = write_extract(tmp_path / "mss.txt", list(mssante_lines(CHUNK_LINES + 300)))
    import_paths(engine, [pa, mss], parallel=False)
    expected = _dump(engine)
    _wipe(engine)

    def another_writer() -> None:
        with engine.begin() as conn:
            conn.execute(Mailbox.__table__.insert().values(  # type: ignore[attr-defined]
                address_key="autre@exemple.mssante.fr", address="autre@exemple.mssante.fr", mailbox_type="ORG",
                liste_rouge=False, source="extract", row_hash=0))

    taken = _reading_ahead(monkeypatch, another_writer)
    reports = import_paths(engine, [pa, mss], parallel=True, force=True)
    assert taken == [str(mss)]
    assert reports[1].method == "compare"
    assert _dump(engine) == expected


def test_the_next_extract_read_ahead_by_line_reimports_what_it_reimports_alone(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A daily re-import of both files: while the first file's changes are applied, a worker compares the whole
    second one with the line hashes its tables have; the second sync takes its scratch files and ends where it
    ends alone, with the same counts and malformed lines. Another writer that changes those hashes in between
    (a mailbox more) makes the second sync read its file again, and it still ends with the file's content."""
    pa = write_extract(tmp_path / "pa.txt", list(personne_activite_lines(8 * CHUNK_LINES)))
    mss = write_extract(tmp_path / "mss.txt", list(mssante_lines(CHUNK_LINES + 600)))
    pa2 = write_extract(tmp_path / "pa2.txt", list(personne_activite_lines(8 * CHUNK_LINES, changed_share=0.05)))
    mss2 = write_extract(tmp_path / "mss2.txt", _damaged(list(mssante_lines(CHUNK_LINES + 600, changed_share=0.05))))
    import_paths(engine, [pa, mss], parallel=False)
    alone = [import_paths(engine, [path], parallel=False)[0] for path in (pa2, mss2)]
    expected = _dump(engine)
    _wipe(engine)
    import_paths(engine, [pa, mss], parallel=False)
    taken = _reading_ahead(monkeypatch)
    reports = import_paths(engine, [pa2, mss2], parallel=True)
    assert taken == [str(mss2)]
    assert _dump(engine) == expected
    assert [(r.method, r.rows_read, r.malformed, [(t.inserted, t.updated, t.deleted) for t in r.tables])
            for r in reports] == [(r.method, r.rows_read, r.malformed,
                                   [(t.inserted, t.updated, t.deleted) for t in r.tables]) for r in alone]

    def another_writer() -> None:
        with engine.begin() as conn:
            conn.execute(Mailbox.__table__.insert().values(  # type: ignore[attr-defined]
                address_key="autre@exemple.mssante.fr", address="autre@exemple.mssante.fr", mailbox_type="ORG",
                liste_rouge=False, source="extract", row_hash=0, line_hash=1))

    _wipe(engine)
    import_paths(engine, [pa, mss], parallel=False)
    taken = _reading_ahead(monkeypatch, another_writer)
    reports = import_paths(engine, [pa2, mss2], parallel=True, force=True)
    assert taken == [str(mss2)]
    assert reports[1].method == "lines"
    assert _dump(engine) == expected


def test_known_lines_say_which_lines_are_gone_once_both_readers_marked_theirs() -> None:
    """A re-import's two readers each mark the last file's lines they find (the worker in its copy, by the
    fork); the lines neither found are gone, a repeated line counting once for all its copies."""
    hashes = array("q", sorted([-(1 << 63), -5, -5, 0, 7, 7, 7, 42, (1 << 63) - 1]))
    ours, theirs = pipeline.KnownLines(hashes), pipeline.KnownLines(hashes)
    assert ours.mark(-5) and ours.mark(42) and not ours.mark(8)
    assert theirs.mark(7) and theirs.mark(-(1 << 63))
    ours.add_marks(theirs.present)
    assert list(ours.absent()) == [0, (1 << 63) - 1]
    assert list(pipeline.KnownLines(array("q")).absent()) == []


@pytest.mark.parametrize("raw", [b"", "8|10000000017|810000000017|MME|LAMBERT|LÉA|".encode(), bytes(range(256)) * 5])
def test_the_hashes_kept_on_rows_stay_the_blake2b_values_already_stored(raw: bytes) -> None:
    """A re-import compares the hashes of a new file with those an earlier import stored: the line hash is
    BLAKE2b-64 as a signed big-endian integer, the row hash the first 8 bytes of BLAKE2b-128 of the fields
    joined by US, however they are computed."""
    assert pipeline.line_hash(raw) == int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big", signed=True)
    values = (raw.decode("utf-8", "replace"), None, "LÉA")
    expected = hashlib.blake2b("\x1f".join(v or "" for v in values).encode(), digest_size=16).digest()
    assert content_digest(values) == expected
    assert hash64(expected) == int.from_bytes(expected[:8], "big", signed=True)
    assert pipeline.line_hash("8|10000000017|810000000017|MME|LAMBERT|LÉA|".encode()) == -7638856576720433435
    assert hash64(content_digest(("810000000017", None, "LÉA"))) == 7323750267518492476
