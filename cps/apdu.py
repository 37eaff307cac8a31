"""Command and response APDUs (ISO/IEC 7816-4 §5): encoding, chaining, status words. No I/O.

The channel speaks to anything with `transmit(bytes) -> bytes` (a PC/SC card handle, or a
scripted transport in the unit tests). It does what the card protocol leaves to the host:

- response chaining: SW `61xx` means xx more bytes wait; fetch them with GET RESPONSE
  (`00 C0 00 00 xx`, §7.6.1). CPS3 cards cap one response at 0xE7 bytes (ANS Cryptolib);
- a wrong Le (`6Cxx`) is corrected once by resending with Le = xx (§5.1.3);
- command chaining: data longer than one short APDU is cut in parts, every part but the last
  with bit b5 of CLA set (`CLA | 0x10`, §5.1.1.1), which PSO DECIPHER of a 2048-bit
  cryptogram needs;
- status words become typed errors (`errors.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from cps.errors import (
    ApduError,
    ConditionsNotSatisfied,
    FileNotFound,
    MalformedResponse,
    PinBlocked,
    PinIncorrect,
    ReferencedDataNotFound,
    SecurityStatusNotSatisfied,
)

log = logging.getLogger(__name__)

SW_OK = 0x9000
MAX_SHORT_DATA = 255
CHAIN_BIT = 0x10
INS_GET_RESPONSE = 0xC0
MAX_RESPONSE_TOTAL = 65536  # a card that keeps answering 61xx is broken, not generous


class Transport(Protocol):
    """Sends one C-APDU and returns the R-APDU (data followed by SW1 SW2)."""

    def transmit(self, apdu: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Command:
    """A short command APDU. `le` is the expected length (1..256; 256 is encoded as 00)."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    le: int | None = None

    def __post_init__(self) -> None:
        for name in ("cla", "ins", "p1", "p2"):
            if not 0 <= getattr(self, name) <= 0xFF:
                raise ValueError(f"APDU {name} must be one byte")
        if len(self.data) > MAX_SHORT_DATA:
            raise ValueError(f"short APDU data is at most {MAX_SHORT_DATA} bytes (use chaining)")
        if self.le is not None and not 1 <= self.le <= 256:
            raise ValueError("Le must be 1..256")

    def encode(self) -> bytes:
        """Cases 1-4 of ISO/IEC 7816-3 §12.1.2, short form."""
        out = bytes((self.cla, self.ins, self.p1, self.p2))
        if self.data:
            out += bytes((len(self.data),)) + self.data
        if self.le is not None:
            out += bytes((self.le & 0xFF,))
        return out


@dataclass(frozen=True, slots=True)
class Response:
    data: bytes
    sw: int

    @classmethod
    def decode(cls, raw: bytes) -> Response:
        if len(raw) < 2:
            raise MalformedResponse(f"R-APDU of {len(raw)} bytes has no status word")
        return cls(data=raw[:-2], sw=int.from_bytes(raw[-2:], "big"))


def raise_for_status(sw: int, ins: int) -> None:
    """Turn an error status word into its typed error (ISO/IEC 7816-4 §5.6, tables 5-6)."""
    if sw == SW_OK:
        return
    if sw & 0xFFF0 == 0x63C0:
        raise PinIncorrect(sw, ins, sw & 0x0F)
    if sw == 0x6983:
        raise PinBlocked(sw, ins)
    if sw == 0x6982:
        raise SecurityStatusNotSatisfied(sw, ins)
    if sw == 0x6A82:
        raise FileNotFound(sw, ins)
    if sw == 0x6A88:
        raise ReferencedDataNotFound(sw, ins)
    if sw == 0x6985:
        raise ConditionsNotSatisfied(sw, ins)
    meanings = {
        0x6700: "wrong length", 0x6A80: "incorrect data", 0x6A86: "incorrect P1-P2",
        0x6B00: "wrong parameters", 0x6D00: "instruction not supported", 0x6E00: "class not supported",
        0x6581: "memory failure", 0x6884: "command chaining not supported", 0x6F00: "no precise diagnosis",
    }
    raise ApduError(sw, ins, meanings.get(sw, ""))


class ApduChannel:
    """Sends commands over a `Transport`, following response and command chaining.

    `round_trips` counts the APDUs actually exchanged (the benchmark reports it).
    """

    def __init__(self, transport: Transport, *, max_data: int = MAX_SHORT_DATA) -> None:
        if not 1 <= max_data <= MAX_SHORT_DATA:
            raise ValueError("max_data must be 1..255")
        self._transport = transport
        self._max_data = max_data
        self.round_trips = 0

    def _exchange(self, command: Command) -> Response:
        self.round_trips += 1
        return Response.decode(self._transport.transmit(command.encode()))

    def send(self, command: Command) -> bytes:
        """Send one command (no chaining), collect the whole answer, raise on an error SW."""
        response = self._exchange(command)
        if response.sw & 0xFF00 == 0x6C00:
            response = self._exchange(Command(command.cla, command.ins, command.p1, command.p2, command.data,
                                              le=(response.sw & 0xFF) or 256))
        data = response.data
        while response.sw & 0xFF00 == 0x6100:
            if len(data) > MAX_RESPONSE_TOTAL:
                raise MalformedResponse(f"response chaining beyond {MAX_RESPONSE_TOTAL} bytes")
            response = self._exchange(Command(command.cla & ~CHAIN_BIT & 0xFF, INS_GET_RESPONSE, 0, 0,
                                              le=(response.sw & 0xFF) or 256))
            data += response.data
        raise_for_status(response.sw, command.ins)
        return data

    def send_chained(self, cla: int, ins: int, p1: int, p2: int, data: bytes, le: int | None = None) -> bytes:
        """Send `data` in as many commands as needed (command chaining, §5.1.1.1)."""
        parts = [data[i:i + self._max_data] for i in range(0, len(data), self._max_data)] or [b""]
        for part in parts[:-1]:
            self.send(Command(cla | CHAIN_BIT, ins, p1, p2, part))
        return self.send(Command(cla, ins, p1, p2, parts[-1], le=le))
