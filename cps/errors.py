"""Errors of the card layer: each carries the data an operator or the queue needs.

`hold` says what the queue should do with a message whose signature or decryption failed on
this error: True means "keep it in state `hold` until the card or an operator is back" (card
removed, PIN not presented, PIN blocked); False means the operation itself is wrong and
retrying it will not help.
"""

from __future__ import annotations


class CardError(Exception):
    """Base class of the errors of cps/."""

    hold = False


class PcscError(CardError):
    """The PC/SC service failed (pcscd not running, context lost). `code` is the SCARD_* value."""

    hold = True

    def __init__(self, operation: str, code: int, message: str) -> None:
        self.operation = operation
        self.code = code
        super().__init__(f"PC/SC {operation} failed: {message} (0x{code & 0xFFFFFFFF:08X})")


class ReaderNotFound(CardError):
    """No reader of that name is known to pcscd."""

    hold = True

    def __init__(self, reader: str) -> None:
        self.reader = reader
        super().__init__(f"no smart-card reader named {reader!r}")


class NoCardPresent(CardError):
    """The reader is there but holds no card."""

    hold = True

    def __init__(self, reader: str) -> None:
        self.reader = reader
        super().__init__(f"no card in reader {reader!r}")


class CardRemoved(CardError):
    """The card was removed (or reset by another process) during or since the last operation.

    A reinserted card has lost its security state: the PIN must be presented again.
    """

    hold = True

    def __init__(self, reader: str) -> None:
        self.reader = reader
        super().__init__(f"the card in reader {reader!r} was removed or reset")


class CardTimeout(CardError):
    """The card did not answer an operation in time; the card thread may still be busy."""

    hold = True

    def __init__(self, operation: str, seconds: float) -> None:
        self.operation = operation
        self.seconds = seconds
        super().__init__(f"card operation {operation!r} did not finish within {seconds:g} s")


class NotACpsCard(CardError):
    """The ATR matches no CPS card this host drives (CPS3, contact interface)."""

    def __init__(self, atr: bytes) -> None:
        self.atr = atr
        super().__init__(f"not a supported CPS card (ATR {atr.hex(' ').upper()})")


class WrongIssuer(CardError):
    """EF.SN.ICC does not carry the ANS issuer identifier 80 25 00 00 01."""

    def __init__(self, issuer: bytes) -> None:
        self.issuer = issuer
        super().__init__(f"card issuer {issuer.hex().upper()} is not ANS (8025000001)")


class PinRequired(CardError):
    """The card needs its PIN (inserted, reinserted or reset since the last VERIFY)."""

    hold = True

    def __init__(self, reader: str) -> None:
        self.reader = reader
        super().__init__(f"the card in reader {reader!r} is locked: an operator must present its PIN")


class InvalidPinFormat(CardError):
    """The PIN offered is not 4 to 8 digits; it was not sent to the card (no try used)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"PIN not sent to the card: {reason}")


class ApduError(CardError):
    """The card answered a command with an error status word (ISO/IEC 7816-4 §5.6)."""

    def __init__(self, sw: int, ins: int, meaning: str = "") -> None:
        self.sw = sw
        self.ins = ins
        text = f"card refused INS {ins:02X}: SW {sw:04X}"
        super().__init__(f"{text} ({meaning})" if meaning else text)


class PinIncorrect(ApduError):
    """SW 63Cx: wrong PIN, x tries left. Never retried automatically: three wrong PINs block the card."""

    def __init__(self, sw: int, ins: int, tries_left: int) -> None:
        self.tries_left = tries_left
        super().__init__(sw, ins, f"wrong PIN, {tries_left} tries left")


class PinBlocked(ApduError):
    """SW 6983: the PIN is blocked; only the unblocking code (PUK) can reset it."""

    hold = True

    def __init__(self, sw: int = 0x6983, ins: int = 0x20) -> None:
        super().__init__(sw, ins, "PIN blocked")


class SecurityStatusNotSatisfied(ApduError):
    """SW 6982: the operation needs the PIN (or another condition) first."""

    hold = True

    def __init__(self, sw: int, ins: int) -> None:
        super().__init__(sw, ins, "security status not satisfied")


class FileNotFound(ApduError):
    """SW 6A82: no such file or application."""

    def __init__(self, sw: int, ins: int) -> None:
        super().__init__(sw, ins, "file or application not found")


class ReferencedDataNotFound(ApduError):
    """SW 6A88: no such key, PIN or data object."""

    def __init__(self, sw: int, ins: int) -> None:
        super().__init__(sw, ins, "referenced data not found")


class ConditionsNotSatisfied(ApduError):
    """SW 6985: conditions of use not satisfied (e.g. PSO CDS without PSO HASH)."""

    def __init__(self, sw: int, ins: int) -> None:
        super().__init__(sw, ins, "conditions of use not satisfied")


class MalformedResponse(CardError):
    """The card's answer does not have the structure the command implies."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"malformed card response: {what}")


class UnsupportedOperation(CardError):
    """The card cannot do what was asked (e.g. PSS or OAEP on a CPS3): no other key is used instead."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"not supported by the card: {what}")
