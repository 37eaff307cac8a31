"""Card insertion and removal events, as an async iterator fed by a PC/SC watcher thread.

SCardGetStatusChange blocks, so it runs on a thread of its own with its own context; each
change is handed to the loop with `call_soon_threadsafe`. Closing the monitor cancels the
blocking call (SCardCancel) so the thread ends at once. The gateway uses the events to release
messages held for a card (`hold`) once an operator has unlocked the reinserted card.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from cps.errors import CardError, PcscError
from cps.pcsc import PcscContext

log = logging.getLogger(__name__)

_UNKNOWN_READER = 0x80100009  # SCARD_E_UNKNOWN_READER


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """A reader's card state changed (or its first state, when the monitor starts)."""

    reader: str
    present: bool
    atr: bytes


class PresenceMonitor:
    """`async with PresenceMonitor(readers) as m: async for event in m: ...`.

    `readers` None watches every reader pcscd knows, re-listed every `poll` seconds.
    """

    def __init__(self, readers: list[str] | None = None, *, poll: float = 1.0) -> None:
        self._readers = readers
        self._poll = poll
        self._queue: asyncio.Queue[PresenceEvent | BaseException] = asyncio.Queue()
        self._stop = threading.Event()
        self._context: PcscContext | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._context = await self._loop.run_in_executor(None, PcscContext)
        self._thread = threading.Thread(target=self._watch, name="card-presence", daemon=True)
        self._thread.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._stop.set()
        if self._context is not None:
            self._context.cancel()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5.0)
        if self._context is not None:
            self._context.close()

    def __aiter__(self) -> AsyncIterator[PresenceEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[PresenceEvent]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def _emit(self, item: PresenceEvent | BaseException) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _watch(self) -> None:
        assert self._context is not None
        known: dict[str, int] = {}
        present: dict[str, bool] = {}
        try:
            while not self._stop.is_set():
                names = self._readers if self._readers is not None else self._context.readers()
                for name in names:
                    known.setdefault(name, 0)
                for gone in set(known) - set(names):
                    del known[gone]
                if not known:
                    self._stop.wait(self._poll)
                    continue
                try:
                    states = self._context.wait_for_change(known, self._poll)
                except PcscError as exc:
                    if exc.code != _UNKNOWN_READER:
                        raise
                    known.clear()  # a reader was unplugged: list them again after a pause
                    self._stop.wait(self._poll)
                    continue
                for state in states:
                    known[state.name] = state.event
                    if present.get(state.name) != state.present:
                        present[state.name] = state.present
                        log.info("reader %s: card %s", state.name, "inserted" if state.present else "removed")
                        self._emit(PresenceEvent(state.name, state.present, state.atr))
        except CardError as exc:
            if not self._stop.is_set():
                self._emit(exc)
