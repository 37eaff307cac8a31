"""Shared fixtures of the S/MIME tests: the development PKI (gateway.devpki), keys loaded from its files."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.devpki import DevPki, create_dev_pki
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
