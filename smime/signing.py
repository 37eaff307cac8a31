"""Signing (RFC 5652 §5, RFC 8551 §3.5): SignedData built with asn1crypto, the RSA step done by a `Signer`.

The signer receives the DER `SET OF` encoding of the signed attributes, not their digest (smime.keys),
so a CPS card can finish the hash itself. Attributes are those RFC 8551 §2.5 asks for: contentType,
messageDigest, signingTime, SMIMECapabilities and SMIMEEncryptionKeyPreference.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence

from asn1crypto import algos, cms, core
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from smime.algorithms import MICALG, hash_algorithm, pss_parameters
from smime.cms import issuer_and_serial, to_asn1
from smime.keys import HashName, SignaturePadding, Signer
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


def _attribute(kind: str, value: object) -> cms.CMSAttribute:
    return cms.CMSAttribute({"type": kind, "values": [value]})


def signed_attributes(content_digest: bytes, *, signing_time: datetime.datetime,
                      encryption_certificate: x509.Certificate | None) -> cms.CMSAttributes:
    """The signed attributes, in DER order (X.690 §11.6: a SET OF is sorted by encoding)."""
    caps = cms.SMIMECapabilites([{"capability_id": c} for c in CAPABILITIES])
    attrs = [
        _attribute("content_type", "data"),
        # RFC 5652 §11.3: UTCTime up to 2049, GeneralizedTime after.
        _attribute("signing_time", cms.Time({"utc_time" if signing_time.year < 2050 else "general_time":
                                             signing_time.replace(microsecond=0)})),
        _attribute("message_digest", content_digest),
        _attribute("smime_capabilities", caps),
    ]
    if encryption_certificate is not None:
        attrs.append(_attribute("encrypt_key_pref", cms.SMIMEEncryptionKeyPreference(
            name="issuer_and_serial_number", value=issuer_and_serial(encryption_certificate))))
    attrs.sort(key=lambda a: a.dump())
    return cms.CMSAttributes(attrs)


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
    attrs = signed_attributes(digest.finalize(), signing_time=when,
                              encryption_certificate=encryption_certificate or signer.certificate)
    signature = await signer.sign(attrs.dump(), hash_name=hash_name, padding=padding)
    if padding == "pss":
        sig_alg = algos.SignedDigestAlgorithm({"algorithm": "rsassa_pss", "parameters": pss_parameters(hash_name)})
    else:
        sig_alg = algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15", "parameters": core.Null()})
    signer_info = cms.SignerInfo({
        "version": "v1",
        "sid": cms.SignerIdentifier(name="issuer_and_serial_number", value=issuer_and_serial(signer.certificate)),
        "digest_algorithm": algos.DigestAlgorithm({"algorithm": hash_name}),
        "signed_attrs": attrs,
        "signature_algorithm": sig_alg,
        "signature": signature,
    })
    certs = [signer.certificate, *(c for c in chain if c.subject != c.issuer and c != signer.certificate)]
    signed_data = cms.SignedData({
        "version": "v1",
        "digest_algorithms": [algos.DigestAlgorithm({"algorithm": hash_name})],
        "encap_content_info": {"content_type": "data", "content": None if detached else content},
        "certificates": [cms.CertificateChoices(name="certificate", value=to_asn1(c)) for c in certs],
        "signer_infos": [signer_info],
    })
    der: bytes = cms.ContentInfo({"content_type": "signed_data", "content": signed_data}).dump()
    return der


async def sign_entity(entity: bytes, signer: Signer, *, hash_name: HashName = "sha256",
                      padding: SignaturePadding = "pkcs1v15", detached: bool = True,
                      chain: Sequence[x509.Certificate] = (),
                      signing_time: datetime.datetime | None = None,
                      encryption_certificate: x509.Certificate | None = None) -> bytes:
    """Sign a MIME entity: multipart/signed (detached, RFC 8551 §3.5.3) or pkcs7-mime signed-data (§3.5.2).

    The entity is made canonical first (smime.mime.canonicalize); the returned entity is 7-bit.
    """
    content = canonicalize(entity)
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
                       encryption_certificate: x509.Certificate | None = None) -> bytes:
    """Sign an RFC 5322 message: its MIME entity is signed, From/To/Subject stay outside."""
    outer, entity = split_message(message)
    signed = await sign_entity(entity, signer, hash_name=hash_name, padding=padding, detached=detached,
                               chain=chain, signing_time=signing_time,
                               encryption_certificate=encryption_certificate)
    return join_message(outer, signed)
