"""The durable spool: message bytes are immutable files, their state is a row in SQL.

A message is acknowledged only after (DESIGN.md, "The spool"; the order Postfix and mox use):
temp file written and fsynced → linked into `msg/` → directory fsynced → row committed.
A crash before the commit leaves an orphan file and no acknowledgement (the file is
removed at the next start); a crash after it leaves a row whose message is delivered after
restart. States: incoming → active → done | deferred | failed (| hold, for later issues).

Delivery is at least once: a crash after the mailbox's (or the peer's) `250` and before the
result is committed repeats that delivery. To let the worker avoid it, each attempt leaves an
empty marker `inflight/<id>` from its start to its recorded result (no fsync: a process crash
keeps it, a power cut loses it and only costs a duplicate); recovery flags the rows it finds
marked `interrupted`, and the pipeline asks the mailbox whether it already holds such a message.

Concurrent arrivals share their durability work (group commit, as databases do): each
message's file is written and fsynced on its own, but one directory fsync and one SQL commit
cover the whole batch, so eight clients do not pay eight times for what one flush guarantees.

Every method of `Spool` blocks (disk, SQL): async callers run them in a thread, or go
through `GroupCommitter`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    delete,
    false,
    func,
    insert,
    select,
    update,
)

from gateway.db import metadata
from gateway.errors import GatewayError

log = logging.getLogger(__name__)

State = Literal["incoming", "active", "deferred", "hold", "done", "failed"]
# Where a message came from, which decides what the worker does with it: mail a local client
# submitted (signed, encrypted and relayed to other gateways; plain to local mailboxes), or mail
# a peer gateway handed us (decrypted, verified, marked, delivered).
Direction = Literal["submission", "inbound"]
RecipientState = Literal["pending", "done", "failed"]
Outcome = Literal["done", "failed", "retry"]  # of one delivery attempt, for one recipient

queue = Table(
    "queue",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("state", String(16), nullable=False, index=True),
    Column("sender", String(320), nullable=False),
    Column("account", String(320), nullable=True),
    Column("direction", String(16), nullable=False, server_default="submission"),
    Column("size", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, index=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=True),
    Column("delay_notified", Boolean, nullable=False, server_default=false()),
    # An attempt was in progress when the gateway died: its delivery may have happened (see the module docstring).
    Column("interrupted", Boolean, nullable=False, server_default=false()),
)

queue_recipients = Table(
    "queue_recipients",
    metadata,
    Column("queue_id", String(32), ForeignKey("queue.id", ondelete="CASCADE"), primary_key=True),
    Column("address", String(320), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("reply", Text, nullable=True),
)

# The retry schedule (DESIGN.md): the delay before attempt n+1 after n failed attempts,
# each with ±10 % jitter so that a burst of deferred mail does not retry in lockstep.
RETRY_SCHEDULE: tuple[timedelta, ...] = (
    timedelta(minutes=5), timedelta(minutes=15), timedelta(minutes=30), timedelta(hours=1),
    timedelta(hours=2), timedelta(hours=4), timedelta(hours=8), timedelta(hours=16),
)
MAX_QUEUE_LIFETIME = timedelta(days=5)
# A sender hears that a message is late once, after this long (DESIGN.md: delay DSN after 4h).
DELAY_NOTICE_AFTER = timedelta(hours=4)


class SpoolError(GatewayError):
    """The spool cannot store or read a message."""


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    id: str
    sender: str
    account: str | None
    size: int
    created_at: datetime
    attempts: int
    pending: tuple[str, ...]
    """Recipients not yet delivered nor failed."""
    direction: Direction = "submission"
    delay_notified: bool = False
    interrupted: bool = False
    """A delivery attempt was cut by a crash: a recipient may already have its copy."""


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """What an operator sees of a queued message (never its content)."""

    id: str
    state: str
    sender: str
    account: str | None
    size: int
    created_at: datetime
    next_attempt_at: datetime
    attempts: int
    last_error: str | None
    recipients: tuple[tuple[str, str, str | None], ...]
    """(address, state, last reply) for each recipient."""


@dataclass(frozen=True, slots=True)
class RecipientResult:
    address: str
    state: Outcome
    reply: str


def next_delay(attempts: int, rng: random.Random | None = None) -> timedelta:
    """The wait after `attempts` failed attempts, jittered."""
    base = RETRY_SCHEDULE[min(attempts, len(RETRY_SCHEDULE)) - 1]
    return base * (rng or random).uniform(0.9, 1.1)


def new_queue_id() -> str:
    """Sortable by arrival (hex seconds) and unguessable (40 random bits)."""
    return f"{int(time.time()):08X}{secrets.token_hex(5).upper()}"


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message to accept: what the SMTP session gathered, and the queue id it announced
    (in its trace header) and will answer with."""

    id: str
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    account: str | None
    direction: Direction = "submission"


class Spool:
    """The queue: files under `directory`, rows in SQL.

    `engine` must be durable (it records acceptances); `bookkeeping` may be the relaxed engine
    of gateway.db for claims and delivery results (by default the same engine).
    """

    def __init__(self, directory: Path, engine: Engine, bookkeeping: Engine | None = None) -> None:
        self._dir = directory
        self._tmp = directory / "tmp"
        self._msg = directory / "msg"
        self._inflight = directory / "inflight"
        self._engine = engine
        self._books = bookkeeping or engine
        self._writers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="spool-fsync")
        for d in (directory, self._tmp, self._msg, self._inflight):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)

    def path(self, queue_id: str) -> Path:
        return self._msg / queue_id

    def accept(self, sender: str, recipients: Sequence[str], data: bytes, *, account: str | None) -> str:
        """Store one message durably (state `incoming`) and return its queue id. Only then may the caller say 250."""
        return self.accept_batch([Incoming(new_queue_id(), sender, tuple(recipients), data, account)],
                                 state="incoming")[0].id

    def accept_batch(self, batch: Sequence[Incoming], *, state: Literal["incoming", "active"] = "active"
                     ) -> list[QueuedMessage]:
        """Store messages durably, sharing one directory fsync and one commit.

        Each file: written to tmp/ and fsynced, then linked into msg/ (in parallel: the device
        merges concurrent flushes). Then msg/ is fsynced once and every row committed at once.
        By default the rows are born `active`: the caller hands them straight to the delivery
        worker, and a crash before their delivery puts them back (`recover`).
        """
        ids = [m.id for m in batch]
        written = list(self._writers.map(self._write_file, ids, [m.data for m in batch]))
        failed = [exc for exc in written if exc is not None]
        if failed:
            for qid in ids:
                self.path(qid).unlink(missing_ok=True)
            raise SpoolError(f"cannot write the message to the spool: {failed[0]}")
        now = datetime.now(UTC)
        try:
            _fsync_dir(self._msg)
            with self._engine.begin() as conn:
                conn.execute(insert(queue), [
                    {"id": qid, "state": state, "sender": m.sender, "account": m.account, "direction": m.direction,
                     "size": len(m.data), "created_at": now, "next_attempt_at": now, "attempts": 0}
                    for qid, m in zip(ids, batch)])
                conn.execute(insert(queue_recipients), [
                    {"queue_id": qid, "address": r, "state": "pending"}
                    for qid, m in zip(ids, batch) for r in m.recipients])
        except Exception:
            for qid in ids:
                self.path(qid).unlink(missing_ok=True)
            raise
        return [QueuedMessage(qid, m.sender, m.account, len(m.data), now, 0, m.recipients, m.direction)
                for qid, m in zip(ids, batch)]

    def _write_file(self, queue_id: str, data: bytes) -> OSError | None:
        tmp = self._tmp / queue_id
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, self.path(queue_id))
            os.unlink(tmp)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            return exc
        return None

    def read(self, queue_id: str) -> bytes:
        try:
            return self.path(queue_id).read_bytes()
        except OSError as exc:
            raise SpoolError(f"queue file {queue_id} cannot be read: {exc}") from exc

    def begin_attempt(self, queue_id: str) -> bytes:
        """The message's bytes, for a delivery attempt that is starting: marked in flight until `record`, `hold` or
        `release_active` ends it, so that a crash meanwhile flags the message `interrupted` at recovery."""
        os.close(os.open(self._inflight / queue_id, os.O_WRONLY | os.O_CREAT, 0o600))
        return self.read(queue_id)

    def _end_attempt(self, queue_id: str) -> None:
        (self._inflight / queue_id).unlink(missing_ok=True)

    def recover(self) -> tuple[int, int]:
        """At start-up: put back messages a crash left `active` (flagging `interrupted` those whose attempt was in
        flight), remove never-acknowledged files.

        Returns (requeued, orphans removed).
        """
        cut = [f.name for f in self._inflight.iterdir()]
        with self._engine.begin() as conn:
            if cut:
                conn.execute(update(queue).where(queue.c.id.in_(cut), queue.c.state == "active")
                             .values(interrupted=True))
            requeued = conn.execute(update(queue).where(queue.c.state == "active")
                                    .values(state="incoming")).rowcount
            known = {r.id for r in conn.execute(select(queue.c.id).where(
                queue.c.state.in_(("incoming", "deferred", "hold"))))}
        for name in cut:
            (self._inflight / name).unlink(missing_ok=True)
        orphans = 0
        present = set()
        for d in (self._tmp, self._msg):
            for f in d.iterdir():
                if d is self._tmp or f.name not in known:
                    f.unlink(missing_ok=True)
                    orphans += 1
                else:
                    present.add(f.name)
        finished = known - present
        if finished:
            # A file goes only after every recipient's final answer; a row still open without
            # its file is one whose "finished" mark a power cut undid (relaxed bookkeeping).
            with self._books.begin() as conn:
                conn.execute(update(queue).where(queue.c.id.in_(finished)).values(state="done"))
            log.warning("spool recovery: %d message(s) already delivered, marked done", len(finished))
        if requeued or orphans:
            log.info("spool recovery: %d message(s) requeued (%d cut in the middle of an attempt), %d unacknowledged "
                     "file(s) removed", requeued, len(cut), orphans)
        return requeued, orphans

    def claim_due(self, limit: int, now: datetime | None = None) -> list[QueuedMessage]:
        """Mark up to `limit` due messages `active` and return them, oldest first."""
        now = now or datetime.now(UTC)
        with self._books.begin() as conn:
            ids = [r.id for r in conn.execute(
                select(queue.c.id)
                .where(queue.c.state.in_(("incoming", "deferred")), queue.c.next_attempt_at <= now)
                .order_by(queue.c.next_attempt_at, queue.c.id)
                .limit(limit)
                .with_for_update(skip_locked=True))]
            if not ids:
                return []
            conn.execute(update(queue).where(queue.c.id.in_(ids)).values(state="active"))
            rows = conn.execute(select(queue).where(queue.c.id.in_(ids))).all()
            pending: dict[str, list[str]] = {i: [] for i in ids}
            for r in conn.execute(select(queue_recipients.c.queue_id, queue_recipients.c.address).where(
                    queue_recipients.c.queue_id.in_(ids), queue_recipients.c.state == "pending")
                    .order_by(queue_recipients.c.address)):
                pending[r.queue_id].append(r.address)
        by_id = {r.id: r for r in rows}
        return [QueuedMessage(i, by_id[i].sender, by_id[i].account, by_id[i].size, _utc(by_id[i].created_at),
                              by_id[i].attempts, tuple(pending[i]), by_id[i].direction,
                              bool(by_id[i].delay_notified), bool(by_id[i].interrupted)) for i in ids]

    def record(self, msg: QueuedMessage, results: Sequence[RecipientResult], now: datetime | None = None) -> State:
        """Write the outcome of one attempt; returns the message's new state.

        Recipients that got a final answer are marked at once; if any must be retried the
        message is `deferred` (or `failed` past its lifetime). Once every recipient has its
        final answer the message is `done` (all delivered) or `failed` (some were not), and
        only then is its file removed.
        """
        now = now or datetime.now(UTC)
        retry = [r for r in results if r.state == "retry"]
        attempts = msg.attempts + 1
        expired = now - msg.created_at >= MAX_QUEUE_LIFETIME
        state: State
        if not retry:
            state = "done"
        elif expired:
            state = "failed"
        else:
            state = "deferred"
        with self._books.begin() as conn:
            for r in results:
                final: RecipientState | None = {"done": "done", "failed": "failed"}.get(r.state)  # type: ignore[assignment]
                if final is None and expired:
                    final = "failed"
                values: dict[str, object] = {"reply": r.reply}
                if final is not None:
                    values["state"] = final
                conn.execute(update(queue_recipients).where(
                    queue_recipients.c.queue_id == msg.id, queue_recipients.c.address == r.address).values(**values))
            may_have_failed = msg.attempts > 0 or any(r.state == "failed" for r in results)
            if state == "done" and may_have_failed and conn.execute(select(func.count()).where(
                    queue_recipients.c.queue_id == msg.id, queue_recipients.c.state == "failed")).scalar_one():
                state = "failed"  # finished, but a recipient could not be delivered: a DSN is due
            last_error = "; ".join(f"{r.address}: {r.reply}" for r in results if r.state != "done") or None
            conn.execute(update(queue).where(queue.c.id == msg.id).values(
                state=state, attempts=attempts, last_error=last_error,
                next_attempt_at=now + next_delay(attempts) if state == "deferred" else now))
        self._end_attempt(msg.id)
        if state in ("done", "failed"):
            # No directory fsync: should the unlink be lost, recovery removes the file of a finished row.
            self.path(msg.id).unlink(missing_ok=True)
        return state

    def give_back(self, queue_ids: Sequence[str]) -> None:
        """Messages made durable whose session went away before handing them to the worker: `incoming` again, for
        the worker's next poll (else they would wait, `active` and owned by no one, for the next restart)."""
        with self._books.begin() as conn:
            n = conn.execute(update(queue).where(queue.c.id.in_(list(queue_ids)), queue.c.state == "active")
                             .values(state="incoming")).rowcount
        log.info("%d message(s) stored after their client left, back in the queue", n)

    def release_active(self, queue_id: str) -> None:
        """Give a claimed message back untouched (shutdown in the middle of an attempt)."""
        with self._books.begin() as conn:
            conn.execute(update(queue).where(queue.c.id == queue_id, queue.c.state == "active")
                         .values(state="incoming"))
        self._end_attempt(queue_id)

    def mark_delay_notified(self, queue_id: str) -> None:
        with self._books.begin() as conn:
            conn.execute(update(queue).where(queue.c.id == queue_id).values(delay_notified=True))

    def hold(self, queue_id: str, reason: str) -> None:
        """Park an active message until an operator or a returning card releases it (DESIGN.md: `hold`)."""
        with self._books.begin() as conn:
            conn.execute(update(queue).where(queue.c.id == queue_id, queue.c.state == "active")
                         .values(state="hold", last_error=reason))
        self._end_attempt(queue_id)

    # --- operator actions (`mssgw queue ...`); each names the states it applies to --------------------------------

    def entries(self, states: Sequence[str] | None = None) -> list[QueueEntry]:
        """Messages in the queue, oldest first, with their recipients."""
        with self._engine.connect() as conn:
            q = select(queue).order_by(queue.c.created_at, queue.c.id)
            if states:
                q = q.where(queue.c.state.in_(tuple(states)))
            rows = conn.execute(q).all()
            rcpts: dict[str, list[tuple[str, str, str | None]]] = {r.id: [] for r in rows}
            if rows:
                for r in conn.execute(select(queue_recipients).where(queue_recipients.c.queue_id.in_(list(rcpts)))
                                      .order_by(queue_recipients.c.address)):
                    rcpts[r.queue_id].append((r.address, r.state, r.reply))
        return [QueueEntry(r.id, r.state, r.sender, r.account, r.size, _utc(r.created_at), _utc(r.next_attempt_at),
                           r.attempts, r.last_error, tuple(rcpts[r.id])) for r in rows]

    def release(self, queue_id: str) -> bool:
        """Send a held or deferred message on its way now. False if it is in neither state."""
        return self._operator_update(queue_id, ("hold", "deferred"), state="incoming")

    def delete(self, queue_id: str) -> bool:
        """Remove a waiting message (row and file). False if unknown or being delivered right now."""
        with self._books.begin() as conn:
            gone = conn.execute(delete(queue).where(queue.c.id == queue_id,
                                                    queue.c.state.in_(("incoming", "deferred", "hold")))).rowcount
        if gone:
            self.path(queue_id).unlink(missing_ok=True)
            log.info("deleted from the queue by an operator")
        return bool(gone)

    def _operator_update(self, queue_id: str, states: tuple[str, ...], **values: object) -> bool:
        with self._books.begin() as conn:
            done = conn.execute(update(queue).where(queue.c.id == queue_id, queue.c.state.in_(states))
                                .values(next_attempt_at=datetime.now(UTC), **values)).rowcount
        return bool(done)

    def purge_done(self, older_than: timedelta, now: datetime | None = None) -> int:
        """Forget finished messages (done or failed) after a while; their files are already gone."""
        cutoff = (now or datetime.now(UTC)) - older_than
        with self._books.begin() as conn:
            return conn.execute(delete(queue).where(queue.c.state.in_(("done", "failed")),
                                                    queue.c.created_at < cutoff)).rowcount


def _utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; every time here is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupCommitter:
    """Gathers the accepts of concurrent SMTP sessions into batches for `Spool.accept_batch`.

    While one batch is being made durable, new arrivals wait and form the next one; a lone
    client pays no added latency (its batch starts at once).

    A session cancelled while it waits (its client disconnected, or was cut by a crash of the peer
    gateway) must not strand its message: one not yet written is dropped (no `250` was sent), one
    already durable is given back to the queue, since the session will not hand it to the worker.
    """

    def __init__(self, spool: Spool, max_batch: int = 64) -> None:
        self._spool = spool
        self._max_batch = max_batch
        self._pending: list[tuple[Incoming, asyncio.Future[QueuedMessage]]] = []
        self._drainer: asyncio.Task[None] | None = None
        self._giving_back: set[asyncio.Task[None]] = set()

    async def accept(self, message: Incoming) -> QueuedMessage:
        """Store `message` durably (born `active`, for the caller to hand to the worker)."""
        future: asyncio.Future[QueuedMessage] = asyncio.get_running_loop().create_future()
        self._pending.append((message, future))
        if self._drainer is None:
            # Keep the task referenced: the loop holds tasks only weakly.
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        try:
            return await future
        except asyncio.CancelledError:
            # Stored, but cancelled before resuming with the result: nobody else will hand it on.
            if future.done() and not future.cancelled() and future.exception() is None:
                task = asyncio.get_running_loop().create_task(self._give_back([future.result().id]))
                self._giving_back.add(task)
                task.add_done_callback(self._giving_back.discard)
            raise

    async def _give_back(self, queue_ids: list[str]) -> None:
        try:
            await asyncio.to_thread(self._spool.give_back, queue_ids)
        except Exception:
            log.exception("cannot give %d abandoned message(s) back to the queue; they wait for the next restart",
                          len(queue_ids))

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch:]
                batch = [(m, fut) for m, fut in batch if not fut.cancelled()]  # clients gone before any 250
                if not batch:
                    continue
                try:
                    queued = await asyncio.to_thread(self._spool.accept_batch, [m for m, _ in batch])
                except Exception as exc:  # noqa: BLE001 - every waiting session answers 451
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                else:
                    abandoned = []
                    for (_, fut), msg in zip(batch, queued):
                        if fut.cancelled():
                            abandoned.append(msg.id)
                        elif not fut.done():
                            fut.set_result(msg)
                    if abandoned:
                        await self._give_back(abandoned)
        finally:
            self._drainer = None
