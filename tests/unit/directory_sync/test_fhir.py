from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from directory_sync.errors import FhirError
from directory_sync.fhir import (
    FhirClient,
    FhirSettings,
    last_successful_sync,
    sync_fhir,
)
from directory_sync.lookup import DirectoryLookup
from directory_sync.models import SyncRun
from directory_sync.sync import import_paths
from directory_sync.synthetic import mssante_lines, write_extract


@pytest.fixture
def server(annuaire: Any) -> Any:
    """The stand-in API with 7 practitioners (one without a mailbox) and 2 organisations."""
    mailbox = annuaire.mailbox
    annuaire.resources["Practitioner"] = [
        annuaire.practitioner(f"003-{i}", f"1000{i:07d}", "EXEMPLE", "JEANNE",
                              [mailbox(f"jeanne.exemple{i}@medecin.mssante.fr", liste_rouge=(i == 2))] if i != 4 else [])
        for i in range(7)
    ]
    annuaire.resources["Organization"] = [
        annuaire.organization("org-1", "1123456789", "CH DE DAX",
                              [mailbox("urgences@ch-dax.mssante.fr", "ORG", service="Urgences")]),
        annuaire.organization("org-2", "1987654321", "CLINIQUE SAINT-ÉLOI",
                              [mailbox("robot@clinique.mssante.fr", "APP")]),
    ]
    return annuaire


def _settings(server: Any, **kw: object) -> FhirSettings:
    return FhirSettings(**{"base_url": server.base_url, "api_key": server.KEY, "page_size": 3, "backoff_base": 0.01,
                           **kw})  # type: ignore[arg-type]


async def test_full_sync_pages_retries_and_stores_mailboxes(engine: Engine, server: Any) -> None:
    server.errors = [(429, {"Retry-After": "0"}), (503, {})]
    async with FhirClient(_settings(server)) as client:
        report = await sync_fhir(engine, client)
    assert report.resources == 6 + 2  # practitioner 4 has no mailbox, so the search leaves it out
    assert report.upserted == 8
    assert report.retries == 2
    assert report.pages == 2 + 1 + 1  # 6 practitioners by 3, no role, 2 organisations
    assert all(s.key == server.KEY for s in server.seen)
    first = server.seen[0].query
    assert first["mailbox-mss:contains"] == ["@"] and first["_count"] == ["3"]
    lookup = DirectoryLookup(engine)
    red = lookup.lookup_blocking("jeanne.exemple2@MEDECIN.mssante.fr")
    assert red is not None and red.liste_rouge and red.rpps == "10000000002" and red.id_nat_ps == "810000000002"
    since = last_successful_sync(engine)
    assert since is not None and since <= dt.datetime.now(dt.UTC)
    org = lookup.lookup_blocking("urgences@ch-dax.mssante.fr")
    assert org is not None and (org.mailbox_type, org.structure_name, org.service) == ("ORG", "CH DE DAX", "Urgences")
    app = lookup.lookup_blocking("robot@clinique.mssante.fr")
    assert app is not None and app.mailbox_type == "APP"
    lookup.close()


async def test_increment_closes_inactive_entries_even_from_the_extract(
    engine: Engine, server: Any, tmp_path: Path,
) -> None:
    lines = list(mssante_lines(5))
    per = next(line.split("|") for line in lines[1:] if line.startswith("PER|"))
    import_paths(engine, [write_extract(tmp_path / "m.txt", lines)])
    server.resources["Practitioner"] = [
        server.practitioner("closed-1", per[3], "", "", [], active=False),
        server.practitioner("003-1", "10000000001", "EXEMPLE", "JEANNE", [server.mailbox("nouvelle@pro.mssante.fr")]),
    ]
    server.resources["Organization"] = []
    lookup = DirectoryLookup(engine)
    assert lookup.lookup_blocking(per[1]) is not None
    async with FhirClient(_settings(server)) as client:
        report = await sync_fhir(engine, client, since=dt.datetime(2026, 8, 25, 3, 0, tzinfo=dt.UTC))
    assert server.seen[0].query["_lastUpdated"] == ["ge2026-08-25T03:00:00Z"]
    assert report.closed_resources == 1
    assert report.closed_mailboxes == 1
    assert lookup.lookup_blocking(per[1]) is None
    assert lookup.lookup_blocking("nouvelle@pro.mssante.fr") is not None

    # The next increment no longer lists that mailbox for 003-1: the mailbox FHIR brought is closed.
    server.resources["Practitioner"] = [server.practitioner("003-1", "10000000001", "EXEMPLE", "JEANNE",
                                                       [server.mailbox("autre@pro.mssante.fr")])]
    async with FhirClient(_settings(server)) as client:
        await sync_fhir(engine, client, since=dt.datetime(2026, 8, 26, tzinfo=dt.UTC))
    assert lookup.lookup_blocking("nouvelle@pro.mssante.fr") is None
    assert lookup.lookup_blocking("autre@pro.mssante.fr") is not None

    # The next full extract is authoritative again: compared key by key, it restores the closed entry.
    (again,) = import_paths(engine, [tmp_path / "m.txt"], force=True)
    assert again.method == "compare"
    assert lookup.lookup_blocking(per[1]) is not None
    lookup.close()


async def test_never_more_than_17_requests_in_any_second(engine: Engine, server: Any) -> None:
    server.resources["Practitioner"] = [
        server.practitioner(f"p{i}", f"2000{i:07d}", "X", "Y", [server.mailbox(f"p{i}@pro.mssante.fr")]) for i in range(25)]
    server.resources["Organization"] = []
    async with FhirClient(_settings(server, page_size=1)) as client:
        report = await sync_fhir(engine, client)
    assert report.requests == len(server.seen) == 27
    stamps = [s.at for s in server.seen]
    windows = [sum(1 for t in stamps if start <= t < start + 1.0) for start in stamps]
    assert max(windows) <= 17
    assert stamps[-1] - stamps[0] >= 0.5  # 26 requests cannot all fit in one window


async def test_gives_up_after_the_retries_and_records_the_failure(engine: Engine, server: Any) -> None:
    server.errors = [(500, {})] * 10
    async with FhirClient(_settings(server, max_retries=3)) as client:
        with pytest.raises(FhirError, match="gave up after 3 retries"):
            await sync_fhir(engine, client)
    assert len(server.seen) == 4
    with engine.connect() as conn:
        assert conn.execute(select(SyncRun.status).where(SyncRun.kind == "fhir")).scalar_one() == "failed"
    assert last_successful_sync(engine) is None


async def test_a_bad_key_is_not_retried(engine: Engine, server: Any) -> None:
    async with FhirClient(FhirSettings(base_url=server.base_url, api_key="wrong")) as client:
        with pytest.raises(FhirError) as caught:
            await client.get_json(f"{server.base_url}/Practitioner")
    assert caught.value.status == 401
    assert len(server.seen) == 1


async def test_roles_bring_their_practitioner_and_structure(engine: Engine, server: Any) -> None:
    server.resources["PractitionerRole"] = [
        server.role("role-1", "003-1", "org-1", [server.mailbox("jeanne.exemple@ch-dax.mssante.fr",
                                                                service="Cardiologie")]),
        server.role("role-2", "003-3", "org-2", [server.mailbox("ancien.role@ch-dax.mssante.fr")], active=False),
    ]
    async with FhirClient(_settings(server)) as client:
        report = await sync_fhir(engine, client, since=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    role_query = next(s.query for s in server.seen if s.path.endswith("/PractitionerRole"))
    assert sorted(role_query["_include"]) == ["PractitionerRole:organization", "PractitionerRole:practitioner"]
    assert report.closed_resources == 1
    lookup = DirectoryLookup(engine)
    found = lookup.lookup_blocking("jeanne.exemple@ch-dax.mssante.fr")
    assert found is not None
    assert (found.mailbox_type, found.rpps, found.structure_id, found.structure_name, found.service) == (
        "PER", "10000000001", "1123456789", "CH DE DAX", "Cardiologie")
    # The inactive role closes only its own mailboxes, not the practitioner's other ones.
    assert lookup.lookup_blocking("jeanne.exemple3@medecin.mssante.fr") is not None
    lookup.close()
