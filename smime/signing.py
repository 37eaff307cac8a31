"""Signing (RFC 5652 §5, RFC 8551 §3.5): SignedData written with smime.der, the RSA step done by a `Signer`.

The signer receives the DER `SET OF` encoding of the signed attributes, not their digest (smime.keys),
so a CPS card can finish the hash itself. Attributes are those RFC 8551 §2.5 asks for: contentType,
messageDigest, signingTime, SMIMECapabilities and SMIMEEncryptionKeyPreference.
"""

from __future__ import annotations

import datetime
import functools
import logging
from collections.abc import Sequence

from asn1crypto import algos, cms, core
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from smime import der
from smime.algorithms import MICALG, hash_algorithm, pss_parameters
from smime.cms import issuer_and_serial_der
from smime.keys import HashName, SignaturePadding, Signer
from smime.limits import DEFAULT_LIMITS, ParseLimits
from smime.mime import (
    build_multipart_signed,
    build_pkcs7_mime,
    canonicalize,
    join_message,
    split_message,
)

log = logging.getLogger(__name__)

# RFC 8551 §2.5.2: what we can decrypt, best first.
CAPABILITIES = ("aes256_gcm", "aes128_gcm", "aes256_cbc", "aes128_cbc", "rsaes_oaep")


# Built once: the same bytes go into every signature.
_CAPABILITIES_ATTRIBUTE: bytes = cms.CMSAttribute({
    "type": "smime_capabilities",
    "values": [cms.SMIMECapabilites([{"capability_id": c} for c in CAPABILITIES])],
}).dump()


@functools.lru_cache(maxsize=16)
def _digest_algorithm(hash_name: HashName) -> bytes:
    der: bytes = algos.DigestAlgorithm({"algorithm": hash_name}).dump()
    return der


@functools.lru_cache(maxsize=16)
def _signature_algorithm(padding: SignaturePadding, hash_name: HashName) -> bytes:
    if padding == "pss":
        alg = algos.SignedDigestAlgorithm({"algorithm": "rsassa_pss", "parameters": pss_parameters(hash_name)})
    else:
        alg = algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15", "parameters": core.Null()})
    der: bytes = alg.dump()
    return der


def _can_encrypt(cert: x509.Certificate) -> bool:
    """Whether keyUsage lets this certificate receive encrypted keys (RFC 8550 §4.4.2): a CPS signature
    certificate (nonRepudiation only) must not be named in SMIMEEncryptionKeyPreference."""
    try:
        return bool(cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment)
    except x509.ExtensionNotFound:
        return True


def signed_attributes(content_digest: bytes, *, signing_time: datetime.datetime,
                      encryption_certificate: x509.Certificate | None) -> bytes:
    """The DER `SET OF` signed attributes (RFC 5652 §5.3, RFC 8551 §2.5), sorted as DER wants (X.690 §11.6)."""
    attrs = [
        der.attribute(der.CONTENT_TYPE, der.oid(der.DATA)),
        der.attribute(der.SIGNING_TIME, der.time(signing_time)),
        der.attribute(der.MESSAGE_DIGEST, der.octet_string(content_digest)),
        _CAPABILITIES_ATTRIBUTE,
    ]
    if encryption_certificate is not None:
        ias = issuer_and_serial_der(encryption_certificate)
        attrs.append(der.attribute(der.ENCRYPTION_KEY_PREFERENCE, der.implicit(0, ias, constructed=True)))
    return der.set_of(*attrs)


async def build_signed_data(content: bytes, signer: Signer, *, hash_name: HashName = "sha256",
                            padding: SignaturePadding = "pkcs1v15", detached: bool = True,
                            chain: Sequence[x509.Certificate] = (),
                            signing_time: datetime.datetime | None = None,
                            encryption_certificate: x509.Certificate | None = None) -> bytes:
    """The DER ContentInfo of a SignedData over `content` (RFC 5652 §5.1), one SignerInfo v1.

    `chain` is the signer's intermediates; self-signed roots in it are left out (RFC 8551 §2.4.1).
    """
    digest = hashes.Hash(hash_algorithm(hash_name))
    digest.update(content)
    when = signing_time or datetime.datetime.now(datetime.UTC)
    if encryption_certificate is None and _can_encrypt(signer.certificate):
        encryption_certificate = signer.certificate
    attrs = signed_attributes(digest.finalize(), signing_time=when, encryption_certificate=encryption_certificate)
    signature = await signer.sign(attrs, hash_name=hash_name, padding=padding)
    signer_info = der.sequence(
        der.integer(1),
        issuer_and_serial_der(signer.certificate),
        _digest_algorithm(hash_name),
        der.implicit(0, attrs, constructed=True),
        _signature_algorithm(padding, hash_name),
        der.octet_string(signature),
    )
    certs = [signer.certificate, *(c for c in chain if c.subject != c.issuer and c != signer.certificate)]
    encap = [der.oid(der.DATA)]
    if not detached:
        encap += der.wrap(0xA0, der.wrap(der.OCTET_STRING, [content]))
    signed_data = der.wrap(der.SEQUENCE, [
        der.integer(1),
        der.set_of(_digest_algorithm(hash_name)),
        *der.wrap(der.SEQUENCE, encap),
        der.implicit(0, der.set_of(*(c.public_bytes(serialization.Encoding.DER) for c in certs)), constructed=True),
        der.set_of(signer_info),
    ])
    return b"".join(der.wrap(der.SEQUENCE, [der.oid(der.SIGNED_DATA), *der.wrap(0xA0, signed_data)]))


async def sign_entity(entity: bytes, signer: Signer, *, hash_name: HashName = "sha256",
                      padding: SignaturePadding = "pkcs1v15", detached: bool = True,
                      chain: Sequence[x509.Certificate] = (),
                      signing_time: datetime.datetime | None = None,
                      encryption_certificate: x509.Certificate | None = None,
                      limits: ParseLimits = DEFAULT_LIMITS) -> bytes:
    """Sign a MIME entity: multipart/signed (detached, RFC 8551 §3.5.3) or pkcs7-mime signed-data (§3.5.2).

    The entity is made canonical first (smime.mime.canonicalize, held to `limits`); the returned entity is 7-bit.
    """
    content = canonicalize(entity, limits)
    der = await build_signed_data(content, signer, hash_name=hash_name, padding=padding, detached=detached,
                                  chain=chain, signing_time=signing_time,
                                  encryption_certificate=encryption_certificate)
    log.debug("signed %d bytes with %s/%s, detached=%s", len(content), hash_name, padding, detached)
    if detached:
        return build_multipart_signed(content, der, MICALG[hash_name])
    return build_pkcs7_mime(der, "signed-data")


async def sign_message(message: bytes, signer: Signer, *, hash_name: HashName = "sha256",
                       padding: SignaturePadding = "pkcs1v15", detached: bool = True,
                       chain: Sequence[x509.Certificate] = (),
                       signing_time: datetime.datetime | None = None,
                       encryption_certificate: x509.Certificate | None = None,
                       limits: ParseLimits = DEFAULT_LIMITS) -> bytes:
    """Sign an RFC 5322 message: its MIME entity is signed, From/To/Subject stay outside."""
    outer, entity = split_message(message)
    signed = await sign_entity(entity, signer, hash_name=hash_name, padding=padding, detached=detached,
                               chain=chain, signing_time=signing_time,
                               encryption_certificate=encryption_certificate, limits=limits)
    return join_message(outer, signed)
