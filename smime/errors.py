"""Errors of the S/MIME engine: every bad input ends in one of these, never in a bare exception.

Each subclass carries the data that explains it. `permanent` says whether trying again could help:
a tampered body stays tampered (permanent), a missing CRL may be published later (transient).
The gateway turns them into marked deliveries or SMTP replies; the engine itself knows no protocol.
"""

from __future__ import annotations

import datetime


class SmimeError(Exception):
    """Base class of the S/MIME engine's errors."""

    permanent = True


# Malformed input (RFC 5652 structures, RFC 8551 MIME wrapping)


class MalformedMessage(SmimeError):
    """The MIME wrapping is not what RFC 8551 §3 describes (missing boundary, wrong part count, ...)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"malformed S/MIME message: {reason}")


class MalformedCms(SmimeError):
    """The CMS structure cannot be parsed (garbage, truncated, wrong type)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"malformed CMS structure: {reason}")


class NestingTooDeep(SmimeError):
    """More S/MIME layers than any honest sender produces (RFC 8551 §3.7 allows nesting, not without end)."""

    def __init__(self, depth: int, limit: int) -> None:
        self.depth = depth
        self.limit = limit
        super().__init__(f"S/MIME layers nested {depth} deep, the limit is {limit}")


class LimitExceeded(SmimeError):
    """The input is bigger or more deeply structured than this gateway parses (smime.limits.ParseLimits)."""

    def __init__(self, what: str, found: int, limit: int) -> None:
        self.what = what
        self.found = found
        self.limit = limit
        super().__init__(f"{what}: {found} exceeds the limit of {limit}")


class UnsupportedAlgorithm(SmimeError):
    """An algorithm we do not implement, or refuse to use."""

    def __init__(self, algorithm: str, where: str) -> None:
        self.algorithm = algorithm
        self.where = where
        super().__init__(f"unsupported {where} algorithm: {algorithm}")


# Decryption


class NoRecipientInfo(SmimeError):
    """The message is not encrypted to our key (RFC 5652 §6.2: no RecipientInfo matches it)."""

    def __init__(self, ours: str, present: tuple[str, ...]) -> None:
        self.ours = ours
        self.present = present
        listed = ", ".join(present) or "none"
        super().__init__(f"no RecipientInfo for our certificate {ours}; recipients present: {listed}")


class DecryptionFailed(SmimeError):
    """The content could not be decrypted: wrong key, bad CBC padding, GCM tag mismatch."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"decryption failed: {reason}")


# Verification: each failing check of a VerificationReport carries one of these.


class VerificationFailed(SmimeError):
    """A signature or certificate check failed; `check` names it (see smime.report)."""

    check = "signature"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class ContentTampered(VerificationFailed):
    """The messageDigest attribute does not match the content (RFC 5652 §11.2)."""

    check = "message-digest"


class SignatureInvalid(VerificationFailed):
    """The RSA signature over the signed attributes does not verify (RFC 5652 §5.6)."""

    check = "signature"


class MicalgMismatch(VerificationFailed):
    """The multipart/signed micalg parameter names another digest than the SignerInfo (RFC 8551 §3.5.3.2)."""

    check = "micalg"

    def __init__(self, micalg: str, digest: str) -> None:
        self.micalg = micalg
        self.digest = digest
        super().__init__(f"micalg={micalg} but the signature uses {digest}")


class WeakAlgorithm(VerificationFailed):
    """SHA-1, MD5 or another algorithm refused by policy (RFC 8551 §2.1, §2.2)."""

    check = "algorithms"

    def __init__(self, algorithm: str, where: str) -> None:
        self.algorithm = algorithm
        self.where = where
        super().__init__(f"{where} uses {algorithm}, refused by policy")


class WeakKey(VerificationFailed):
    """An RSA key shorter than the policy minimum (RFC 8551 §4.1: 2048 bits and up)."""

    check = "algorithms"

    def __init__(self, subject: str, bits: int, minimum: int) -> None:
        self.subject = subject
        self.bits = bits
        self.minimum = minimum
        super().__init__(f"RSA key of {subject} has {bits} bits, the minimum is {minimum}")


class CertificatePathError(VerificationFailed):
    """The signer's certificate path does not validate (RFC 5280 §6)."""

    check = "path"


class UntrustedAnchor(CertificatePathError):
    """The path ends at a root that is not one of the configured trust anchors."""

    def __init__(self, root: str) -> None:
        self.root = root
        super().__init__(f"path ends at {root}, which is not a configured trust anchor")


class MissingIntermediate(CertificatePathError):
    """No certificate found for an issuer on the path (neither in the message nor configured)."""

    def __init__(self, issuer: str) -> None:
        self.issuer = issuer
        super().__init__(f"issuer certificate not found: {issuer} (missing intermediate or unknown CA)")


class CertificateExpired(CertificatePathError):
    """A certificate on the path expired before the verification time (RFC 5280 §6.1.3 (a)(2))."""

    def __init__(self, subject: str, not_after: datetime.datetime, at: datetime.datetime) -> None:
        self.subject = subject
        self.not_after = not_after
        self.at = at
        super().__init__(f"certificate {subject} expired on {not_after.isoformat()} (checked at {at.isoformat()})")


class CertificateNotYetValid(CertificatePathError):
    """A certificate on the path is not valid yet at the verification time (RFC 5280 §6.1.3 (a)(2))."""

    def __init__(self, subject: str, not_before: datetime.datetime, at: datetime.datetime) -> None:
        self.subject = subject
        self.not_before = not_before
        self.at = at
        super().__init__(f"certificate {subject} is valid only from {not_before.isoformat()} (checked at {at.isoformat()})")


class CertificateRevoked(CertificatePathError):
    """A CRL lists a certificate of the path as revoked (RFC 5280 §6.3)."""

    def __init__(self, subject: str, serial: int, revoked_at: datetime.datetime, reason: str | None) -> None:
        self.subject = subject
        self.serial = serial
        self.revoked_at = revoked_at
        self.reason_code = reason
        why = f" ({reason})" if reason else ""
        super().__init__(f"certificate {subject} (serial {serial:x}) revoked on {revoked_at.isoformat()}{why}")


class RevocationUnknown(CertificatePathError):
    """No valid, current CRL covers a certificate of the path, and the policy requires one."""

    permanent = False

    def __init__(self, subject: str, reason: str) -> None:
        self.subject = subject
        super().__init__(f"revocation status of {subject} unknown: {reason}")


class BadCertificateUse(CertificatePathError):
    """Key usage, extended key usage or basic constraints forbid this use (RFC 8550 §4.4)."""

    check = "key-usage"

    def __init__(self, subject: str, reason: str) -> None:
        self.subject = subject
        super().__init__(f"certificate {subject}: {reason}")


class SenderMismatch(VerificationFailed):
    """The From address is not bound to the signer's certificate (RFC 8550 §3, RFC 8551 §2.5.2)."""

    check = "sender"

    def __init__(self, sender: str | None, reason: str) -> None:
        self.sender = sender
        super().__init__(reason)
