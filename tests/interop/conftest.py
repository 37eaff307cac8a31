"""Fixtures of the interop tests: the development PKI and our keys, loaded from its files."""

from __future__ import annotations

import pytest

from gateway.devpki import DevPki, create_dev_pki
from smime.certpath import TrustStore
from smime.filekeys import FileKey


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return create_dev_pki(tmp_path_factory.mktemp("devpki"))


@pytest.fixture(scope="session")
def trust(pki: DevPki) -> TrustStore:
    return TrustStore.from_pem(pki.ca_bundle.read_bytes(), pki.crls_pem.read_bytes())


@pytest.fixture(scope="session")
def jeanne_sign(pki: DevPki) -> FileKey:
    p = pki.practitioners[0]
    return FileKey.from_pem(p.sign_key.read_bytes(), p.sign_cert.read_bytes(),
                            chain_pem=pki.personnes_cert.read_bytes())


@pytest.fixture(scope="session")
def paul_auth(pki: DevPki) -> FileKey:
    p = pki.practitioners[1]
    return FileKey.from_pem(p.auth_key.read_bytes(), p.auth_cert.read_bytes())

