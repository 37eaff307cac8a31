"""Encryption: EnvelopedData (RFC 5652 §6) with AES-CBC (RFC 3565), AuthEnvelopedData (RFC 5083) with
AES-GCM (RFC 5084); RSA key transport with PKCS#1 v1.5 or OAEP (RFC 3560 / RFC 4055 §4).

Encrypting needs only certificates. Decrypting unwraps the content-encryption key through a `Decrypter`,
so the RSA step may happen on a card; AES stays on the host.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from asn1crypto import algos, cms, core
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from smime import der
from smime.algorithms import (
    CIPHER_BY_OID_NAME,
    CIPHERS,
    ContentCipher,
    hash_algorithm,
    oaep_parameters,
    read_oaep_parameters,
    strong_hash,
)
from smime.cms import (
    describe_identifier,
    identifies,
    issuer_and_serial_der,
    load_content_info,
    parse_errors_as_malformed,
    present,
)
from smime.errors import (
    DecryptionFailed,
    MalformedCms,
    NoRecipientInfo,
    UnsupportedAlgorithm,
)
from smime.keys import Decrypter, HashName, KeyTransportPadding, OaepHashName
from smime.limits import DEFAULT_LIMITS, ParseLimits, check_ber

log = logging.getLogger(__name__)

GCM_NONCE = 12  # RFC 5084 §3.2: 12 octets recommended
GCM_TAG = 16  # RFC 5084 §3.2 allows 12..16; 16 is what OpenSSL and NSS write


class GCMParameters(core.Sequence):  # type: ignore[misc]
    """RFC 5084 §3.2 GCMParameters (asn1crypto has no type for it)."""

    _fields = [  # noqa: RUF012 (asn1crypto's declarative style)
        ("aes_nonce", core.OctetString),
        ("aes_icvlen", core.Integer, {"default": 12}),
    ]


@dataclass(frozen=True, slots=True)
class Decrypted:
    """The plaintext and how it was protected, for the verification report and `inspect`."""

    content: bytes
    structure: str
    cipher: str
    key_transport: str
    recipients: int


@functools.lru_cache(maxsize=16)
def _key_transport_algorithm(key_transport: KeyTransportPadding, oaep_hash: HashName) -> bytes:
    if key_transport == "oaep":
        alg = cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_oaep", "parameters": oaep_parameters(oaep_hash)})
    else:
        alg = cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_pkcs1v15", "parameters": core.Null()})
    out: bytes = alg.dump()
    return out


def _recipient_info(cert: x509.Certificate, cek: bytes, key_transport: KeyTransportPadding,
                    oaep_hash: HashName) -> bytes:
    """A KeyTransRecipientInfo v0 naming the certificate by issuer and serial (RFC 5652 §6.2.1)."""
    public_key = cert.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise UnsupportedAlgorithm(type(public_key).__name__, "recipient key")
    pad: asym_padding.AsymmetricPadding
    if key_transport == "oaep":
        h = hash_algorithm(oaep_hash)
        pad = asym_padding.OAEP(asym_padding.MGF1(h), h, None)
    else:
        pad = asym_padding.PKCS1v15()
    return der.sequence(der.integer(0), issuer_and_serial_der(cert), _key_transport_algorithm(key_transport, oaep_hash),
                        der.octet_string(public_key.encrypt(cek, pad)))


def encrypt_content(content: bytes, recipients: Sequence[x509.Certificate], *,
                    cipher: ContentCipher = "aes256-cbc", key_transport: KeyTransportPadding = "pkcs1v15",
                    oaep_hash: HashName = "sha256") -> bytes:
    """The DER ContentInfo of `content` encrypted to every recipient, with a fresh key (RFC 5084 §1).

    CBC gives EnvelopedData v0; GCM gives AuthEnvelopedData v0, the only place GCM belongs
    (OpenSSL refuses GCM inside EnvelopedData). The ciphertext is copied once, into the output.
    """
    if not recipients:
        raise ValueError("at least one recipient certificate is needed")
    spec = CIPHERS[cipher]
    cek = os.urandom(spec.key_size)
    infos = der.set_of(*(_recipient_info(c, cek, key_transport, oaep_hash) for c in recipients))
    cipher_oid = der.oid(algos.EncryptionAlgorithmId(spec.oid_name).dotted)
    if spec.mode == "cbc":
        iv = os.urandom(16)
        pad = 16 - len(content) % 16
        encryptor = Cipher(algorithms.AES(cek), modes.CBC(iv)).encryptor()
        ciphertext = encryptor.update(content)
        tail = encryptor.update(bytes((pad,)) * pad) + encryptor.finalize()
        algorithm = der.sequence(cipher_oid, der.octet_string(iv))
        trailer: list[bytes] = []
        kind = der.ENVELOPED_DATA
    else:
        nonce = os.urandom(GCM_NONCE)
        encryptor = Cipher(algorithms.AES(cek), modes.GCM(nonce)).encryptor()
        ciphertext = encryptor.update(content)
        tail = encryptor.finalize()
        algorithm = der.sequence(cipher_oid, der.sequence(der.octet_string(nonce), der.integer(GCM_TAG)))
        trailer = [der.octet_string(encryptor.tag)]  # RFC 5083 §2.1: mac, no authAttrs for id-data
        kind = der.AUTH_ENVELOPED_DATA
    eci = der.wrap(der.SEQUENCE, [der.oid(der.DATA), algorithm, *der.wrap(0x80, [ciphertext, tail])])
    body = der.wrap(der.SEQUENCE, [der.integer(0), infos, *eci, *trailer])
    return b"".join(der.wrap(der.SEQUENCE, [der.oid(kind), *der.wrap(0xA0, body)]))


async def decrypt_content(der: bytes, decrypter: Decrypter, *, limits: ParseLimits = DEFAULT_LIMITS) -> Decrypted:
    """Decrypt an EnvelopedData or AuthEnvelopedData (BER accepted) with our key (RFC 5652 §6.2.1).

    The whole structure, ciphertext included, is held to `limits` (`LimitExceeded`) before it is parsed.
    """
    with parse_errors_as_malformed("EnvelopedData"):
        return await _decrypt_content(der, decrypter, limits)


def _hollow(data: bytes) -> tuple[bytes, memoryview] | None:
    """Split a DER (Auth)EnvelopedData into a skeleton without its ciphertext, and the ciphertext itself.

    asn1crypto copies the contents of every level it parses, five times over for the ciphertext; parsing
    only the skeleton keeps a large message to one copy (the plaintext). BER input (indefinite lengths,
    a constructed OCTET STRING) returns None and is parsed whole.
    """
    buf = memoryview(data)
    top = der.read_header(buf, 0, len(buf))
    if top is None or top[0] != der.SEQUENCE or top[2] != len(buf):
        return None
    ci = der.children(buf, top[1], top[2])
    if ci is None or len(ci) != 2 or ci[1][0] != 0xA0:
        return None
    inner = der.children(buf, ci[1][2], ci[1][3])
    if inner is None or len(inner) != 1 or inner[0][0] != der.SEQUENCE:
        return None
    body = der.children(buf, inner[0][2], inner[0][3])
    if body is None:
        return None
    tags = [c[0] for c in body]
    if der.SET not in tags or tags.index(der.SET) + 1 >= len(tags):
        return None
    eci_index = tags.index(der.SET) + 1
    eci = body[eci_index]
    fields = der.children(buf, eci[2], eci[3])
    if eci[0] != der.SEQUENCE or fields is None or len(fields) != 3 or fields[2][0] != 0x80:
        return None
    ciphertext = buf[fields[2][2]:fields[2][3]]
    new_eci = der.tlv(der.SEQUENCE, bytes(buf[fields[0][1]:fields[2][1]]), b"\x80\x00")
    before = bytes(buf[body[0][1]:eci[1]]) if eci_index else b""
    after = bytes(buf[eci[3]:inner[0][3]])
    skeleton = der.tlv(der.SEQUENCE, bytes(buf[ci[0][1]:ci[0][3]]),
                       der.tlv(0xA0, der.tlv(der.SEQUENCE, before, new_eci, after)))
    return skeleton, ciphertext


async def _decrypt_content(der_bytes: bytes, decrypter: Decrypter, limits: ParseLimits) -> Decrypted:
    if not der_bytes:
        raise MalformedCms("empty input")
    check_ber(der_bytes, limits)
    hollowed = _hollow(der_bytes)
    info = load_content_info(hollowed[0] if hollowed else der_bytes, limits)
    kind = info["content_type"].native
    if kind == "enveloped_data":
        eci = info["content"]["encrypted_content_info"]
    elif kind == "authenticated_enveloped_data":
        eci = info["content"]["auth_encrypted_content_info"]
    else:
        raise MalformedCms(f"expected EnvelopedData or AuthEnvelopedData, got {kind}")
    ktri = _find_recipient(info["content"]["recipient_infos"], decrypter.certificate)
    padding, oaep_hash = _key_transport(ktri["key_encryption_algorithm"])
    try:
        cek = await decrypter.decrypt_key(ktri["encrypted_key"].native, padding=padding, oaep_hash=oaep_hash)
    except ValueError:
        raise DecryptionFailed("the content-encryption key does not unwrap with our key") from None
    alg = eci["content_encryption_algorithm"]
    spec = CIPHER_BY_OID_NAME.get(str(alg["algorithm"].native))
    if spec is None:
        raise UnsupportedAlgorithm(str(alg["algorithm"].native), "content encryption")
    if len(cek) != spec.key_size:
        raise DecryptionFailed(f"unwrapped key has {len(cek)} bytes, {spec.name} needs {spec.key_size}")
    ciphertext = hollowed[1] if hollowed else eci["encrypted_content"].native
    if ciphertext is None:
        raise MalformedCms("encrypted content is absent (detached ciphertext is not supported)")
    if kind == "enveloped_data":
        if spec.mode != "cbc":
            raise UnsupportedAlgorithm(f"{spec.name} inside EnvelopedData (RFC 5083 wants AuthEnvelopedData)",
                                       "content encryption")
        content = _decrypt_cbc(cek, alg["parameters"].native, ciphertext)
    else:
        if spec.mode != "gcm":
            raise UnsupportedAlgorithm(f"{spec.name} inside AuthEnvelopedData", "content encryption")
        content = _decrypt_gcm(cek, alg["parameters"], ciphertext, info["content"])
    recipients = len(info["content"]["recipient_infos"])
    log.debug("decrypted %s, %s, key transport %s, %d recipients", kind, spec.name, padding, recipients)
    return Decrypted(content, kind, spec.name, padding if padding == "pkcs1v15" else f"oaep-{oaep_hash}",
                     recipients)


def _find_recipient(infos: cms.RecipientInfos, cert: x509.Certificate) -> cms.KeyTransRecipientInfo:
    for ri in infos:
        if ri.name == "ktri" and identifies(ri.chosen["rid"], cert):
            return ri.chosen
    # Described only now: the other recipients (the sender's copy, say) are not ours in most messages.
    present = tuple(describe_identifier(ri.chosen["rid"]) if ri.name == "ktri" else f"{ri.name} (not supported)"
                    for ri in infos)
    ours = f"{cert.issuer.rfc4514_string()} serial {cert.serial_number:x}"
    raise NoRecipientInfo(ours, present)


def _key_transport(alg: cms.KeyEncryptionAlgorithm) -> tuple[KeyTransportPadding, OaepHashName]:
    name = alg["algorithm"].native
    if name == "rsaes_pkcs1v15":
        return "pkcs1v15", "sha256"
    if name == "rsaes_oaep":
        oaep_hash = read_oaep_parameters(alg["parameters"])
        if oaep_hash == "sha1":  # OpenSSL's default (RFC 8017 A.2.1): fine to read, never chosen to send
            return "oaep", "sha1"
        try:
            return "oaep", strong_hash(oaep_hash)
        except UnsupportedAlgorithm:
            raise UnsupportedAlgorithm(f"OAEP with {oaep_hash}", "key transport") from None
    raise UnsupportedAlgorithm(str(name), "key transport")


def _decrypt_cbc(cek: bytes, iv: object, ciphertext: bytes | memoryview) -> bytes:
    if not isinstance(iv, bytes) or len(iv) != 16:
        raise MalformedCms("AES-CBC parameters must be a 16-byte IV (RFC 3565 §4.1)")
    if len(ciphertext) % 16 or not ciphertext:
        raise DecryptionFailed(f"ciphertext of {len(ciphertext)} bytes is not a whole number of AES blocks")
    decryptor = Cipher(algorithms.AES(cek), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    # PKCS#7 padding (RFC 5652 §6.3); a bad pad says wrong key or damage, and says nothing more.
    pad = padded[-1]
    if not 1 <= pad <= 16 or padded[-pad:] != bytes((pad,)) * pad:
        raise DecryptionFailed("bad CBC padding: wrong key or corrupted ciphertext")
    return padded[:-pad]


def _decrypt_gcm(cek: bytes, params: core.Any, ciphertext: bytes | memoryview, auth: cms.AuthEnvelopedData) -> bytes:
    try:
        gcm = GCMParameters.load(params.dump())
        nonce = gcm["aes_nonce"].native
        icv_len = int(gcm["aes_icvlen"].native)
    except (ValueError, TypeError) as exc:
        raise MalformedCms(f"GCMParameters: {exc}") from None
    tag = auth["mac"].native
    if not 12 <= icv_len <= 16 or len(tag) != icv_len:
        raise MalformedCms(f"GCM tag of {len(tag)} bytes, parameters say {icv_len} (RFC 5084 §3.2: 12 to 16)")
    # RFC 5083 §2.1: the authenticated attributes, DER-encoded as a SET OF, are the AAD.
    attrs = auth["auth_attrs"]
    aad = cms.CMSAttributes(list(attrs)).dump() if present(attrs) else b""
    decryptor = Cipher(algorithms.AES(cek), modes.GCM(nonce, tag, min_tag_length=12)).decryptor()
    if aad:
        decryptor.authenticate_additional_data(aad)
    try:
        return decryptor.update(ciphertext) + decryptor.finalize()
    except InvalidTag:
        raise DecryptionFailed("GCM tag mismatch: the ciphertext or its attributes were altered") from None
