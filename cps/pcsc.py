"""PC/SC through pyscard: readers, connect, transmit, presence. The only module that imports pyscard.

Everything here blocks: call it from the card's own thread (`worker.py`), never from the event
loop. One `PcscContext` belongs to one thread; only `cancel()` may be called from another one
(PC/SC SCardCancel exists for that). pyscard's low-level `scard` module is used rather than its
object layer so that every SCARD_* return code can be mapped to a typed error.

Sharing: the gateway connects in shared mode and wraps each multi-APDU operation (MSE, PSO
HASH, PSO CDS) in a PC/SC transaction, so that `mssgw card list` can read the card while the
gateway runs without interleaving its APDUs with a signature.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Self

from smartcard import scard

from cps.errors import CardRemoved, NoCardPresent, PcscError, ReaderNotFound

log = logging.getLogger(__name__)

_REMOVED = {
    scard.SCARD_W_REMOVED_CARD, scard.SCARD_W_RESET_CARD, scard.SCARD_W_UNPOWERED_CARD,
    scard.SCARD_W_UNRESPONSIVE_CARD, scard.SCARD_E_READER_UNAVAILABLE, scard.SCARD_E_INVALID_HANDLE,
}
_NO_CARD = {scard.SCARD_E_NO_SMARTCARD}
_SCARD_PRESENT = 0x0004  # pcsc-lite's SCardStatus card-state bit (pyscard does not export it)
# pcscd learns of a removal by polling the reader (every 400 ms for vpcd): an R-APDU cut short by the removal
# can come back before pcscd's state says the card has gone.
_REMOVAL_NOTICE_SECONDS = 2.0
_REMOVAL_POLL_SECONDS = 0.05


def _u32(code: int) -> int:
    return code & 0xFFFFFFFF


def _check(operation: str, hresult: int, reader: str | None = None) -> None:
    code = _u32(hresult)
    if code == scard.SCARD_S_SUCCESS:
        return
    if reader is not None:
        if code in _REMOVED:
            raise CardRemoved(reader)
        if code in _NO_CARD:
            raise NoCardPresent(reader)
        if code == scard.SCARD_E_UNKNOWN_READER:
            raise ReaderNotFound(reader)
    raise PcscError(operation, code, scard.SCardGetErrorMessage(hresult))


@dataclass(frozen=True, slots=True)
class ReaderState:
    """A reader as PC/SC sees it; `event` is the raw SCARD_STATE_* mask (changes counter in bits 16+)."""

    name: str
    present: bool
    atr: bytes
    event: int = 0


class PcscCard:
    """A connected card: a `Transport` for `apdu.ApduChannel`."""

    def __init__(self, context: PcscContext, reader: str, handle: int, protocol: int) -> None:
        self._context = context
        self.reader = reader
        self._handle = handle
        self._protocol = protocol
        self._closed = False

    @property
    def atr(self) -> bytes:
        hresult, _reader, _state, _protocol, atr = scard.SCardStatus(self._handle)
        _check("SCardStatus", hresult, self.reader)
        return bytes(atr)

    def transmit(self, apdu: bytes) -> bytes:
        pci = scard.SCARD_PCI_T1 if self._protocol == scard.SCARD_PROTOCOL_T1 else scard.SCARD_PCI_T0
        hresult, response = scard.SCardTransmit(self._handle, pci, list(apdu))
        _check("SCardTransmit", hresult, self.reader)
        if len(response) < 2:
            # Every R-APDU ends with SW1 SW2; vpcd answers "nothing" when the card went away mid-command.
            self._raise_if_gone()
        return bytes(response)

    def _raise_if_gone(self) -> None:
        """Raise `CardRemoved` if the card goes from the reader within the time pcscd takes to notice."""
        deadline = time.monotonic() + _REMOVAL_NOTICE_SECONDS
        while True:
            hresult, _reader, state, _protocol, _atr = scard.SCardStatus(self._handle)
            _check("SCardStatus", hresult, self.reader)
            if not state & _SCARD_PRESENT:
                raise CardRemoved(self.reader)
            if time.monotonic() >= deadline:
                return
            time.sleep(_REMOVAL_POLL_SECONDS)

    def begin_transaction(self) -> None:
        """Exclusive use of the card for a sequence of APDUs (SCardBeginTransaction)."""
        _check("SCardBeginTransaction", scard.SCardBeginTransaction(self._handle), self.reader)

    def end_transaction(self) -> None:
        hresult = scard.SCardEndTransaction(self._handle, scard.SCARD_LEAVE_CARD)
        if _u32(hresult) not in (scard.SCARD_S_SUCCESS, *_REMOVED):
            log.warning("SCardEndTransaction on %s: %s", self.reader, scard.SCardGetErrorMessage(hresult))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.begin_transaction()
        try:
            yield
        finally:
            self.end_transaction()

    def disconnect(self, *, reset: bool) -> None:
        """Release the card. `reset=True` powers it off, which forgets a presented PIN."""
        if self._closed:
            return
        self._closed = True
        disposition = scard.SCARD_RESET_CARD if reset else scard.SCARD_LEAVE_CARD
        hresult = scard.SCardDisconnect(self._handle, disposition)
        if _u32(hresult) not in (scard.SCARD_S_SUCCESS, *_REMOVED):
            log.warning("SCardDisconnect on %s: %s", self.reader, scard.SCardGetErrorMessage(hresult))


class PcscContext:
    """A PC/SC resource-manager context (SCardEstablishContext)."""

    def __init__(self) -> None:
        hresult, self._context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        _check("SCardEstablishContext", hresult)
        self._closed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def readers(self) -> list[str]:
        hresult, readers = scard.SCardListReaders(self._context, [])
        if _u32(hresult) == scard.SCARD_E_NO_READERS_AVAILABLE:
            return []
        _check("SCardListReaders", hresult)
        return list(readers)

    def states(self, readers: list[str] | None = None) -> list[ReaderState]:
        """The current state of each reader (no waiting)."""
        names = self.readers() if readers is None else readers
        if not names:
            return []
        return self.wait_for_change({name: scard.SCARD_STATE_UNAWARE for name in names}, timeout=0.0)

    def wait_for_change(self, known: dict[str, int], timeout: float) -> list[ReaderState]:
        """Block until a reader's state differs from `known` (SCardGetStatusChange) or `timeout` passes.

        Returns the new states, or [] on timeout or cancel. `known` maps reader names to the
        last `event` seen (0 = unaware: answer at once).
        """
        request = [(name, state & ~scard.SCARD_STATE_CHANGED) for name, state in known.items()]
        hresult, result = scard.SCardGetStatusChange(self._context, int(timeout * 1000), request)
        if _u32(hresult) in (scard.SCARD_E_TIMEOUT, scard.SCARD_E_CANCELLED):
            return []
        _check("SCardGetStatusChange", hresult)
        return [ReaderState(name=name, present=bool(event & scard.SCARD_STATE_PRESENT)
                            and not event & scard.SCARD_STATE_MUTE, atr=bytes(atr), event=event)
                for name, event, atr in result]

    def cancel(self) -> None:
        """Wake a `wait_for_change` blocked in another thread."""
        scard.SCardCancel(self._context)

    def connect(self, reader: str) -> PcscCard:
        """Connect in shared mode with T=0 or T=1 (CPS3 contact cards speak T=0)."""
        hresult, handle, protocol = scard.SCardConnect(
            self._context, reader, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1)
        _check("SCardConnect", hresult, reader)
        log.debug("connected to %s (protocol %d)", reader, protocol)
        return PcscCard(self, reader, handle, protocol)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            scard.SCardReleaseContext(self._context)
