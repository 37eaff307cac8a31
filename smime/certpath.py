"""Certificate path validation for S/MIME signers (RFC 5280 §6, RFC 8550 §4), with CRLs (RFC 5280 §6.3).

Written on cryptography's primitives rather than `cryptography.x509.verification` (its policies are
WebPKI-shaped and it has no revocation) or pyhanko-certvalidator (async-only, an extra dependency with an
HTTP client): we need every failure as a typed reason for the report, a caller-chosen time, and CRLs
given as bytes by the caller (no fetching: smime/ does no I/O). Not implemented: name constraints,
certificate policies, delta and indirect CRLs.

A receiving gateway sees the same signer, with the same chain, in message after message: a path that
validated is kept in its `TrustStore` (see `_PathCache`), with the span of time in which its outcome cannot
change, and served again within that span. A new store (trust anchors or CRLs loaded again) starts empty.
"""

from __future__ import annotations

import datetime
import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from smime.algorithms import STRONG_HASHES
from smime.errors import (
    BadCertificateUse,
    CertificateExpired,
    CertificateNotYetValid,
    CertificatePathError,
    CertificateRevoked,
    MalformedCms,
    MissingIntermediate,
    RevocationUnknown,
    UntrustedAnchor,
    WeakAlgorithm,
    WeakKey,
)

log = logging.getLogger(__name__)

RevocationMode = Literal["require", "soft-fail", "off"]
MIN_EC_BITS = 256  # RFC 8551 §2.2: P-256 and up


@dataclass(frozen=True, slots=True)
class ValidationPolicy:
    """What the verifier accepts. Defaults follow RFC 8551 §2 and the Direct AS: SHA-2, RSA ≥ 2048, CRLs required."""

    revocation: RevocationMode = "require"
    min_rsa_bits: int = 2048
    allowed_digests: frozenset[str] = STRONG_HASHES
    max_path_length: int = 8


DEFAULT_POLICY = ValidationPolicy()


@dataclass(frozen=True, slots=True)
class ValidatedPath:
    """A path from the end entity up to its anchor, and how revocation was established."""

    certificates: tuple[x509.Certificate, ...]
    revocation: str


_CacheKey = tuple[x509.Certificate, tuple[x509.Certificate, ...], ValidationPolicy]
Moment = datetime.datetime | None


class _PathCache:
    """Successful validations of one `TrustStore`, each with the open interval of time in which it holds.

    What a validation depends on is the end entity, the certificates the message brought (`extra`), the
    policy, the store (immutable: a reloaded trust list or CRL set is a new store, with a new cache) and the
    time. The time enters only through dates: the validity of every certificate that could be on a path,
    the thisUpdate and nextUpdate of every CRL, the revocation date of every entry that names a serial of
    the path. Between two consecutive such dates every comparison with them gives the same answer, so the
    outcome found at one moment holds at any other moment strictly between the same two dates (`_span`).
    A certificate that expires, a CRL that goes stale or a new one that becomes current, a revocation that
    takes effect: each is one of those dates, and the cached outcome is not used across it. Failures are not
    kept: they are rare, and raise again with their own reason.
    """

    MAX_ENTRIES = 512

    def __init__(self) -> None:
        self._entries: OrderedDict[_CacheKey, tuple[Moment, Moment, ValidatedPath]] = OrderedDict()
        self._lock = threading.Lock()  # big messages are verified in worker threads (gateway.inbound_security)

    def get(self, key: _CacheKey, at: datetime.datetime) -> ValidatedPath | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            after, before, result = found
            if (after is not None and at <= after) or (before is not None and at >= before):
                return None
            self._entries.move_to_end(key)
            return result

    def put(self, key: _CacheKey, span: tuple[Moment, Moment], result: ValidatedPath) -> None:
        with self._lock:
            self._entries[key] = (*span, result)
            self._entries.move_to_end(key)
            while len(self._entries) > self.MAX_ENTRIES:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True, slots=True)
class TrustStore:
    """Trust anchors, known intermediates and the CRLs that cover them, all parsed, none fetched.

    Immutable, so that the paths validated against it can be kept with it (`validated_paths`); to take a
    new trust list or new CRLs, build a new store.
    """

    anchors: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...] = ()
    crls: tuple[x509.CertificateRevocationList, ...] = field(default=(), repr=False)
    validated_paths: _PathCache = field(default_factory=_PathCache, init=False, repr=False, compare=False,
                                        hash=False)

    @classmethod
    def from_pem(cls, bundle_pem: bytes, crls_pem: bytes = b"") -> TrustStore:
        """A store from a PEM bundle: self-signed certificates become anchors, the others intermediates.

        So a bundle like `ca-bundle.pem` (root and its CAs) does not make an intermediate an anchor,
        and the intermediate's own revocation is still checked against the root's CRL.
        """
        try:
            certs = x509.load_pem_x509_certificates(bundle_pem)
            crls = _load_crls(crls_pem)
        except ValueError as exc:
            raise MalformedCms(f"trust store: {exc}") from None
        anchors = tuple(c for c in certs if _self_issued(c))
        return cls(anchors, tuple(c for c in certs if not _self_issued(c)), crls)


def _load_crls(data: bytes) -> tuple[x509.CertificateRevocationList, ...]:
    if not data.strip():
        return ()
    if not data.lstrip().startswith(b"-----"):
        return (x509.load_der_x509_crl(data),)
    marker = b"-----BEGIN X509 CRL-----"
    return tuple(x509.load_pem_x509_crl(marker + chunk) for chunk in data.split(marker)[1:])


_SHORT_NAMES = {NameOID.SURNAME: "SN", NameOID.GIVEN_NAME: "GN", NameOID.TITLE: "title"}


@functools.lru_cache(maxsize=256)
def name_of(cert: x509.Certificate) -> str:
    """The subject as RFC 4514 text, with short names for the attributes of CPS subjects.

    Kept per certificate (equal DER, equal answer): a verification names the signer and its chain several
    times, and the same signers come back message after message; `rfc4514_string` is pure Python.
    """
    return cert.subject.rfc4514_string(_SHORT_NAMES)


def _self_issued(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _valid_at(cert: x509.Certificate, at: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= at <= cert.not_valid_after_utc


def build_path(end_entity: x509.Certificate, store: TrustStore, extra: Sequence[x509.Certificate],
               at: datetime.datetime, policy: ValidationPolicy) -> tuple[x509.Certificate, ...]:
    """From the end entity to a trust anchor (RFC 4158 in its simplest form: names, then signatures)."""
    pool = [*extra, *store.intermediates]
    path = [end_entity]
    current = end_entity
    while current not in store.anchors:
        if len(path) > policy.max_path_length:
            raise CertificatePathError(f"no trust anchor within {policy.max_path_length} certificates")
        anchor = next((a for a in store.anchors if a.subject == current.issuer and _issued_by(current, a)), None)
        if anchor is not None:
            path.append(anchor)
            break
        if _self_issued(current):
            raise UntrustedAnchor(name_of(current))
        named = [c for c in (*store.anchors, *pool) if c.subject == current.issuer and c not in path]
        candidates = [c for c in named if c not in store.anchors and _issued_by(current, c)]
        if not candidates and named:
            _check_algorithms(current, policy, signature=True)
            raise CertificatePathError(f"the signature on {name_of(current)} does not verify with the key of "
                                       f"{current.issuer.rfc4514_string()}")
        if not candidates:
            raise MissingIntermediate(current.issuer.rfc4514_string())
        candidates.sort(key=lambda c: not _valid_at(c, at))
        current = candidates[0]
        path.append(current)
    return tuple(path)


def _check_algorithms(cert: x509.Certificate, policy: ValidationPolicy, *, signature: bool) -> None:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < policy.min_rsa_bits:
        raise WeakKey(name_of(cert), key.key_size, policy.min_rsa_bits)
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size < MIN_EC_BITS:
        raise WeakKey(name_of(cert), key.curve.key_size, MIN_EC_BITS)
    if signature:
        try:
            digest = cert.signature_hash_algorithm
        except UnsupportedAlgorithm:
            raise WeakAlgorithm(cert.signature_algorithm_oid.dotted_string, f"certificate {name_of(cert)}") from None
        if digest is not None and digest.name not in policy.allowed_digests:
            raise WeakAlgorithm(digest.name, f"the signature on certificate {name_of(cert)}")


def _check_validity(cert: x509.Certificate, at: datetime.datetime) -> None:
    if at < cert.not_valid_before_utc:
        raise CertificateNotYetValid(name_of(cert), cert.not_valid_before_utc, at)
    if at > cert.not_valid_after_utc:
        raise CertificateExpired(name_of(cert), cert.not_valid_after_utc, at)


def _check_ca(cert: x509.Certificate, below: int) -> None:
    """RFC 5280 §6.1.4 (k), (l), (n): an issuing certificate must be a CA allowed to sign certificates."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise BadCertificateUse(name_of(cert), "issues certificates but has no basicConstraints") from None
    if not bc.ca:
        raise BadCertificateUse(name_of(cert), "issues certificates but basicConstraints says cA=FALSE")
    if bc.path_length is not None and below > bc.path_length:
        raise BadCertificateUse(name_of(cert), f"pathLenConstraint {bc.path_length}, {below} CAs below it")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not ku.key_cert_sign:
        raise BadCertificateUse(name_of(cert), "issues certificates but keyUsage lacks keyCertSign")


def _check_critical(cert: x509.Certificate) -> None:
    """RFC 5280 §4.2: a critical extension we do not understand makes the certificate unusable."""
    for ext in cert.extensions:
        if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
            raise BadCertificateUse(name_of(cert), f"unrecognised critical extension {ext.oid.dotted_string}")


def _crl_signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        return False
    return crl.is_signature_valid(key)


def _check_revocation(cert: x509.Certificate, issuer: x509.Certificate, store: TrustStore,
                      at: datetime.datetime, mode: RevocationMode) -> str:
    """RFC 5280 §6.3: find a CRL of `issuer`, signed by it and current at `at`, and look the serial up."""
    crls = [c for c in store.crls if c.issuer == issuer.subject and _crl_signed_by(c, issuer)]
    current = [c for c in crls if c.last_update_utc <= at and (c.next_update_utc is None or at <= c.next_update_utc)]
    if not current:
        reason = "a CRL of the issuer exists but is not current" if crls else "no CRL of the issuer is configured"
        if mode == "require":
            raise RevocationUnknown(name_of(cert), reason)
        return f"{name_of(cert)}: not checked ({reason})"
    for crl in current:
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if entry is not None and entry.revocation_date_utc <= at:
            try:
                why: str | None = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
            except x509.ExtensionNotFound:
                why = None
            raise CertificateRevoked(name_of(cert), cert.serial_number, entry.revocation_date_utc, why)
    return f"{name_of(cert)}: not revoked"


def validate_path(end_entity: x509.Certificate, store: TrustStore, *, extra: Sequence[x509.Certificate] = (),
                  at: datetime.datetime | None = None, policy: ValidationPolicy = DEFAULT_POLICY
                  ) -> ValidatedPath:
    """Build and check the path of `end_entity` at time `at` (now by default), or raise why not.

    A path found valid before with the same certificates and policy, in the same span of time (see
    `_PathCache`), is returned again without redoing the checks.
    """
    when = at or datetime.datetime.now(datetime.UTC)
    key: _CacheKey = (end_entity, tuple(extra), policy)
    cached = store.validated_paths.get(key, when)
    if cached is not None:
        return cached
    result = _validate(end_entity, store, extra, when, policy)
    span = _span(result.certificates, store, extra, when)
    if span is not None:
        store.validated_paths.put(key, span, result)
    return result


def _span(path: Sequence[x509.Certificate], store: TrustStore, extra: Sequence[x509.Certificate],
          at: datetime.datetime) -> tuple[Moment, Moment] | None:
    """The open interval around `at` holding none of the dates a validation of this path compares with.

    Over-inclusive on purpose (every certificate path building could pick, every CRL of the store, any
    entry with a serial of the path whoever issued it): a smaller interval only costs a validation more.
    None when `at` is itself one of those dates.
    """
    moments: list[datetime.datetime] = []
    for cert in (*store.anchors, *store.intermediates, *extra, *path):
        moments += (cert.not_valid_before_utc, cert.not_valid_after_utc)
    serials = {cert.serial_number for cert in path}
    for crl in store.crls:
        moments.append(crl.last_update_utc)
        if crl.next_update_utc is not None:
            moments.append(crl.next_update_utc)
        for serial in serials:
            entry = crl.get_revoked_certificate_by_serial_number(serial)
            if entry is not None:
                moments.append(entry.revocation_date_utc)
    if at in moments:
        return None
    return (max((m for m in moments if m < at), default=None), min((m for m in moments if m > at), default=None))


def _validate(end_entity: x509.Certificate, store: TrustStore, extra: Sequence[x509.Certificate],
              when: datetime.datetime, policy: ValidationPolicy) -> ValidatedPath:
    path = build_path(end_entity, store, extra, when, policy)
    issued = path[:-1]  # everything but the anchor, which is trusted as configured
    for cert in path:
        _check_algorithms(cert, policy, signature=cert in issued)
    for cert in path:
        _check_validity(cert, when)
    for cert in issued:
        _check_critical(cert)
    for below, cert in enumerate(path[1:]):
        _check_ca(cert, below)
    notes = []
    if policy.revocation != "off":
        for cert, issuer in zip(issued, path[1:], strict=True):
            notes.append(_check_revocation(cert, issuer, store, when, policy.revocation))
    revocation = "; ".join(notes) if notes else "not checked (revocation off)"
    if log.isEnabledFor(logging.DEBUG):  # name_of costs as much as a CRL lookup
        log.debug("path of %s: %d certificates, %s", name_of(end_entity), len(path), revocation)
    return ValidatedPath(path, revocation)


def check_email_signing(cert: x509.Certificate) -> str:
    """RFC 8550 §4.4.2/§4.4.4: keyUsage digitalSignature or nonRepudiation; EKU, if present, emailProtection."""
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not (ku.digital_signature or ku.content_commitment):
            raise BadCertificateUse(name_of(cert), "keyUsage has neither digitalSignature nor nonRepudiation")
        usage = "keyUsage allows signing"
    except x509.ExtensionNotFound:
        usage = "no keyUsage"
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return f"{usage}, no extendedKeyUsage"
    if ExtendedKeyUsageOID.EMAIL_PROTECTION not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
        raise BadCertificateUse(name_of(cert), "extendedKeyUsage lacks emailProtection")
    return f"{usage}, extendedKeyUsage emailProtection"
