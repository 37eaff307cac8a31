from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, delete, func, select

from directory_sync import sync
from directory_sync.errors import DeletionBrake, MissingColumns
from directory_sync.extracts import ExtractKind, sources
from directory_sync.mapping import SPECS
from directory_sync.models import Activity, Mailbox, Practitioner, Structure, SyncRun
from directory_sync.sync import import_paths, sync_source
from directory_sync.synthetic import (
    mssante_lines,
    personne_activite_lines,
    write_extract,
)


def _count(engine: Engine, model: type) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(model)).scalar_one())


def _dump(engine: Engine, model: type) -> list[tuple[object, ...]]:
    """The table's content; not the hashes, which depend on how the file spells a line (a mailbox's content
    hash is its line's)."""
    table = model.__table__  # type: ignore[attr-defined]
    columns = [c for c in table.columns if c.name not in ("line_hash", "row_hash")]
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(*columns).order_by(*table.primary_key.columns)).all()]


def _expected(path: Path, column: int) -> set[str]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return {line.split("|")[column] for line in lines if line.split("|")[column]}


def test_full_import_of_personne_activite(engine: Engine, tmp_path: Path) -> None:
    path = write_extract(tmp_path / "pa.txt", personne_activite_lines(400))
    (report,) = import_paths(engine, [path])
    assert report.kind is ExtractKind.PERSONNE_ACTIVITE
    assert report.rows_read == 400
    assert report.malformed_count == 0
    assert _count(engine, Practitioner) == len(_expected(path, 2))
    assert _count(engine, Structure) == len(_expected(path, 23))
    assert _count(engine, Activity) == 400  # the generator makes no identical activity twice
    by_table = {t.table: t for t in report.tables}
    assert by_table["practitioners"].inserted == len(_expected(path, 2))
    with engine.connect() as conn:
        p = conn.execute(select(Practitioner.id_type, Practitioner.id_pp, Practitioner.last_name)
                         .where(Practitioner.id_nat_ps == "810000000017")).one()
    assert (p.id_type, p.id_pp) == ("8", "10000000017")
    assert p.last_name


def test_reimporting_the_same_file_changes_nothing_and_says_so(engine: Engine, tmp_path: Path) -> None:
    path = write_extract(tmp_path / "m.txt", mssante_lines(300))
    import_paths(engine, [path])
    before = _dump(engine, Mailbox)
    (again,) = import_paths(engine, [path])
    assert not again.changed
    assert "nothing changed" in again.summary()
    assert _dump(engine, Mailbox) == before
    with engine.connect() as conn:
        statuses = conn.execute(select(SyncRun.status).order_by(SyncRun.id)).scalars().all()
    assert statuses == ["ok", "unchanged"]


@pytest.mark.parametrize("full_compare", [False, True], ids=["by-line", "full-compare"])
@pytest.mark.parametrize("factory", ["personne_activite", "mssante"])
def test_a_diff_sync_ends_exactly_where_a_fresh_import_would(
    engine: Engine, tmp_path: Path, factory: str, full_compare: bool,
) -> None:
    make = personne_activite_lines if factory == "personne_activite" else mssante_lines
    old = write_extract(tmp_path / "old.txt", make(500))
    new = write_extract(tmp_path / "new.txt", make(500, changed_share=0.05, removed_share=0.03))
    (first,) = import_paths(engine, [old])
    assert first.method == "load"
    (report,) = import_paths(engine, [new], full_compare=full_compare)
    assert report.method == ("compare" if full_compare else "lines")
    assert report.changed
    assert sum(t.updated + t.inserted for t in report.tables) > 0
    assert sum(t.deleted for t in report.tables) > 0
    models = (Practitioner, Structure, Activity) if factory == "personne_activite" else (Mailbox,)
    synced = {m.__name__: _dump(engine, m) for m in models}
    with engine.begin() as conn:
        for m in models:
            conn.execute(m.__table__.delete())  # type: ignore[attr-defined]
    import_paths(engine, [new])
    fresh = {m.__name__: _dump(engine, m) for m in models}
    assert synced == fresh


def test_the_brake_refuses_a_large_deletion_and_keeps_the_directory(engine: Engine, tmp_path: Path) -> None:
    full = write_extract(tmp_path / "full.txt", mssante_lines(300))
    truncated = write_extract(tmp_path / "trunc.txt", list(mssante_lines(300))[:201])
    import_paths(engine, [full])
    before = _dump(engine, Mailbox)
    with pytest.raises(DeletionBrake) as caught:
        import_paths(engine, [truncated])
    assert caught.value.would_delete == 100
    assert caught.value.existing == 300
    assert _dump(engine, Mailbox) == before
    with engine.connect() as conn:
        last = conn.execute(select(SyncRun.status, SyncRun.message).order_by(SyncRun.id.desc()).limit(1)).one()
    assert last.status == "refused"
    assert "refusing to delete 100 of 300" in (last.message or "")
    (forced,) = import_paths(engine, [truncated], force=True)
    assert forced.tables[0].deleted == 100
    assert _count(engine, Mailbox) == 200


def test_the_brake_share_is_configurable(engine: Engine, tmp_path: Path) -> None:
    import_paths(engine, [write_extract(tmp_path / "a.txt", mssante_lines(100))])
    smaller = write_extract(tmp_path / "b.txt", list(mssante_lines(100))[:81])
    with pytest.raises(DeletionBrake):
        import_paths(engine, [smaller], max_delete_share=0.15)
    (report,) = import_paths(engine, [smaller], max_delete_share=0.25)
    assert report.tables[0].deleted == 20


def test_a_failure_midway_leaves_the_previous_directory(engine: Engine, tmp_path: Path) -> None:
    import_paths(engine, [write_extract(tmp_path / "a.txt", mssante_lines(200))])
    before = _dump(engine, Mailbox)
    changed = write_extract(tmp_path / "b.txt", mssante_lines(200, changed_share=0.5))

    def explode(phase: str, done: int, total: int) -> None:
        if phase == "apply" and done == total:
            raise RuntimeError("disk full")

    (source,) = sources(changed)
    with pytest.raises(RuntimeError, match="disk full"):
        sync_source(engine, source, progress=explode)
    assert _dump(engine, Mailbox) == before
    with engine.connect() as conn:
        assert conn.execute(select(SyncRun.status).order_by(SyncRun.id.desc()).limit(1)).scalar_one() == "failed"


def test_malformed_rows_are_reported_and_the_rest_syncs(engine: Engine, tmp_path: Path) -> None:
    lines = list(mssante_lines(50))
    lines[10] = "XYZ" + lines[10][3:]  # unknown mailbox type
    kind, _address, rest = lines[20].split("|", 2)
    lines[20] = f"{kind}|pas-une-adresse|{rest}"
    lines[30] = "PER|a@b.fr|8\n"
    ownerless = lines[40].split("|")
    ownerless[0], ownerless[4] = "CAB", ""  # Identification nationale PP
    lines[40] = "|".join(ownerless)
    (report,) = import_paths(engine, [write_extract(tmp_path / "m.txt", lines)])
    reasons = {m.line: m.reason for m in report.malformed}
    assert reasons == {
        11: "unknown mailbox type 'XYZ'",
        21: "invalid 'Adresse BAL': 'pas-une-adresse'",
        31: "3 fields where the header has 31",
        41: "a CAB mailbox without 'Identification nationale PP'",
    }
    assert report.rows_read == 46
    assert _count(engine, Mailbox) == 46


def test_duplicate_addresses_keep_the_first_row(engine: Engine, tmp_path: Path) -> None:
    lines = list(mssante_lines(20))
    dup = lines[5].replace("|FRANCE", "|ITALIE")
    lines.insert(12, dup)
    path = write_extract(tmp_path / "m.txt", lines)
    import_paths(engine, [path])
    assert _count(engine, Mailbox) == 20
    address = lines[5].split("|")[1]
    with engine.connect() as conn:
        country = conn.execute(select(Mailbox.country).where(Mailbox.address == address)).scalar_one()
    assert country == "FRANCE"
    (again,) = import_paths(engine, [path])
    assert not again.changed


def test_columns_are_mapped_by_name_not_position(engine: Engine, tmp_path: Path) -> None:
    rows = [line.rstrip("\n").split("|") for line in mssante_lines(30)]
    order = list(reversed(range(len(rows[0]))))
    shuffled = ["|".join(r[i] for i in order) + "\n" for r in rows]
    import_paths(engine, [write_extract(tmp_path / "s.txt", shuffled)])
    with_shuffle = _dump(engine, Mailbox)
    with engine.begin() as conn:
        conn.execute(delete(Mailbox))
    import_paths(engine, [write_extract(tmp_path / "n.txt", mssante_lines(30))])
    assert _dump(engine, Mailbox) == with_shuffle


def test_a_file_without_a_needed_column_is_refused(engine: Engine, tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("Type de BAL|Adresse BAL|Nom d'exercice\nPER|a@b.fr|X\n", encoding="utf-8")
    with pytest.raises(MissingColumns, match="Identification nationale PP"):
        import_paths(engine, [bad])


def test_52_then_56_column_files(engine: Engine, tmp_path: Path) -> None:
    import_paths(engine, [write_extract(tmp_path / "old.txt", personne_activite_lines(100, recent=False))])
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).where(Activity.role_code.is_not(None))).scalar_one() == 0
    (report,) = import_paths(engine, [write_extract(tmp_path / "new.txt", personne_activite_lines(100))], force=True)
    by_table = {t.table: t for t in report.tables}
    assert by_table["activities"].deleted == by_table["activities"].inserted == 100
    assert by_table["practitioners"].updated == 0
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).where(Activity.role_code == "FON-01")).scalar_one() == 100


def test_zipped_extract_imports_like_the_plain_file(engine: Engine, tmp_path: Path) -> None:
    zipped = write_extract(tmp_path / "Extraction_Correspondance_MSSante.zip", mssante_lines(120, crlf=True),
                           zipped=True, member="Extraction_Correspondance_MSSante_202608260800.txt")
    (report,) = import_paths(engine, [zipped])
    assert report.source.endswith("!Extraction_Correspondance_MSSante_202608260800.txt")
    assert _count(engine, Mailbox) == 120
    (again,) = import_paths(engine, [zipped])
    assert not again.changed


def test_identical_duplicate_lines_keep_their_entry_until_both_go(engine: Engine, tmp_path: Path) -> None:
    lines = list(mssante_lines(30))
    twin = lines[7]
    with_twins = lines[:12] + [twin] + lines[12:]
    import_paths(engine, [write_extract(tmp_path / "a.txt", with_twins)])
    assert _count(engine, Mailbox) == 30
    (one_left,) = import_paths(engine, [write_extract(tmp_path / "b.txt", lines)])
    assert one_left.method == "lines"
    assert not one_left.changed
    (none_left,) = import_paths(engine, [write_extract(tmp_path / "c.txt", lines[:7] + lines[8:])])
    assert none_left.tables[0].deleted == 1
    assert _count(engine, Mailbox) == 29


def test_a_practitioner_stays_while_one_of_their_lines_remains(engine: Engine, tmp_path: Path) -> None:
    lines = list(personne_activite_lines(300))
    ids = [line.split("|")[2] for line in lines[1:]]
    multi = next(i for i in range(len(ids) - 1) if ids[i] == ids[i + 1]) + 1  # a practitioner with two lines
    import_paths(engine, [write_extract(tmp_path / "a.txt", lines)])
    (report,) = import_paths(engine, [write_extract(tmp_path / "b.txt", lines[:multi] + lines[multi + 1:])])
    changes = {t.table: t for t in report.tables}
    assert changes["activities"].deleted == 1
    assert changes["practitioners"].deleted == 0
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).where(Practitioner.id_nat_ps == ids[multi - 1])).scalar_one() == 1


def test_readers_see_the_old_directory_until_the_commit(engine: Engine, tmp_path: Path) -> None:
    import_paths(engine, [write_extract(tmp_path / "a.txt", mssante_lines(200))])
    before = _dump(engine, Mailbox)
    seen_midway: list[list[tuple[object, ...]]] = []

    def peek(phase: str, done: int, total: int) -> None:
        if phase == "apply" and done == total:  # every change written, not yet committed
            seen_midway.append(_dump(engine, Mailbox))

    new = write_extract(tmp_path / "b.txt", mssante_lines(200, changed_share=0.3, removed_share=0.05))
    (report,) = import_paths(engine, [new], progress=peek, force=True)
    assert report.changed
    assert seen_midway == [before]
    assert _dump(engine, Mailbox) != before


def test_two_extracts_loaded_one_after_the_other_both_resync_by_line(engine: Engine, tmp_path: Path) -> None:
    """Each load leaves the hash of every line on the row it fed (activities, mailboxes); both then drive
    a by-line re-import to the fresh-import result."""
    old = [write_extract(tmp_path / "pa.txt", personne_activite_lines(400)),
           write_extract(tmp_path / "m.txt", mssante_lines(300))]
    new = [write_extract(tmp_path / "pa2.txt", personne_activite_lines(400, changed_share=0.05, removed_share=0.02)),
           write_extract(tmp_path / "m2.txt", mssante_lines(300, changed_share=0.05, removed_share=0.02))]
    assert [r.method for r in import_paths(engine, old)] == ["load", "load"]
    with engine.connect() as conn:
        hashed = [conn.execute(select(func.count(m.line_hash.distinct()))).scalar_one() for m in (Activity, Mailbox)]
    assert hashed == [400, 300]
    reports = import_paths(engine, new)
    assert [r.method for r in reports] == ["lines", "lines"]
    assert all(r.changed for r in reports)
    models = (Practitioner, Structure, Activity, Mailbox)
    synced = {m.__name__: _dump(engine, m) for m in models}
    with engine.begin() as conn:
        for m in models:
            conn.execute(m.__table__.delete())  # type: ignore[attr-defined]
    import_paths(engine, new)
    assert {m.__name__: _dump(engine, m) for m in models} == synced


def test_each_kind_ends_with_its_line_entity_which_names_the_other_keys_in_indexed_columns() -> None:
    """What the by-line re-import relies on (sync.py): the last entity of a kind has one row per line,
    and its table has an indexed column named after each other entity's key."""
    for specs in SPECS.values():
        *others, line = specs
        assert line.per_line and not any(s.per_line for s in others)
        for other in others:
            column = line.table.c[other.key_column]
            assert any(next(iter(idx.columns)) is column for idx in line.table.indexes), other.key_column


def test_rows_without_their_line_hash_are_compared_once_then_resynced_by_line(engine: Engine, tmp_path: Path) -> None:
    """Rows loaded before the line hashes moved onto them (or written by FHIR) have none: the next import
    compares every key and writes those rows again with their line hash (nothing else changes); the one
    after goes by line."""
    path = write_extract(tmp_path / "pa.txt", personne_activite_lines(300))
    import_paths(engine, [path])
    with engine.begin() as conn:
        conn.execute(Activity.__table__.update().values(line_hash=None))  # type: ignore[attr-defined]
    (compared,) = import_paths(engine, [path])
    assert compared.method == "compare"
    assert [(t.table, t.inserted, t.updated, t.deleted) for t in compared.tables] == [
        ("practitioners", 0, 0, 0), ("structures", 0, 0, 0), ("activities", 0, 300, 0)]
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).where(Activity.line_hash.is_(None))).scalar_one() == 0
    (again,) = import_paths(engine, [path])
    assert again.method == "lines" and not again.changed


def test_an_import_checkpoints_after_each_extract_in_a_process_and_leaves_nothing_to_copy(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """SQLite: the import's transactions run no checkpoint of their own (the WAL keeps their pages), a process
    copies each extract's pages once it is committed, and the import returns with all of them copied (the last
    checkpoint, in the importing process, finds nothing left) and its connections back to SQLite's own setting.
    Nothing of the kind on PostgreSQL."""
    pa = write_extract(tmp_path / "pa.txt", personne_activite_lines(3000))
    mss = write_extract(tmp_path / "mss.txt", mssante_lines(1000))
    during: list[int] = []
    original = sync._Run.bulk_load

    def bulk_load(run: sync._Run, conn: Connection) -> None:
        if conn.dialect.name == "sqlite":
            during.append(conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one())
        original(run, conn)

    monkeypatch.setattr(sync._Run, "bulk_load", bulk_load)
    caplog.set_level(logging.DEBUG, logger="directory_sync.sync")
    import_paths(engine, [pa, mss])
    checkpoints = [r.args for r in caplog.records if r.getMessage().startswith("directory checkpoint")]
    if engine.dialect.name != "sqlite":
        assert checkpoints == []
        return
    assert during == [0, 0]
    assert len(checkpoints) == 3
    for copied, logged, busy in checkpoints:  # nothing else reads: every page copied
        assert copied == logged > 0 and not busy
    assert checkpoints[2] == checkpoints[1]  # the pages the process copied: none left
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one() == 1000


def test_the_checkpoint_process_takes_only_the_cpu_the_sync_leaves(tmp_path: Path) -> None:
    """SQLite only (PostgreSQL starts none): the checkpoint process runs at the lowest CPU priority."""
    from directory_sync.database import make_engine, migrate

    engine = make_engine(f"sqlite:///{tmp_path / 'directory.db'}")
    migrate(engine)
    with sync._Checkpoints(engine, 2) as checkpoints:
        checkpoints.start()
        checkpoints.wait()  # it has answered: it runs
        assert checkpoints._process is not None
        assert os.getpriority(os.PRIO_PROCESS, checkpoints._process.pid) == 19
    engine.dispose()


def test_an_import_whose_checkpoint_process_ends_still_syncs_and_checkpoints_at_its_end(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """The checkpoint process ends at once (exit code 3): the import says so, syncs every extract, and copies
    every page they logged at its end. (PostgreSQL starts none.)"""
    monkeypatch.setattr(sync, "_CHECKPOINTER", "raise SystemExit(3)")
    caplog.set_level(logging.DEBUG, logger="directory_sync.sync")
    pa = write_extract(tmp_path / "pa.txt", personne_activite_lines(300))
    mss = write_extract(tmp_path / "mss.txt", mssante_lines(100))
    reports = import_paths(engine, [pa, mss])
    assert [r.rows_read for r in reports] == [300, 100]
    assert _count(engine, Mailbox) == 100
    messages = [r.getMessage() for r in caplog.records]
    if engine.dialect.name != "sqlite":
        assert not [m for m in messages if "checkpoint" in m]
        return
    assert any("checkpoint process ended (exit code 3)" in m for m in messages)
    ((copied, logged, busy),) = [r.args for r in caplog.records if r.getMessage().startswith("directory checkpoint")]
    assert copied == logged > 0 and not busy
