"""Shared fixtures of the S/MIME tests: the development PKI (gateway.devpki), keys loaded from its files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.devpki import (
    DevPki,
    create_dev_pki,
    issue_certificate,
    load_certificate,
    load_private_key,
    new_rsa_key,
    practitioner_name,
)
from smime.certpath import TrustStore
from smime.filekeys import FileKey

MESSAGE = (b"From: Jeanne EXEMPLE <jeanne.exemple@dev.mssante.test>\r\n"
           b"To: Paul TESTEUR <paul.testeur@dev.mssante.test>\r\n"
           b"Subject: Compte rendu\r\n"
           b"Date: Wed, 25 Nov 2026 10:00:00 +0100\r\n"
           b"Message-ID: <cr-1@dev.mssante.test>\r\n"
           b"MIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=us-ascii\r\n"
           b"Content-Transfer-Encoding: 7bit\r\n"
           b"\r\n"
           b"Bonjour,\r\n\r\nVoici le compte rendu de consultation.\r\n")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return create_dev_pki(tmp_path_factory.mktemp("devpki"))


def _key(cert: Path, key: Path, chain: Path) -> FileKey:
    return FileKey.from_pem(key.read_bytes(), cert.read_bytes(), chain_pem=chain.read_bytes())


@pytest.fixture(scope="session")
def jeanne_sign(pki: DevPki) -> FileKey:
    p = pki.practitioners[0]
    return _key(p.sign_cert, p.sign_key, pki.personnes_cert)


@pytest.fixture(scope="session")
def jeanne_auth(pki: DevPki) -> FileKey:
    p = pki.practitioners[0]
    return _key(p.auth_cert, p.auth_key, pki.personnes_cert)


@pytest.fixture(scope="session")
def paul_auth(pki: DevPki) -> FileKey:
    p = pki.practitioners[1]
    return _key(p.auth_cert, p.auth_key, pki.personnes_cert)


@pytest.fixture(scope="session")
def paul_sign(pki: DevPki) -> FileKey:
    p = pki.practitioners[1]
    return _key(p.sign_cert, p.sign_key, pki.personnes_cert)


@pytest.fixture(scope="session")
def trust(pki: DevPki) -> TrustStore:
    return TrustStore.from_pem(pki.ca_bundle.read_bytes(), pki.crls_pem.read_bytes())


@pytest.fixture(scope="session")
def anchors_only(pki: DevPki) -> TrustStore:
    """The root and the CRLs, no intermediates: what the message carries must complete the path."""
    return TrustStore.from_pem(pki.root_cert.read_bytes(), pki.crls_pem.read_bytes())


class Issuer:
    """Issues odd signer certificates from the PERSONNES CA of the dev PKI (expired, weak, SHA-1, ...)."""

    def __init__(self, pki: DevPki) -> None:
        self.pki = pki
        self.ca_cert = load_certificate(pki.personnes_cert)
        self.ca_key = load_private_key(pki.personnes_key)

    def signer(self, *, bits: int = 2048, email: str = "jeanne.exemple@dev.mssante.test",
               rpps: str = "10001234567", **kwargs: Any) -> FileKey:
        key = new_rsa_key(bits)
        cert = issue_certificate(self.ca_cert, self.ca_key, practitioner_name(rpps, "EXEMPLE", "Jeanne", "Médecin"),
                                 key.public_key(), profile=kwargs.pop("profile", "signature"),
                                 sans=[x509.RFC822Name(email)], **kwargs)
        return FileKey(cert, key, (self.ca_cert,))


@pytest.fixture(scope="session")
def issuer(pki: DevPki) -> Issuer:
    return Issuer(pki)


@pytest.fixture(scope="session")
def weak_key() -> rsa.RSAPrivateKey:
    return new_rsa_key(1024)


@pytest.fixture
def message() -> bytes:
    """A plain message from Jeanne EXEMPLE to Paul TESTEUR."""
    return MESSAGE
