"""The key contract: what smime/ needs from a private key, wherever it lives.

A CPS card (cps/) and a key file satisfy these protocols structurally; neither imports
the other. Only the RSA step goes through them: hashing and AES stay on the host.

`Signer.sign` receives the bytes to be signed (the DER `SET OF` encoding of the signed
attributes, RFC 5652 §5.4), never their digest, because a CPS3 card finishes the SHA-256
itself (PSO HASH with the host's intermediate state, then PSO COMPUTE DIGITAL SIGNATURE).
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

from cryptography import x509

HashName = Literal["sha256", "sha384", "sha512"]
SignaturePadding = Literal["pkcs1v15", "pss"]
KeyTransportPadding = Literal["pkcs1v15", "oaep"]
# OAEP's hash may be SHA-1 on what we receive: it is OpenSSL's default and RFC 8017's
# (A.2.1), and OAEP does not rest on collision resistance. We never choose it to send.
OaepHashName = Literal["sha1", "sha256", "sha384", "sha512"]


@runtime_checkable
class Signer(Protocol):
    """A private signing key and its certificate."""

    @property
    def certificate(self) -> x509.Certificate: ...

    async def sign(self, data: bytes, *, hash_name: HashName = "sha256",
                   padding: SignaturePadding = "pkcs1v15") -> bytes:
        """Hash `data` with `hash_name` and return the RSA signature (PSS: salt = hash length)."""
        ...


@runtime_checkable
class Decrypter(Protocol):
    """A private key-transport key and its certificate (RFC 5652 §6.2.1 KeyTransRecipientInfo)."""

    @property
    def certificate(self) -> x509.Certificate: ...

    async def decrypt_key(self, encrypted_key: bytes, *, padding: KeyTransportPadding = "pkcs1v15",
                          oaep_hash: OaepHashName = "sha256") -> bytes:
        """Return the content-encryption key wrapped in `encrypted_key`."""
        ...
