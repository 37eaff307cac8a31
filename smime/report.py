"""The verdict on a signed layer: who signed, with what, and each check with its reason (not a bare boolean).

Check names: `algorithms`, `micalg`, `message-digest`, `signature`, `path`, `key-usage`, `sender`.
The gateway may add its own (e.g. an RPPS directory match) with `with_check`.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field

from cryptography import x509

from smime.errors import VerificationFailed


@dataclass(frozen=True, slots=True)
class Check:
    """One check: passed or not, and a sentence saying why; a failure carries its typed error."""

    name: str
    passed: bool
    reason: str
    error: VerificationFailed | None = None

    @classmethod
    def ok(cls, name: str, reason: str) -> Check:
        return cls(name, True, reason)

    @classmethod
    def failed(cls, error: VerificationFailed, name: str | None = None) -> Check:
        return cls(name or error.check, False, str(error), error)


@dataclass(frozen=True, slots=True)
class SignerIdentity:
    """The signer as the certificate names them; RPPS read from a CN of the form `8` + RPPS (IGC-Santé)."""

    subject: str
    fingerprint_sha256: str
    rpps: str | None
    email_addresses: tuple[str, ...]
    chain: tuple[str, ...]
    digest_algorithm: str
    signature_algorithm: str
    signing_time: datetime.datetime | None
    certificate: x509.Certificate = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class VerificationReport:
    """The result of verifying one SignedData: the content it covers and every check."""

    content: bytes = field(repr=False)
    signer: SignerIdentity
    checks: tuple[Check, ...]
    detached: bool

    @property
    def valid(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def raise_for_failure(self) -> None:
        """Raise the typed error of the first failed check, if any."""
        for c in self.checks:
            if c.error is not None:
                raise c.error

    def with_check(self, check: Check) -> VerificationReport:
        """The same report with `check` added, or replacing the check of the same name."""
        kept = tuple(c for c in self.checks if c.name != check.name)
        return dataclasses.replace(self, checks=(*kept, check))

    def summary(self) -> str:
        lines = [f"signer: {self.signer.subject}" + (f" (RPPS {self.signer.rpps})" if self.signer.rpps else "")]
        lines += [f"  {'PASS' if c.passed else 'FAIL'} {c.name}: {c.reason}" for c in self.checks]
        return "\n".join(lines)
