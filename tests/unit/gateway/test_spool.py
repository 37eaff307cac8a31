from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from config.schema import DatabaseConfig
from gateway.db import create_tables, make_engine, metadata
from gateway.spool import (
    MAX_QUEUE_LIFETIME,
    RETRY_SCHEDULE,
    GroupCommitter,
    Incoming,
    RecipientResult,
    Spool,
    new_queue_id,
    next_delay,
    queue,
    queue_recipients,
)

MSG = b"Subject: hi\r\n\r\nbody\r\n"


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'gw.db'}"
    else:
        url = request.getfixturevalue("pg_database")
    eng = make_engine(DatabaseConfig(url=url))
    create_tables(eng)
    yield eng
    metadata.drop_all(eng)
    eng.dispose()


@pytest.fixture
def spool(tmp_path: Path, engine: Engine) -> Spool:
    return Spool(tmp_path / "spool", engine)


def test_accept_writes_a_private_file_and_a_row(spool: Spool, engine: Engine, tmp_path: Path) -> None:
    qid = spool.accept("a@x.test", ["b@x.test", "c@x.test"], MSG, account="a@x.test")
    path = spool.path(qid)
    assert path.read_bytes() == MSG
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "spool").stat().st_mode) == 0o700
    assert not list((tmp_path / "spool" / "tmp").iterdir())
    with engine.connect() as conn:
        assert conn.execute(select(queue.c.state)).scalar_one() == "incoming"
        assert sorted(r.address for r in conn.execute(select(queue_recipients))) == ["b@x.test", "c@x.test"]


def test_claim_then_partial_success_defers_only_the_failed_recipient(spool: Spool) -> None:
    qid = spool.accept("a@x.test", ["b@x.test", "c@x.test"], MSG, account=None)
    [msg] = spool.claim_due(10)
    assert msg.id == qid and msg.pending == ("b@x.test", "c@x.test")
    assert spool.claim_due(10) == []  # active messages are not claimed twice
    now = datetime.now(UTC)
    state = spool.record(msg, [RecipientResult("b@x.test", "done", "250 2.0.0 ok"),
                               RecipientResult("c@x.test", "retry", "451 4.2.0 busy")], now=now)
    assert state == "deferred"
    assert spool.path(qid).exists()
    assert spool.claim_due(10, now=now) == []
    [again] = spool.claim_due(10, now=now + timedelta(hours=1))
    assert again.pending == ("c@x.test",) and again.attempts == 1
    assert spool.record(again, [RecipientResult("c@x.test", "done", "250 ok")]) == "done"
    assert not spool.path(qid).exists()


def test_permanent_failure_and_expiry(spool: Spool) -> None:
    spool.accept("a@x.test", ["b@x.test"], MSG, account=None)
    [msg] = spool.claim_due(1)
    assert spool.record(msg, [RecipientResult("b@x.test", "failed", "550 5.1.1 no")]) == "failed"
    spool.accept("a@x.test", ["b@x.test"], MSG, account=None)
    [old] = spool.claim_due(1)
    late = old.created_at + MAX_QUEUE_LIFETIME + timedelta(seconds=1)
    assert spool.record(old, [RecipientResult("b@x.test", "retry", "451 later")], now=late) == "failed"


def test_recover_requeues_active_and_removes_unacknowledged_files(spool: Spool, tmp_path: Path) -> None:
    acked = spool.accept("a@x.test", ["b@x.test"], MSG, account=None)
    spool.claim_due(1)  # then the process dies in the middle of the delivery
    orphan = tmp_path / "spool" / "msg" / "ORPHAN"   # linked, row never committed: never acknowledged
    orphan.write_bytes(MSG)
    half = tmp_path / "spool" / "tmp" / "HALF"
    half.write_bytes(MSG[:5])
    assert spool.recover() == (1, 2)
    assert not orphan.exists() and not half.exists()
    [msg] = spool.claim_due(1)
    assert msg.id == acked and spool.read(acked) == MSG


def test_an_attempt_cut_by_a_crash_is_flagged_interrupted(spool: Spool, tmp_path: Path) -> None:
    cut = spool.accept("a@x.test", ["b@x.test"], MSG, account=None)
    waiting = spool.accept("a@x.test", ["c@x.test"], MSG, account=None)
    assert len(spool.claim_due(2)) == 2  # both active; only one attempt has started when the process dies
    assert spool.begin_attempt(cut) == MSG
    assert spool.recover() == (2, 0)
    assert not list((tmp_path / "spool" / "inflight").iterdir())
    flags = {m.id: m.interrupted for m in spool.claim_due(2)}
    assert flags == {cut: True, waiting: False}


def test_an_attempt_that_ends_leaves_no_marker(spool: Spool, engine: Engine, tmp_path: Path) -> None:
    for rcpt in ("b@x.test", "c@x.test", "d@x.test"):
        spool.accept("a@x.test", [rcpt], MSG, account=None)
    retried, held, released = spool.claim_due(3)
    for msg in (retried, held, released):
        spool.begin_attempt(msg.id)
    spool.record(retried, [RecipientResult(retried.pending[0], "retry", "451 4.4.1 later")])
    spool.hold(held.id, "card absent")
    spool.release_active(released.id)
    assert not list((tmp_path / "spool" / "inflight").iterdir())
    spool.recover()
    with engine.connect() as conn:
        assert not any(conn.execute(select(queue.c.interrupted)).scalars())


def test_retry_schedule_is_jittered_and_grows() -> None:
    delays = [next_delay(n) for n in range(1, len(RETRY_SCHEDULE) + 3)]
    for n, d in enumerate(delays[: len(RETRY_SCHEDULE)]):
        assert RETRY_SCHEDULE[n] * 0.9 <= d <= RETRY_SCHEDULE[n] * 1.1
    assert delays[-1] <= RETRY_SCHEDULE[-1] * 1.1


def test_files_are_fsynced_to_a_directory_that_exists(spool: Spool, tmp_path: Path) -> None:
    qid = spool.accept("a@x.test", ["b@x.test"], MSG, account=None)
    # the link count shows the temp name is gone: one name only, in msg/
    assert os.stat(spool.path(qid)).st_nlink == 1


def test_recover_marks_rows_without_files_as_delivered(spool: Spool, engine: Engine) -> None:
    qid = spool.accept("a@x.test", ["b@x.test"], MSG, account=None)
    spool.path(qid).unlink()  # its file went after delivery; the "done" mark was lost to a power cut
    spool.recover()
    with engine.connect() as conn:
        assert conn.execute(select(queue.c.state).where(queue.c.id == qid)).scalar_one() == "done"
    assert spool.claim_due(10) == []


async def test_group_commit_batches_concurrent_accepts(spool: Spool, engine: Engine) -> None:
    committer = GroupCommitter(spool)
    msgs = await asyncio.gather(*(committer.accept(Incoming(new_queue_id(), "a@x.test", ("b@x.test",),
                                                                 MSG + bytes([65 + i]), None))
                                  for i in range(20)))
    ids = [m.id for m in msgs]
    assert all(m.pending == ("b@x.test",) and m.attempts == 0 for m in msgs)
    assert spool.claim_due(100) == []  # born active: they belong to the worker they were handed to
    assert len(set(ids)) == 20
    for i, qid in enumerate(ids):
        assert spool.read(qid) == MSG + bytes([65 + i])
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(queue)).scalar_one() == 20


class SlowSpool(Spool):
    """Each batch takes a while to become durable: time for a client to leave in the middle."""

    def accept_batch(self, batch, *, state="active"):  # type: ignore[no-untyped-def]
        time.sleep(0.3)
        return super().accept_batch(batch, state=state)


def incoming(n: int) -> Incoming:
    return Incoming(new_queue_id(), "a@x.test", ("b@x.test",), MSG + bytes([65 + n]), None)


async def until(predicate, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return value


async def test_a_client_that_leaves_during_the_commit_strands_nothing(engine: Engine, tmp_path: Path) -> None:
    spool = SlowSpool(tmp_path / "spool", engine)
    committer = GroupCommitter(spool)
    written = asyncio.create_task(committer.accept(incoming(0)))  # its batch is being written when it leaves
    await asyncio.sleep(0.1)
    unwritten = asyncio.create_task(committer.accept(incoming(1)))  # waits for the next batch, leaves before it
    await asyncio.sleep(0)
    written.cancel()
    unwritten.cancel()
    await asyncio.gather(written, unwritten, return_exceptions=True)
    # Durable although no 250 was sent: back to `incoming`, so the worker's poll delivers it without a restart.
    [msg] = await until(lambda: spool.claim_due(10))
    assert spool.read(msg.id) == MSG + b"A"
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(queue)).scalar_one() == 1  # the other was never stored


def test_failed_commit_leaves_no_file(spool: Spool, engine: Engine, tmp_path: Path) -> None:
    with engine.begin() as conn:
        queue_recipients.drop(conn)
    with pytest.raises(SQLAlchemyError):
        spool.accept("a@x.test", ["b@x.test"], MSG, account=None)
    assert list((tmp_path / "spool" / "msg").iterdir()) == []


def test_finished_rows_are_purged_after_a_while(spool: Spool, engine: Engine) -> None:
    spool.accept("a@x.test", ["b@x.test"], MSG, account=None)
    [msg] = spool.claim_due(1)
    spool.record(msg, [RecipientResult("b@x.test", "done", "250 ok")])
    waiting = spool.accept("a@x.test", ["c@x.test"], MSG, account=None)
    assert spool.purge_done(timedelta(days=7)) == 0
    assert spool.purge_done(timedelta(days=7), now=datetime.now(UTC) + timedelta(days=8)) == 1
    with engine.connect() as conn:
        assert [r.id for r in conn.execute(select(queue.c.id))] == [waiting]
        assert [r.queue_id for r in conn.execute(select(queue_recipients.c.queue_id))] == [waiting]


def test_hold_release_and_delete(spool: Spool) -> None:
    held = spool.accept("a@x.test", ["b@x.test"], MSG, account="a@x.test")
    [msg] = spool.claim_due(1)
    spool.hold(msg.id, "card removed")
    assert spool.claim_due(1) == []  # held mail waits for the operator or the card
    [entry] = spool.entries(["hold"])
    assert (entry.id, entry.last_error, entry.recipients) == (held, "card removed", (("b@x.test", "pending", None),))
    assert spool.release(held)
    assert not spool.release(held)  # no longer held
    [again] = spool.claim_due(1)
    assert again.id == held
    assert not spool.delete(held)  # being delivered: not deletable
    spool.release_active(held)
    assert spool.delete(held)
    assert not spool.path(held).exists() and spool.entries() == []


def test_an_older_queue_table_gains_the_new_columns(tmp_path: Path) -> None:
    eng = make_engine(DatabaseConfig(url=f"sqlite:///{tmp_path / 'old.db'}"))
    with eng.begin() as conn:  # the queue table as the first release created it
        conn.exec_driver_sql("CREATE TABLE queue (id VARCHAR(32) PRIMARY KEY, state VARCHAR(16) NOT NULL, "
                             "sender VARCHAR(320) NOT NULL, account VARCHAR(320), size INTEGER NOT NULL, "
                             "created_at DATETIME NOT NULL, next_attempt_at DATETIME NOT NULL, "
                             "attempts INTEGER NOT NULL, last_error TEXT)")
        conn.exec_driver_sql("INSERT INTO queue VALUES ('OLD', 'deferred', 'a@x.test', NULL, 1, "
                             "'2026-01-01 00:00:00', '2026-01-01 00:00:00', 1, NULL)")
    create_tables(eng)
    spool = Spool(tmp_path / "spool", eng)
    [entry] = spool.entries()
    assert entry.id == "OLD"
    with eng.connect() as conn:
        assert conn.execute(select(queue.c.direction)).scalar_one() == "submission"
    eng.dispose()


async def test_a_card_coming_back_releases_what_it_sends_and_what_waits_for_it(spool: Spool) -> None:
    """Outbound mail held for the sender's card, inbound mail held for a recipient's card: both go on when that
    card is back; a message that recipient already has, or that waits for another card, stays held."""
    from gateway.cards import release_held

    sent = spool.accept("bob@x.test", ["peer@y.test"], MSG, account="bob@x.test")
    received = spool.accept("peer@y.test", ["alice@x.test", "Bob@x.test"], MSG + b"1", account=None)
    delivered = spool.accept("peer@y.test", ["bob@x.test", "carol@x.test"], MSG + b"2", account=None)
    other = spool.accept("peer@y.test", ["carol@x.test"], MSG + b"3", account=None)
    claimed = {m.id: m for m in spool.claim_due(10)}
    spool.record(claimed[delivered], [RecipientResult("bob@x.test", "done", "250 ok"),
                                      RecipientResult("carol@x.test", "retry", "451 4.7.0 card absent")])
    assert spool.release(delivered)  # deferred, sent on again, then held for carol's card
    assert [m.id for m in spool.claim_due(10)] == [delivered]
    for qid in (sent, received, delivered, other):
        spool.hold(qid, "card absent")
    assert sorted(await release_held(spool, "BOB@x.test")) == sorted([sent, received])
    assert sorted(e.id for e in spool.entries(["hold"])) == sorted([delivered, other])
