"""The file-key backend: a private key held in memory, loaded from PEM or PKCS#12 bytes.

It satisfies the `Signer` and `Decrypter` protocols of smime.keys, as a CPS card does. The caller reads
the files (smime/ does no I/O); the key never leaves this object and is never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import (
    load_der_private_key,
    load_pem_private_key,
    pkcs12,
)

from smime.algorithms import hash_algorithm
from smime.errors import SmimeError
from smime.keys import HashName, KeyTransportPadding, OaepHashName, SignaturePadding

log = logging.getLogger(__name__)


class KeyLoadError(SmimeError):
    """A key or certificate file could not be loaded (wrong password, not RSA, not matching)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"cannot load key: {reason}")


@dataclass(frozen=True, slots=True)
class FileKey:
    """An RSA private key with its certificate and the chain that goes with it (without the root)."""

    certificate: x509.Certificate
    private_key: rsa.RSAPrivateKey = field(repr=False)
    chain: tuple[x509.Certificate, ...] = ()

    def __post_init__(self) -> None:
        if self.certificate.public_key() != self.private_key.public_key():
            raise KeyLoadError("the private key does not match the certificate")

    async def sign(self, data: bytes, *, hash_name: HashName = "sha256",
                   padding: SignaturePadding = "pkcs1v15") -> bytes:
        algorithm = hash_algorithm(hash_name)
        pad: asym_padding.AsymmetricPadding
        if padding == "pss":
            pad = asym_padding.PSS(asym_padding.MGF1(algorithm), algorithm.digest_size)
        else:
            pad = asym_padding.PKCS1v15()
        return self.private_key.sign(data, pad, algorithm)

    async def decrypt_key(self, encrypted_key: bytes, *, padding: KeyTransportPadding = "pkcs1v15",
                          oaep_hash: OaepHashName = "sha256") -> bytes:
        pad: asym_padding.AsymmetricPadding
        if padding == "oaep":
            algorithm = hash_algorithm(oaep_hash)
            pad = asym_padding.OAEP(asym_padding.MGF1(algorithm), algorithm, None)
        else:
            pad = asym_padding.PKCS1v15()
        return self.private_key.decrypt(encrypted_key, pad)

    @classmethod
    def from_pem(cls, key_pem: bytes, cert_pem: bytes, password: bytes | None = None,
                 chain_pem: bytes = b"") -> FileKey:
        """A key from PEM (or DER) key bytes and the certificate's PEM; `chain_pem` adds intermediates."""
        try:
            if key_pem.lstrip().startswith(b"-----"):
                key = load_pem_private_key(key_pem, password)
            else:
                key = load_der_private_key(key_pem, password)
            certs = x509.load_pem_x509_certificates(cert_pem)
            extra = x509.load_pem_x509_certificates(chain_pem) if chain_pem.strip() else []
        except (ValueError, TypeError) as exc:
            raise KeyLoadError(str(exc)) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise KeyLoadError(f"only RSA keys are supported, got {type(key).__name__}")
        return cls(certs[0], key, _without_roots([*certs[1:], *extra]))

    @classmethod
    def from_pkcs12(cls, data: bytes, password: bytes | None) -> FileKey:
        """A key from a PKCS#12 file (RFC 7292) protected by `password`."""
        try:
            p12 = pkcs12.load_pkcs12(data, password)
        except (ValueError, TypeError) as exc:
            raise KeyLoadError(f"PKCS#12: {exc}") from None
        if p12.key is None or p12.cert is None:
            raise KeyLoadError("PKCS#12 holds no key or no certificate")
        if not isinstance(p12.key, rsa.RSAPrivateKey):
            raise KeyLoadError(f"only RSA keys are supported, got {type(p12.key).__name__}")
        return cls(p12.cert.certificate, p12.key,
                   _without_roots([c.certificate for c in p12.additional_certs]))


def _without_roots(certs: Sequence[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """RFC 8551 §2.4.1 sends the chain; a self-signed root is the receiver's to have, not ours to send."""
    return tuple(c for c in certs if c.subject != c.issuer)
