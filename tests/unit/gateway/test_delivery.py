"""The delivery worker's queue mechanics over a real spool: each attempt's outcome recorded,
notices sent for final failures and, once, for late mail; held mail left alone."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, update

from config.schema import DatabaseConfig
from gateway.db import create_tables, make_engine
from gateway.delivery import DeliveryWorker
from gateway.spool import (
    Incoming,
    QueuedMessage,
    RecipientResult,
    Spool,
    new_queue_id,
    queue,
)

MSG = b"From: a@x.test\r\nSubject: t\r\n\r\nbody\r\n"


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    engine: Engine = make_engine(DatabaseConfig(url=f"sqlite:///{tmp_path / 'gw.db'}"))
    create_tables(engine)
    yield Spool(tmp_path / "spool", engine)
    engine.dispose()


class Recorder:
    """The pipeline side: answers as told, and keeps the notices the worker asks for."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.notices: list[tuple[str, str, tuple[str, ...]]] = []
        self.seen = asyncio.Event()

    async def process(self, msg: QueuedMessage, data: bytes) -> list[RecipientResult]:
        assert data == MSG
        state = {"250": "done", "451": "retry", "550": "failed"}[self.answer[:3]]
        return [RecipientResult(r, state, self.answer) for r in msg.pending]  # type: ignore[arg-type]

    async def notify(self, msg: QueuedMessage, rcpts: Sequence[RecipientResult], data: bytes, action: str) -> None:
        self.notices.append((msg.id, action, tuple(r.address for r in rcpts)))
        self.seen.set()


async def run_once(spool: Spool, recorder: Recorder, msg: QueuedMessage) -> str:
    worker = DeliveryWorker(spool, recorder.process, notify=recorder.notify)
    worker.start()
    worker.enqueue(msg)
    for _ in range(200):
        [entry] = [e for e in spool.entries() if e.id == msg.id]
        if entry.state != "active":
            break
        await asyncio.sleep(0.01)
    await worker.stop()
    return entry.state


def accept(spool: Spool, age: timedelta = timedelta(0)) -> QueuedMessage:
    [msg] = spool.accept_batch([Incoming(new_queue_id(), "a@x.test", ("b@y.test",), MSG, "a@x.test")])
    if age:
        with spool._books.begin() as conn:  # as if it had arrived `age` ago
            conn.execute(update(queue).where(queue.c.id == msg.id).values(created_at=datetime.now(UTC) - age))
        msg = QueuedMessage(msg.id, msg.sender, msg.account, msg.size, msg.created_at - age, 0, msg.pending)
    return msg


async def test_delivered_message_leaves_the_spool(spool: Spool) -> None:
    recorder = Recorder("250 2.0.0 ok")
    msg = accept(spool)
    assert await run_once(spool, recorder, msg) == "done"
    assert not spool.path(msg.id).exists() and recorder.notices == []


async def test_final_failure_sends_a_failure_notice(spool: Spool) -> None:
    recorder = Recorder("550 5.1.1 no such user")
    msg = accept(spool)
    assert await run_once(spool, recorder, msg) == "failed"
    assert recorder.notices == [(msg.id, "failed", ("b@y.test",))]


async def test_late_message_gets_one_delay_notice(spool: Spool) -> None:
    recorder = Recorder("451 4.4.1 peer unreachable")
    assert await run_once(spool, recorder, accept(spool)) == "deferred"
    assert recorder.notices == []  # young: no notice yet
    late = accept(spool, age=timedelta(hours=5))
    assert await run_once(spool, recorder, late) == "deferred"
    assert recorder.notices == [(late.id, "delayed", ("b@y.test",))]
    claimed = {m.id: m for m in spool.claim_due(10, now=datetime.now(UTC) + timedelta(days=1))}
    assert claimed[late.id].delay_notified  # so the next attempts do not send it again


async def test_expired_message_fails_with_a_notice(spool: Spool) -> None:
    recorder = Recorder("451 4.4.1 peer unreachable")
    old = accept(spool, age=timedelta(days=6))
    assert await run_once(spool, recorder, old) == "failed"
    assert recorder.notices == [(old.id, "failed", ("b@y.test",))]


class CountingEvent(asyncio.Event):
    """The worker's wake-up event, counting the turns of its loop (each turn clears it once)."""

    def __init__(self) -> None:
        super().__init__()
        self.turns = 0

    def clear(self) -> None:
        self.turns += 1
        super().clear()


async def test_full_slots_wait_without_spinning(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.delivery.POLL_INTERVAL", 0.01)  # the poll time passes while the slot is busy
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow(msg: QueuedMessage, data: bytes) -> list[RecipientResult]:
        started.set()
        await release.wait()
        return [RecipientResult(r, "done", "250 ok") for r in msg.pending]

    worker = DeliveryWorker(spool, slow, concurrency=1)
    wake = CountingEvent()
    worker._wake = wake
    worker.start()
    worker.enqueue(accept(spool))
    await asyncio.wait_for(started.wait(), 5)
    before = wake.turns
    await asyncio.sleep(0.3)
    assert wake.turns - before <= 2  # a spinning loop turns thousands of times in 0.3 s
    release.set()
    for _ in range(200):
        if all(e.state == "done" for e in spool.entries()):
            break
        await asyncio.sleep(0.01)
    await worker.stop()
    assert [e.state for e in spool.entries()] == ["done"]
