"""Counts and the last sync runs, for `mssgw directory stats` and monitoring."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, func, select

from directory_sync.models import (
    Activity,
    Certificate,
    Diploma,
    KnowHow,
    Mailbox,
    Practitioner,
    Structure,
    SyncRun,
    TrustDomain,
)


@dataclass(frozen=True, slots=True)
class RunSummary:
    id: int
    kind: str
    source: str
    finished_at: str
    status: str
    inserted: int
    updated: int
    deleted: int
    rows_malformed: int


@dataclass(frozen=True, slots=True)
class DirectoryStats:
    counts: dict[str, int]
    mailboxes_by_type: dict[str, int]
    last_runs: tuple[RunSummary, ...]


def directory_stats(engine: Engine, runs: int = 5) -> DirectoryStats:
    tables = {"practitioners": Practitioner, "structures": Structure, "activities": Activity,
              "know-how": KnowHow, "diplomas": Diploma, "mailboxes": Mailbox, "certificates": Certificate,
              "trust domains": TrustDomain}
    with engine.connect() as conn:
        counts = {name: int(conn.execute(select(func.count()).select_from(model)).scalar_one())
                  for name, model in tables.items()}
        by_type = {str(t): int(n) for t, n in conn.execute(
            select(Mailbox.mailbox_type, func.count()).group_by(Mailbox.mailbox_type)).all()}
        last = conn.execute(select(SyncRun.__table__).order_by(SyncRun.id.desc()).limit(runs)).all()
    return DirectoryStats(counts, by_type, tuple(
        RunSummary(r.id, r.kind, r.source, r.finished_at.isoformat(timespec="seconds"), r.status, r.inserted,
                   r.updated, r.deleted, r.rows_malformed) for r in last))
