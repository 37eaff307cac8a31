"""Algorithm names, OIDs and policy: the one place that maps CMS identifiers to cryptography's primitives.

Names follow RFC 5754 (SHA-2 in CMS), RFC 4055 (RSA-PSS and RSA-OAEP parameters), RFC 3565 (AES-CBC in CMS),
RFC 5084 (AES-GCM in CMS) and the micalg values of RFC 8551 §3.5.3.2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from asn1crypto import algos
from cryptography.hazmat.primitives import hashes

from smime.errors import UnsupportedAlgorithm
from smime.keys import HashName

ContentCipher = Literal["aes128-cbc", "aes256-cbc", "aes128-gcm", "aes256-gcm"]

HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
    "md5": hashes.MD5,
}

# RFC 8551 §3.5.3.2: the micalg parameter spells the digest with a hyphen.
MICALG = {"md5": "md5", "sha1": "sha-1", "sha224": "sha-224", "sha256": "sha-256",
          "sha384": "sha-384", "sha512": "sha-512"}
MICALG_TO_HASH = {v: k for k, v in MICALG.items()}

STRONG_HASHES: frozenset[str] = frozenset({"sha256", "sha384", "sha512"})

# asn1crypto names of the signature algorithms in certificates and SignerInfos, mapped to their digest.
_SIGNED_DIGEST = {
    "md5_rsa": "md5", "sha1_rsa": "sha1", "sha224_rsa": "sha224", "sha256_rsa": "sha256",
    "sha384_rsa": "sha384", "sha512_rsa": "sha512",
    "sha1_ecdsa": "sha1", "sha224_ecdsa": "sha224", "sha256_ecdsa": "sha256", "sha384_ecdsa": "sha384",
    "sha512_ecdsa": "sha512",
}


@dataclass(frozen=True, slots=True)
class CipherSpec:
    """A content-encryption algorithm: its asn1crypto name, key length and mode."""

    name: ContentCipher
    oid_name: str
    key_size: int
    mode: Literal["cbc", "gcm"]


CIPHERS: dict[str, CipherSpec] = {
    "aes128-cbc": CipherSpec("aes128-cbc", "aes128_cbc", 16, "cbc"),
    "aes256-cbc": CipherSpec("aes256-cbc", "aes256_cbc", 32, "cbc"),
    "aes128-gcm": CipherSpec("aes128-gcm", "aes128_gcm", 16, "gcm"),
    "aes256-gcm": CipherSpec("aes256-gcm", "aes256_gcm", 32, "gcm"),
}
CIPHER_BY_OID_NAME = {spec.oid_name: spec for spec in CIPHERS.values()}


def hash_algorithm(name: str) -> hashes.HashAlgorithm:
    """The cryptography hash object for a CMS digest name (`sha256`, ...)."""
    try:
        return HASHES[name]()
    except KeyError:
        raise UnsupportedAlgorithm(name, "digest") from None


def strong_hash(name: str) -> HashName:
    """Narrow a digest name to the ones the key protocols accept (SHA-2, 256 bits and up)."""
    if name == "sha256":
        return "sha256"
    if name == "sha384":
        return "sha384"
    if name == "sha512":
        return "sha512"
    raise UnsupportedAlgorithm(name, "digest")


def digest_of_signature_algorithm(name: str) -> str | None:
    """The digest named by a combined signature algorithm (`sha1_rsa` → `sha1`), None when it names none."""
    return _SIGNED_DIGEST.get(name)


def pss_parameters(hash_name: HashName) -> algos.RSASSAPSSParams:
    """Explicit RSASSA-PSS parameters (RFC 4055 §3.1): same hash for MGF1, salt = hash length."""
    digest = algos.DigestAlgorithm({"algorithm": hash_name})
    return algos.RSASSAPSSParams({
        "hash_algorithm": digest,
        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": digest},
        "salt_length": hash_algorithm(hash_name).digest_size,
        "trailer_field": "trailer_field_bc",
    })


def oaep_parameters(hash_name: HashName) -> algos.RSAESOAEPParams:
    """Explicit RSAES-OAEP parameters (RFC 4055 §4.1): the defaults would mean SHA-1, so always spell them out."""
    digest = algos.DigestAlgorithm({"algorithm": hash_name})
    return algos.RSAESOAEPParams({
        "hash_algorithm": digest,
        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": digest},
    })


def read_oaep_parameters(params: algos.RSAESOAEPParams | None) -> str:
    """The hash of encoded OAEP parameters; absent parameters mean SHA-1 (RFC 8017 A.2.1)."""
    if params is None or params.native is None:
        return "sha1"
    hash_name = str(params["hash_algorithm"]["algorithm"].native)
    mgf = params["mask_gen_algorithm"]
    mgf_hash = str(mgf["parameters"]["algorithm"].native) if mgf["parameters"].native is not None else "sha1"
    if mgf["algorithm"].native != "mgf1" or mgf_hash != hash_name:
        raise UnsupportedAlgorithm(f"OAEP with {hash_name} and MGF {mgf['algorithm'].native}/{mgf_hash}",
                                   "key transport")
    label = params["p_source_algorithm"]
    if label["parameters"].native not in (None, b""):
        raise UnsupportedAlgorithm("OAEP with a non-empty label", "key transport")
    return hash_name


def read_pss_parameters(params: algos.RSASSAPSSParams) -> tuple[str, int]:
    """The hash and salt length of encoded PSS parameters (RFC 4055 §3.1); MGF1 must use the same hash."""
    hash_name = str(params["hash_algorithm"]["algorithm"].native)
    mgf = params["mask_gen_algorithm"]
    mgf_hash = str(mgf["parameters"]["algorithm"].native) if mgf["parameters"].native is not None else "sha1"
    if mgf["algorithm"].native != "mgf1" or mgf_hash != hash_name:
        raise UnsupportedAlgorithm(f"PSS with {hash_name} and MGF {mgf['algorithm'].native}/{mgf_hash}",
                                   "signature")
    return hash_name, int(params["salt_length"].native)
