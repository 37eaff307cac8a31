from __future__ import annotations

import contextlib
import datetime as dt
import gc
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from sqlalchemy import Engine

import directory_sync.lookup as lookup_module
from directory_sync.certificates import add_certificate
from directory_sync.errors import InvalidCertificate
from directory_sync.lookup import DirectoryLookup
from directory_sync.sync import import_paths
from directory_sync.synthetic import mssante_lines, write_extract

NOW = dt.datetime.now(dt.UTC)


def _cert(cn: str, not_before: dt.datetime, not_after: dt.datetime) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(Encoding.DER)


@pytest.fixture
def directory(engine: Engine, tmp_path: Path) -> tuple[Engine, list[list[str]]]:
    lines = list(mssante_lines(50))
    import_paths(engine, [write_extract(tmp_path / "m.txt", lines)])
    return engine, [line.rstrip("\n").split("|") for line in lines[1:]]


def _first(rows: list[list[str]], kind: str) -> list[str]:
    return next(r for r in rows if r[0] == kind)


async def test_a_published_personal_mailbox_is_found_with_its_owner(directory: tuple[Engine, list[list[str]]]) -> None:
    engine, rows = directory
    row = _first(rows, "PER")
    lookup = DirectoryLookup(engine)
    try:
        found = await lookup.lookup(row[1])
    finally:
        lookup.close()
    assert found is not None
    assert found.address == row[1]
    assert found.mailbox_type == "PER"
    assert found.rpps == row[3]
    assert found.id_nat_ps == "8" + row[3]
    assert (found.last_name, found.first_name, found.profession) == (row[9], row[10], row[14])
    assert found.liste_rouge is False
    assert found.certificates == ()
    with pytest.raises(AttributeError):
        found.address = "autre@medecin.mssante.fr"  # type: ignore[misc]


async def test_domain_is_case_insensitive_local_part_is_exact(directory: tuple[Engine, list[list[str]]]) -> None:
    engine, rows = directory
    local, domain = _first(rows, "PER")[1].split("@")
    lookup = DirectoryLookup(engine)
    try:
        assert await lookup.lookup(f"{local}@{domain.upper()}") is not None
        assert await lookup.lookup(f"{local.upper()}@{domain}") is None
        assert await lookup.lookup(f"inconnu@{domain}") is None
        assert await lookup.lookup("not an address") is None
    finally:
        lookup.close()


async def test_an_organisational_mailbox_carries_its_structure(directory: tuple[Engine, list[list[str]]]) -> None:
    engine, rows = directory
    row = _first(rows, "ORG")
    found = DirectoryLookup(engine).lookup_blocking(row[1])
    assert found is not None
    assert found.mailbox_type == "ORG"
    assert found.rpps is None
    assert found.structure_id == row[6]
    assert found.structure_name == row[18]


def test_only_currently_valid_encryption_certificates_are_returned(directory: tuple[Engine, list[list[str]]]) -> None:
    engine, rows = directory
    row = _first(rows, "PER")
    day = dt.timedelta(days=1)
    valid = _cert("valid", NOW - day, NOW + 365 * day)
    expired = _cert("expired", NOW - 400 * day, NOW - day)
    by_rpps = _cert("by-idnat", NOW - day, NOW + 30 * day)
    signing = _cert("signing", NOW - day, NOW + 365 * day)
    fp = add_certificate(engine, valid, address=row[1].upper().replace(row[1].split("@")[0].upper(),
                                                                       row[1].split("@")[0]))
    add_certificate(engine, expired, address=row[1])
    add_certificate(engine, by_rpps, id_nat_ps="8" + row[3])
    add_certificate(engine, signing, address=row[1], usage="signature")
    found = DirectoryLookup(engine).lookup_blocking(row[1])
    assert found is not None
    assert [c.subject for c in found.certificates] == ["CN=valid", "CN=by-idnat"]
    assert found.certificates[0].fingerprint_sha256 == fp
    assert found.certificates[0].der == valid
    assert found.certificates[0].not_after.tzinfo is not None


def test_a_bad_certificate_is_refused(engine: Engine) -> None:
    with pytest.raises(InvalidCertificate):
        add_certificate(engine, b"\x30\x03\x02\x01\x00", address="a@b.fr")
    with pytest.raises(InvalidCertificate, match="belongs to"):
        add_certificate(engine, b"", usage="encryption")


def test_lookup_connections_are_its_own_and_see_each_commit(directory: tuple[Engine, list[list[str]]],
                                                            tmp_path: Path) -> None:
    """The read-only settings of a lookup connection never reach the engine's writers, and a
    lookup made after a sync commits sees it."""
    engine, rows = directory
    lookup = DirectoryLookup(engine, threads=1)
    added = "nouvelle.adresse@pro.mssante.fr"
    try:
        assert lookup.lookup_blocking(_first(rows, "PER")[1]) is not None
        assert lookup.lookup_blocking(added) is None
        lines = list(mssante_lines(50))
        lines.append(lines[1].replace(_first(rows, "PER")[1], added, 1))
        import_paths(engine, [write_extract(tmp_path / "m2.txt", lines)])
        found = lookup.lookup_blocking(added)
        assert found is not None and found.address == added
    finally:
        lookup.close()


@pytest.mark.parametrize("url", ["sqlite:////nonexistent-dir/directory.db",
                                 "postgresql+psycopg://nobody@127.0.0.1:1/none"])
async def test_an_unreachable_directory_is_reported_as_unavailable(url: str) -> None:
    from directory_sync.database import make_engine
    from directory_sync.errors import DirectoryUnavailable

    lookup = DirectoryLookup(make_engine(url))
    try:
        with pytest.raises(DirectoryUnavailable):
            await lookup.lookup("someone@medecin.mssante.fr")
    finally:
        lookup.close()


def test_a_failed_lookup_leaves_the_next_one_a_fresh_connection(tmp_path: Path) -> None:
    """A read that fails (here: no tables yet) throws its thread's connection and cursor away;
    the next lookup on that thread opens new ones and sees the database as it is now."""
    from directory_sync.database import make_engine, migrate
    from directory_sync.errors import DirectoryUnavailable

    engine = make_engine(f"sqlite:///{tmp_path / 'late.db'}")
    lookup = DirectoryLookup(engine, threads=1)
    try:
        with pytest.raises(DirectoryUnavailable):
            lookup.lookup_blocking("someone@medecin.mssante.fr")
        migrate(engine)
        lines = list(mssante_lines(5))
        import_paths(engine, [write_extract(tmp_path / "m.txt", lines)])
        address = lines[1].split("|")[1]
        found = lookup.lookup_blocking(address)
        assert found is not None and found.address == address
    finally:
        lookup.close()
        engine.dispose()


def _mailbox_directory(tmp_path: Path) -> tuple[Engine, Path, str]:
    from directory_sync.database import make_engine, migrate

    db = tmp_path / "directory.db"
    engine = make_engine(f"sqlite:///{db}")
    migrate(engine)
    lines = list(mssante_lines(5))
    import_paths(engine, [write_extract(tmp_path / "m.txt", lines)])
    return engine, db, lines[1].split("|")[1]


def _set_service(engine: Engine, address: str, service: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE dir_mailbox SET service = ? WHERE address = ?", (service, address))


def _checkpoint(db: Path) -> tuple[int, int]:
    """(frames in the WAL, frames of it copied into the database file) after a passive checkpoint."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        _busy, logged, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return logged, copied


def test_sqlite_lookups_in_a_burst_share_a_snapshot_ended_once_they_stop(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite only (PostgreSQL reads each lookup in a transaction of its own). Lookups that follow each other
    read one snapshot; once they stop, it ends by itself: it no longer keeps the WAL from being checkpointed."""
    engine, db, address = _mailbox_directory(tmp_path)
    monkeypatch.setattr(lookup_module, "SNAPSHOT_SECONDS", 1.0)
    monkeypatch.setattr(lookup_module, "BURST_GAP_SECONDS", 3600.0)  # every lookup in the test is in one burst
    lookup = DirectoryLookup(engine, threads=1)
    try:
        first = lookup.lookup_blocking(address)
        assert first is not None and first.service != "Nouveau service"
        _set_service(engine, address, "Nouveau service")
        again = lookup.lookup_blocking(address)
        assert again is not None and again.service == first.service
        logged, copied = _checkpoint(db)
        assert copied < logged  # not past the snapshot
        deadline = time.monotonic() + 30
        while copied < logged and time.monotonic() < deadline:
            time.sleep(0.05)
            logged, copied = _checkpoint(db)
        assert copied == logged
        later = lookup.lookup_blocking(address)
        assert later is not None and later.service == "Nouveau service"
    finally:
        lookup.close()
        engine.dispose()


def test_sqlite_a_lookup_after_a_pause_sees_the_last_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _db, address = _mailbox_directory(tmp_path)
    monkeypatch.setattr(lookup_module, "SNAPSHOT_SECONDS", 3600.0)  # only the pause ends the snapshot
    lookup = DirectoryLookup(engine, threads=1)
    try:
        assert lookup.lookup_blocking(address) is not None
        _set_service(engine, address, "Nouveau service")
        time.sleep(10 * lookup_module.BURST_GAP_SECONDS)
        found = lookup.lookup_blocking(address)
        assert found is not None and found.service == "Nouveau service"
    finally:
        lookup.close()
        engine.dispose()


def test_sqlite_a_lookup_collected_unclosed_leaves_no_thread(tmp_path: Path) -> None:
    engine, _db, address = _mailbox_directory(tmp_path)
    before = set(threading.enumerate())
    lookup = DirectoryLookup(engine, threads=1)
    assert lookup.lookup_blocking(address) is not None
    (ender,) = [t for t in set(threading.enumerate()) - before if t.name == "dir-lookup-snapshots"]
    del lookup
    gc.collect()
    ender.join(timeout=30)
    assert not ender.is_alive()
    engine.dispose()
