"""The inbound worker processes' own pieces (gateway.inbound_workers); opening mail in them end to end is
tests/integration/test_secure_relay.py::test_b_opens_inbound_mail_in_a_worker_process."""

from __future__ import annotations

from pathlib import Path

from config.schema import DatabaseConfig
from gateway.db import create_tables, make_engine
from gateway.devdirectory import DirectoryMailbox, seed_directory
from gateway.devpki import DevPki
from gateway.inbound_workers import _InlineLookup
from tests.integration.gateway_support import whitelist

DOMAIN = "dev.mssante.test"


async def test_the_worker_reads_the_directory_on_its_own_thread(dev_pki: DevPki, tmp_path: Path) -> None:
    """The signer's RPPS check reads the directory without a hop to a lookup thread, and reads the same."""
    practitioner = dev_pki.practitioners[0]
    engine = make_engine(DatabaseConfig(url=f"sqlite:///{tmp_path / 'directory.db'}"))
    create_tables(engine)
    (tmp_path / "trust.xml").write_text(whitelist(DOMAIN), encoding="utf-8")
    seed_directory(engine, tmp_path / "trust.xml", [DirectoryMailbox(practitioner.email, practitioner.auth_cert,
                                                                     practitioner.rpps, "EXEMPLE", "Jeanne")])
    lookup = _InlineLookup(engine, threads=1)
    try:
        entry = await lookup.lookup(practitioner.email)
        assert entry is not None and entry.rpps == practitioner.rpps
        assert entry == lookup.lookup_blocking(practitioner.email)
        assert await lookup.lookup(f"nobody@{DOMAIN}") is None
        assert not lookup._pool._threads  # no lookup thread was ever started
    finally:
        lookup.close()
        engine.dispose()
