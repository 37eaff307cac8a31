"""The worker after the queue: delivers queued messages to the local mailboxes over LMTP
(RFC 2033), one reply per recipient.

Fresh mail is handed over in memory by the receiver (its row is born `active`), so the
common path costs no query; the database is polled for what is due again (`deferred`) or was
left over by a crash (`recover` makes it `incoming`). A recipient is marked delivered only on
its own `250`; a 4xx (or a connection failure) defers it on the spool's retry schedule; a 5xx
fails it. The spool file goes only when every recipient has its final answer. Later issues
add signing/encryption and the relay to other gateways here, before the delivery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

from gateway.errors import HoldMessage
from gateway.logsetup import queue_id
from gateway.spool import DELAY_NOTICE_AFTER, QueuedMessage, RecipientResult, Spool

log = logging.getLogger(__name__)

# process(message, its bytes) -> one result per pending recipient (gateway.pipeline.Pipeline.process)
Process = Callable[[QueuedMessage, bytes], Awaitable[list[RecipientResult]]]
# notify(message, recipients, its bytes, "failed" | "delayed"): the failure DSN, or the delay DSN sent once
Notify = Callable[[QueuedMessage, Sequence[RecipientResult], bytes, str], Awaitable[None]]

# How often the database is asked for due messages when nothing else wakes the worker.
POLL_INTERVAL = 2.0
# Rows of finished messages are kept a week (for `queue` commands and DSN questions), then purged hourly.
KEEP_FINISHED = timedelta(days=7)
PURGE_INTERVAL = 3600.0


class DeliveryWorker:
    def __init__(self, spool: Spool, process: Process, *, notify: Notify | None = None,
                 concurrency: int = 4) -> None:
        self._spool = spool
        self._process = process
        self._notify = notify
        self._concurrency = max(1, concurrency)
        self._ready: deque[QueuedMessage] = deque()
        self._wake = asyncio.Event()
        self._poll_due = True  # at start: whatever recovery left
        self._stopping = False
        self._inflight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    def enqueue(self, msg: QueuedMessage) -> None:
        """A message the receiver just spooled (born `active`): deliver it as soon as a slot is free."""
        self._ready.append(msg)
        self._wake.set()

    def poll_now(self) -> None:
        """Ask the database for due messages at once (an operator released or retried some)."""
        self._poll_due = True
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="delivery-worker")

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop starting attempts; let those in flight finish (bounded) so none is cut in half;
        give the messages not yet started back to the queue."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._inflight:
            _, pending = await asyncio.wait(self._inflight, timeout=timeout)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        while self._ready:
            await asyncio.to_thread(self._spool.release_active, self._ready.popleft().id)

    async def _run(self) -> None:
        next_poll = 0.0
        next_purge = time.monotonic() + PURGE_INTERVAL
        while not self._stopping:
            if time.monotonic() >= next_purge:
                next_purge = time.monotonic() + PURGE_INTERVAL
                try:
                    await asyncio.to_thread(self._spool.purge_done, KEEP_FINISHED)
                except Exception:
                    log.exception("cannot purge finished messages")
            self._wake.clear()
            while self._ready and len(self._inflight) < self._concurrency:
                self._launch(self._ready.popleft())
            free = self._concurrency - len(self._inflight)
            if free > 0 and (self._poll_due or time.monotonic() >= next_poll):
                self._poll_due = False
                next_poll = time.monotonic() + POLL_INTERVAL
                try:
                    claimed = await asyncio.to_thread(self._spool.claim_due, free)
                except Exception:
                    log.exception("cannot read the queue; trying again shortly")
                    claimed = []
                for msg in claimed:
                    self._launch(msg)
                if len(claimed) == free:
                    self._poll_due = True  # there may be more: ask again when a slot frees
            if self._stopping:
                break
            # Every slot busy: only a finished attempt (or stop, or a poll request) can give work, and each sets
            # `_wake`. Waiting for the next poll instead spun the loop once that time had passed (mail enqueued
            # straight from the receivers never polls), a timeout of 0 per turn for as long as the slots stayed full.
            full = len(self._inflight) >= self._concurrency
            try:
                await asyncio.wait_for(self._wake.wait(),
                                       timeout=None if full else max(0.0, next_poll - time.monotonic()))
            except TimeoutError:
                pass

    def _launch(self, msg: QueuedMessage) -> None:
        task = asyncio.create_task(self._attempt(msg), name=f"deliver-{msg.id}")
        self._inflight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()

    async def _attempt(self, msg: QueuedMessage) -> None:
        queue_id.set(msg.id)
        data = b""
        try:
            data = await asyncio.to_thread(self._spool.begin_attempt, msg.id)  # marked in flight until recorded
            results = await self._process(msg, data) if msg.pending else []
        except asyncio.CancelledError:
            await asyncio.to_thread(self._spool.release_active, msg.id)
            raise
        except HoldMessage as exc:
            log.warning("message held: %s", exc.reason)
            await asyncio.to_thread(self._spool.hold, msg.id, exc.reason)
            return
        except Exception as exc:  # noqa: BLE001 - whatever failed, the message waits for its next attempt
            log.warning("delivery attempt failed: %s", exc)
            results = [RecipientResult(r, "retry", f"451 4.4.1 {exc}") for r in msg.pending]
        try:
            state = await asyncio.to_thread(self._spool.record, msg, results)
        except Exception:
            log.exception("cannot record the delivery results; the message stays queued")
            return
        for r in results:
            log.info("to=<%s> status=%s reply=%r", r.address, r.state, r.reply)
        log.info("message %s", state)
        failed = [r for r in results if r.state == "failed" or (state == "failed" and r.state == "retry")]
        late = [r for r in results if r.state == "retry"] if state == "deferred" and not msg.delay_notified \
            and datetime.now(UTC) - msg.created_at >= DELAY_NOTICE_AFTER else []
        if self._notify is None:
            return
        try:
            if failed:
                await self._notify(msg, failed, data, "failed")
            if late:
                await self._notify(msg, late, data, "delayed")
                await asyncio.to_thread(self._spool.mark_delay_notified, msg.id)
        except Exception:
            log.exception("cannot send the delivery status notice")
