"""Verifying SignedData (RFC 5652 §5.6, RFC 8551 §3.5, RFC 8550 §4): a typed report, every check explained.

Structural damage (garbage, truncation) raises `MalformedCms`; everything about trust (digest, signature,
path, usage, sender) is a check in the report, so a message that fails can still be delivered, marked.
"""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Awaitable, Callable

from asn1crypto import cms
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.exceptions import UnsupportedAlgorithm as CryptographyUnsupported
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.x509.oid import NameOID

from smime.algorithms import (
    MICALG_TO_HASH,
    digest_of_signature_algorithm,
    hash_algorithm,
    read_pss_parameters,
)
from smime.certpath import (
    DEFAULT_POLICY,
    TrustStore,
    ValidationPolicy,
    check_email_signing,
    name_of,
    validate_path,
)
from smime.cms import (
    from_asn1,
    identifies,
    load_content_info,
    parse_errors_as_malformed,
    present,
)
from smime.errors import (
    ContentTampered,
    MalformedCms,
    MicalgMismatch,
    SenderMismatch,
    SignatureInvalid,
    UnsupportedAlgorithm,
    VerificationFailed,
    WeakAlgorithm,
    WeakKey,
)
from smime.limits import DEFAULT_LIMITS, ParseLimits
from smime.mime import to_crlf
from smime.report import Check, SignerIdentity, VerificationReport

log = logging.getLogger(__name__)

IdentityCheck = Callable[[x509.Certificate, "str | None"], str]
"""Given the signer certificate and the From address, return a reason it matches or raise SenderMismatch."""
AsyncIdentityCheck = Callable[[x509.Certificate, "str | None"], Awaitable[str]]
"""The same, for a check that must wait (the gateway's RPPS lookup in the directory); `open_message` takes it."""

_RPPS_CN = re.compile(r"^8(\d{11})$")
MAX_SIGNERS = 8  # more SignerInfos than this is not a real message; the rest are ignored


def certificate_addresses(cert: x509.Certificate) -> tuple[str, ...]:
    """rfc822Name SANs, then the legacy emailAddress of the subject (RFC 8550 §3)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        addresses = list(sans.get_values_for_type(x509.RFC822Name))
    except x509.ExtensionNotFound:
        addresses = []
    addresses += [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)]
    return tuple(addresses)


def rpps_of(cert: x509.Certificate) -> str | None:
    """The RPPS number of a CPS certificate: the CN is idNat_PS, `8` followed by the 11-digit RPPS."""
    for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        m = _RPPS_CN.match(str(attr.value))
        if m:
            return m.group(1)
    return None


def match_from_address(cert: x509.Certificate, sender: str | None) -> str:
    """The default identity check: the From address must be one of the certificate's addresses."""
    addresses = certificate_addresses(cert)
    if sender is None:
        raise SenderMismatch(None, "no From address to compare with the certificate")
    if sender.lower() not in {a.lower() for a in addresses}:
        listed = ", ".join(addresses) or "no address"
        raise SenderMismatch(sender, f"From {sender} is not bound to the certificate ({listed})")
    return f"From {sender} is in the certificate"


def _rsa_padding(si: cms.SignerInfo, sig_name: str, digest_name: str) -> asym_padding.AsymmetricPadding:
    """PKCS#1 v1.5, or PSS with the encoded parameters, whose hash must be the digest (RFC 4056 §3)."""
    if sig_name == "rsassa_pss":
        try:
            pss_hash, salt = read_pss_parameters(si["signature_algorithm"]["parameters"])
        except UnsupportedAlgorithm as exc:
            raise WeakAlgorithm(exc.algorithm, "the signature") from None
        if pss_hash != digest_name:
            raise SignatureInvalid(f"PSS hash {pss_hash} differs from the digest {digest_name} (RFC 4056 §3)")
        return asym_padding.PSS(asym_padding.MGF1(hash_algorithm(pss_hash)), salt)
    if sig_name == "rsassa_pkcs1v15" or sig_name.endswith("_rsa"):
        return asym_padding.PKCS1v15()
    raise WeakAlgorithm(sig_name, "a signature by an RSA key")


def _run(name: str, checks: list[Check], step: Callable[[], str]) -> bool:
    try:
        checks.append(Check.ok(name, step()))
    except VerificationFailed as exc:
        checks.append(Check.failed(exc, name))
        return False
    return True


def verify_signed_data(der: bytes, content: bytes | None = None, *, trust: TrustStore,
                       at: datetime.datetime | None = None, policy: ValidationPolicy = DEFAULT_POLICY,
                       micalg: str | None = None, sender: str | None = None,
                       identity_check: IdentityCheck | None = match_from_address,
                       limits: ParseLimits = DEFAULT_LIMITS) -> VerificationReport:
    """Verify a SignedData over `content` (detached) or over its own content (opaque, `content=None`).

    `micalg` is the multipart/signed parameter, checked against the digest (RFC 8551 §3.5.3.2).
    `identity_check=None` leaves the sender check to the caller (the gateway matches RPPS numbers).
    A structure past `limits` raises `LimitExceeded` before it is parsed.
    """
    with parse_errors_as_malformed("SignedData"):
        return _verify(der, content, trust=trust, at=at, policy=policy, micalg=micalg, sender=sender,
                       identity_check=identity_check, limits=limits)


def _verify(der: bytes, content: bytes | None, *, trust: TrustStore, at: datetime.datetime | None,
            policy: ValidationPolicy, micalg: str | None, sender: str | None,
            identity_check: IdentityCheck | None, limits: ParseLimits) -> VerificationReport:
    info = load_content_info(der, limits)
    if info["content_type"].native != "signed_data":
        raise MalformedCms(f"expected SignedData, got {info['content_type'].native}")
    signed: cms.SignedData = info["content"]
    detached = content is not None
    if content is None:
        content = signed["encap_content_info"]["content"].native
        if not isinstance(content, bytes):
            raise MalformedCms("opaque SignedData without content (a detached signature needs its content)")
    if not len(signed["signer_infos"]):
        raise MalformedCms("SignedData has no SignerInfo")
    certs = [from_asn1(c.chosen) for c in signed["certificates"] if c.name == "certificate"] \
        if present(signed["certificates"]) else []
    reports: list[VerificationReport] = []
    for si in list(signed["signer_infos"])[:MAX_SIGNERS]:
        cert = next((c for c in certs if identifies(si["sid"], c)), None)
        if cert is not None:
            reports.append(_verify_signer(signed, si, cert, certs, content, detached, trust=trust, at=at,
                                          policy=policy, micalg=micalg, sender=sender,
                                          identity_check=identity_check))
    if not reports:
        raise MalformedCms("no signer's certificate is in the message")
    # RFC 5652 §5.1 allows several signers: the message is good if one signature is (RFC 8551 §2.4 leaves it local).
    return next((r for r in reports if r.valid), reports[0])


def _verify_signer(signed: cms.SignedData, si: cms.SignerInfo, cert: x509.Certificate,
                   certs: list[x509.Certificate], content: bytes, detached: bool, *, trust: TrustStore,
                   at: datetime.datetime | None, policy: ValidationPolicy, micalg: str | None, sender: str | None,
                   identity_check: IdentityCheck | None) -> VerificationReport:
    try:
        cert.public_key()
    except (CryptographyUnsupported, ValueError):
        raise UnsupportedAlgorithm(f"the public key of {name_of(cert)}", "signer key") from None
    digest_name = str(si["digest_algorithm"]["algorithm"].native)
    sig_name = str(si["signature_algorithm"]["algorithm"].native)
    attrs = si["signed_attrs"]
    has_attrs = present(attrs)
    attr_values = {a["type"].native: a["values"] for a in attrs} if has_attrs else {}
    signing_time = attr_values["signing_time"][0].native if "signing_time" in attr_values else None
    checks: list[Check] = []
    when = at or datetime.datetime.now(datetime.UTC)

    def algorithms() -> str:
        if digest_name not in policy.allowed_digests:
            raise WeakAlgorithm(digest_name, "the signature digest")
        combined = digest_of_signature_algorithm(sig_name)
        if combined is not None and combined != digest_name:
            raise WeakAlgorithm(sig_name, f"a signature with digest {digest_name}")
        key = cert.public_key()
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < policy.min_rsa_bits:
            raise WeakKey(name_of(cert), key.key_size, policy.min_rsa_bits)
        return f"{digest_name} with {sig_name}"

    def micalg_check() -> str:
        if micalg is None:
            return "no micalg (opaque signed-data)" if not detached else "no micalg parameter given"
        names = {MICALG_TO_HASH.get(m.strip().lower(), m.strip().lower()) for m in micalg.split(",")}
        if digest_name not in names:
            raise MicalgMismatch(micalg, digest_name)
        return f"micalg={micalg} matches {digest_name}"

    def digest(data: bytes) -> bytes:
        try:
            h = hashes.Hash(hash_algorithm(digest_name))
        except UnsupportedAlgorithm as exc:
            raise WeakAlgorithm(digest_name, "the signature digest") from exc
        h.update(data)
        return h.finalize()

    covered = content

    def message_digest() -> str:
        nonlocal covered
        if not has_attrs:
            return "no signed attributes: the signature covers the content directly"
        if attr_values.get("content_type", [None])[0] is None or \
                attr_values["content_type"][0].native != signed["encap_content_info"]["content_type"].native:
            raise ContentTampered("contentType attribute missing or not the encapsulated content type")
        if "message_digest" not in attr_values:
            raise ContentTampered("messageDigest attribute missing (RFC 5652 §5.3)")
        expected = attr_values["message_digest"][0].native
        if digest(covered) == expected:
            return "messageDigest matches the content"
        canonical = to_crlf(covered)
        if canonical != covered and digest(canonical) == expected:
            covered = canonical
            return "messageDigest matches the content in canonical CRLF form"
        raise ContentTampered("messageDigest does not match the content: the message was altered after signing")

    def signature() -> str:
        key = cert.public_key()
        signed_bytes = attrs.untag().dump() if has_attrs else covered
        value = si["signature"].native
        try:
            if isinstance(key, ec.EllipticCurvePublicKey):
                # RFC 5753 §2.1.1 / RFC 8551 §2.2: ECDSA over the same bytes, the digest named by the SignerInfo.
                if sig_name != "ecdsa" and not sig_name.endswith("_ecdsa"):
                    raise WeakAlgorithm(sig_name, "a signature by an EC key")
                key.verify(value, signed_bytes, ec.ECDSA(hash_algorithm(digest_name)))
            elif isinstance(key, rsa.RSAPublicKey):
                key.verify(value, signed_bytes, _rsa_padding(si, sig_name, digest_name), hash_algorithm(digest_name))
            else:
                raise WeakAlgorithm(type(key).__name__, "the signer key (RSA and ECDSA are supported)")
        except InvalidSignature:
            raise SignatureInvalid("the signature does not verify with the signer's public key") from None
        except UnsupportedAlgorithm as exc:
            raise WeakAlgorithm(digest_name, "the signature") from exc
        return f"{sig_name} signature verifies"

    chain: tuple[x509.Certificate, ...] = (cert,)

    def path() -> str:
        nonlocal chain
        result = validate_path(cert, trust, extra=certs, at=when, policy=policy)
        chain = result.certificates
        return f"{len(chain)} certificates up to {name_of(chain[-1])} at {when.isoformat()}; {result.revocation}"

    _run("algorithms", checks, algorithms)
    _run("micalg", checks, micalg_check)
    if _run("message-digest", checks, message_digest):
        _run("signature", checks, signature)
    else:
        checks.append(Check("signature", False, "not checked: the content does not match its digest",
                            SignatureInvalid("signature not checked: the content was altered")))
    _run("path", checks, path)
    _run("key-usage", checks, lambda: check_email_signing(cert))
    if identity_check is not None:
        _run("sender", checks, lambda: identity_check(cert, sender))

    signer = SignerIdentity(
        subject=name_of(cert),
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
        rpps=rpps_of(cert),
        email_addresses=certificate_addresses(cert),
        chain=tuple(name_of(c) for c in chain),
        digest_algorithm=digest_name,
        signature_algorithm=sig_name,
        signing_time=signing_time if isinstance(signing_time, datetime.datetime) else None,
        certificate=cert,
    )
    report = VerificationReport(covered, signer, tuple(checks), detached)
    log.info("signature of %s (sha256 %s): %s", signer.subject, signer.fingerprint_sha256[:16],
             "valid" if report.valid else "; ".join(f"{c.name} failed" for c in report.failures))
    return report
