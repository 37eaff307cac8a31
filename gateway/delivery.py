"""The worker after the queue: takes due messages from the spool and delivers them to the
local mailboxes over LMTP (RFC 2033), one reply per recipient.

A recipient is marked delivered only on its own `250`; a 4xx (or a connection failure)
defers it on the spool's retry schedule; a 5xx fails it. The spool file goes only when
every recipient has its final answer. Later issues add signing/encryption and the relay
to other gateways here, between the claim and the delivery.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from gateway.logsetup import queue_id
from gateway.spool import QueuedMessage, RecipientResult, Spool

log = logging.getLogger(__name__)

# deliver(sender, recipients, message) -> {recipient: (code, reply text)}
Deliver = Callable[[str, Sequence[str], bytes], Awaitable[dict[str, tuple[int, str]]]]

_IDLE_POLL = 5.0


class DeliveryWorker:
    def __init__(self, spool: Spool, deliver: Deliver, *, concurrency: int = 4) -> None:
        self._spool = spool
        self._deliver = deliver
        self._concurrency = max(1, concurrency)
        self._wake = asyncio.Event()
        self._stopping = False
        self._inflight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    def wake(self, _qid: str | None = None) -> None:
        """Called when a message was queued: look at the spool now instead of at the next poll."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="delivery-worker")

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming; let the attempts in flight finish (bounded), so none is cut in half."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._inflight:
            done, pending = await asyncio.wait(self._inflight, timeout=timeout)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            free = self._concurrency - len(self._inflight)
            claimed: list[QueuedMessage] = []
            if free > 0:
                try:
                    claimed = await asyncio.to_thread(self._spool.claim_due, free)
                except Exception:
                    log.exception("cannot read the queue; retrying shortly")
            for msg in claimed:
                task = asyncio.create_task(self._attempt(msg), name=f"deliver-{msg.id}")
                self._inflight.add(task)
                task.add_done_callback(self._done)
            if claimed and len(claimed) == free:
                continue
            await self._sleep_until_due()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()

    async def _sleep_until_due(self) -> None:
        timeout = _IDLE_POLL
        try:
            due = await asyncio.to_thread(self._spool.next_due)
        except Exception:
            due = None
        if due is not None:
            timeout = min(timeout, max(0.0, (due - datetime.now(UTC)).total_seconds()))
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=timeout)
        except TimeoutError:
            pass

    async def _attempt(self, msg: QueuedMessage) -> None:
        queue_id.set(msg.id)
        try:
            results = await self._deliver_once(msg)
        except asyncio.CancelledError:
            await asyncio.to_thread(self._spool.release_active, msg.id)
            raise
        state = await asyncio.to_thread(self._spool.record, msg, results)
        for r in results:
            log.info("to=<%s> status=%s reply=%r", r.address, r.state, r.reply)
        log.info("message %s", state)

    async def _deliver_once(self, msg: QueuedMessage) -> list[RecipientResult]:
        if not msg.pending:
            return []
        try:
            data = await asyncio.to_thread(self._spool.read, msg.id)
            replies = await self._deliver(msg.sender, msg.pending, data)
        except Exception as exc:
            log.warning("delivery attempt failed: %s", exc)
            return [RecipientResult(r, "retry", f"451 4.4.1 {exc}") for r in msg.pending]
        results = []
        for rcpt in msg.pending:
            code, text = replies.get(rcpt, (451, "4.4.0 no reply for this recipient"))
            state = "done" if 200 <= code < 300 else "retry" if code < 500 else "failed"
            results.append(RecipientResult(rcpt, state, f"{code} {text}"))
        return results
