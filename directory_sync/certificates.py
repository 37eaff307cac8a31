"""Recipient certificates kept by the directory (per mailbox, or per practitioner's idNat_PS).

The extracts carry no certificates; they come from an operator, an LDAP/FHIR source or a
file. Validity and fingerprint are read from the certificate itself, never trusted from input.
"""

from __future__ import annotations

import hashlib
import logging

from cryptography import x509
from sqlalchemy import Engine, delete, insert

from directory_sync.errors import InvalidCertificate
from directory_sync.mapping import address_key
from directory_sync.models import Certificate

log = logging.getLogger(__name__)

USAGES = ("encryption", "signature", "any")


def add_certificate(
    engine: Engine, der: bytes, *, address: str | None = None, id_nat_ps: str | None = None,
    usage: str = "encryption", source: str = "manual",
) -> str:
    """Store a DER certificate for an address or an idNat_PS; returns its SHA-256 fingerprint."""
    if usage not in USAGES:
        raise InvalidCertificate(f"usage must be one of {', '.join(USAGES)}")
    if address is None and id_nat_ps is None:
        raise InvalidCertificate("a certificate belongs to an address or an idNat_PS")
    key = address_key(address) if address is not None else None
    if address is not None and key is None:
        raise InvalidCertificate(f"invalid address {address!r}")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise InvalidCertificate(str(exc)) from exc
    fingerprint = hashlib.sha256(der).hexdigest()
    with engine.begin() as conn:
        conn.execute(delete(Certificate).where(Certificate.fingerprint_sha256 == fingerprint))
        conn.execute(insert(Certificate).values(
            fingerprint_sha256=fingerprint, address_key=key, id_nat_ps=id_nat_ps, usage=usage,
            subject=cert.subject.rfc4514_string(), not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc, source=source, der=der,
        ))
    log.info("certificate %s stored for %s", fingerprint, key or id_nat_ps)
    return fingerprint
