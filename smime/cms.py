"""Reading CMS (RFC 5652) safely and the small conversions between asn1crypto and cryptography.

asn1crypto parses lazily: a truncated or garbage structure may pass `load` and fail later on first
access. `load_content_info` forces the parse of everything once, so that every later access is safe
and every failure is a `MalformedCms` with a reason.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from asn1crypto import cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from smime.errors import MalformedCms
from smime.limits import DEFAULT_LIMITS, ParseLimits, check_ber

CONTENT_TYPES = ("signed_data", "enveloped_data", "authenticated_enveloped_data")


def load_content_info(der: bytes, limits: ParseLimits = DEFAULT_LIMITS) -> cms.ContentInfo:
    """A fully parsed ContentInfo (RFC 5652 §3); BER and indefinite lengths accepted (§2).

    Its size, nesting and number of elements are checked against `limits` first (`LimitExceeded`).
    """
    if not der:
        raise MalformedCms("empty input")
    check_ber(der, limits)
    try:
        info = cms.ContentInfo.load(der, strict=False)
        kind = info["content_type"].native
        if kind not in CONTENT_TYPES:
            raise MalformedCms(f"content type {kind} is not signed, enveloped or authEnveloped data")
        info._parse_children(recurse=True)
    except MalformedCms:
        raise
    except PARSE_ERRORS as exc:
        raise MalformedCms(f"{type(exc).__name__}: {exc}") from None
    return info


PARSE_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError)


@contextlib.contextmanager
def parse_errors_as_malformed(what: str) -> Iterator[None]:
    """asn1crypto parses on first access, so damage deep inside a structure surfaces late, as a ValueError
    or a TypeError; inside this block any such error is the input's fault and becomes a MalformedCms."""
    try:
        yield
    except PARSE_ERRORS as exc:
        raise MalformedCms(f"{what}: {type(exc).__name__}: {exc}") from None


def present(value: object) -> bool:
    """Whether an OPTIONAL field is there (asn1crypto gives a Void for an absent one), without decoding it."""
    return not isinstance(value, core.Void)


def to_asn1(cert: x509.Certificate) -> asn1_x509.Certificate:
    """asn1crypto's view of a certificate; parsing is lazy, and dumping it gives back the original DER."""
    return asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))


def issuer_and_serial_der(cert: x509.Certificate) -> bytes:
    """The DER IssuerAndSerialNumber of `cert` (RFC 5652 §10.2.4), computed once per certificate."""
    return _issuer_and_serial_der(cert.public_bytes(serialization.Encoding.DER))


@functools.lru_cache(maxsize=256)
def _issuer_and_serial_der(cert_der: bytes) -> bytes:
    a = asn1_x509.Certificate.load(cert_der)
    der: bytes = cms.IssuerAndSerialNumber({"issuer": a.issuer, "serial_number": a.serial_number}).dump()
    return der


def from_asn1(cert: asn1_x509.Certificate) -> x509.Certificate:
    """A certificate of the message, its names and extensions parsed now: cryptography parses them on first
    access, and a duplicated or damaged extension (RFC 5280 §4.2) must fail here, not inside a check.

    The same sender's certificate and chain come with each of its messages: one of at most
    `CACHED_CERTIFICATE_BYTES` is parsed once per distinct encoding (the 256 last; failures are not kept)."""
    der = cert.dump()
    if len(der) <= CACHED_CERTIFICATE_BYTES:
        return _load_certificate(der)
    return _load_certificate.__wrapped__(der)


CACHED_CERTIFICATE_BYTES = 16 * 1024


@functools.lru_cache(maxsize=256)
def _load_certificate(der: bytes) -> x509.Certificate:
    try:
        loaded = x509.load_der_x509_certificate(der)
        _ = loaded.subject, loaded.issuer, loaded.extensions
    except (ValueError, x509.DuplicateExtension, x509.InvalidVersion) as exc:  # InvalidVersion: not a ValueError
        raise MalformedCms(f"embedded certificate does not parse: {type(exc).__name__}: {exc}") from None
    return loaded




def subject_key_id(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def identifies(rid: cms.RecipientIdentifier | cms.SignerIdentifier, cert: x509.Certificate) -> bool:
    """Whether a SignerIdentifier or RecipientIdentifier names `cert` (RFC 5652 §5.3, §6.2.1)."""
    if rid.name == "issuer_and_serial_number":
        ias = rid.chosen
        # The usual case, one comparison: the identifier is the certificate's own issuer and serial encodings.
        if ias.dump() == issuer_and_serial_der(cert):
            return True
        if ias["serial_number"].native != cert.serial_number:
            return False
        issuer = to_asn1(cert).issuer
        # The same issuer encoded otherwise: RFC 5280 §7.1 name comparison (slower: string preparation).
        return bool(ias["issuer"].dump() == issuer.dump() or ias["issuer"] == issuer)
    if rid.name == "subject_key_identifier":
        return bool(rid.chosen.native == subject_key_id(cert))
    return False


def describe_identifier(rid: cms.RecipientIdentifier | cms.SignerIdentifier) -> str:
    """A readable form of a SignerIdentifier or RecipientIdentifier, for errors and `inspect`."""
    if rid.name == "issuer_and_serial_number":
        return f"{rid.chosen['issuer'].human_friendly} serial {rid.chosen['serial_number'].native:x}"
    if rid.name == "subject_key_identifier":
        return f"subjectKeyIdentifier {rid.chosen.native.hex()}"
    return str(rid.name)
