"""Fixtures for the gateway's unit tests: one development PKI per test session (RSA key generation is slow-ish)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.devpki import DevPki, create_dev_pki


@pytest.fixture(scope="session")
def dev_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """A complete development PKI, shared read-only by the session's tests: never modify its files."""
    return create_dev_pki(tmp_path_factory.mktemp("devpki") / "pki")


@pytest.fixture(scope="session")
def dev_pki_dir(dev_pki: DevPki) -> Path:
    return dev_pki.directory
