"""Fixtures of the directory tests: every test runs on SQLite (WAL) and on PostgreSQL.

PostgreSQL: the session database of tests/conftest.py (`pg_database`), which skips with the
reason only where no server answers (never in CI). The directory's tables get their own
migration history there, beside whatever the gateway's tests create.

`annuaire` is a local stand-in for the Annuaire Santé FHIR API v2: real HTTP on 127.0.0.1,
realistic bundles paged with `Bundle.link[next]`, the ESANTE-API-KEY header checked, an optional
scripted series of errors first (429 with Retry-After, 503, ...), and the time of each request.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from sqlalchemy import Engine

from directory_sync.database import make_engine, migrate
from directory_sync.models import Base


@pytest.fixture(scope="session")
def _sqlite_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    path = tmp_path_factory.mktemp("directory") / "directory.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def _pg_engine(pg_database: str) -> Iterator[Engine]:
    engine = make_engine(pg_database)
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    eng: Engine = request.getfixturevalue("_sqlite_engine" if request.param == "sqlite" else "_pg_engine")
    with eng.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())
    yield eng



KEY = "test-key-0000"
EXT = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-contact-point-email-type"
META = "https://interop.esante.gouv.fr/ig/fhir/annuaire/StructureDefinition/as-ext-mailbox-mss-metadata"
TRE_R256 = "https://mos.esante.gouv.fr/NOS/TRE_R256-TypeMessagerie/FHIR/TRE-R256-TypeMessagerie"
TRE_R257 = "https://mos.esante.gouv.fr/NOS/TRE_R257-TypeBAL/FHIR/TRE-R257-TypeBAL"


def fhir_mailbox(address: str, kind: str = "PER", liste_rouge: bool = False, service: str | None = None) -> dict[str, Any]:
    subs: list[dict[str, Any]] = [
        {"url": "type", "valueCodeableConcept": {"coding": [{"system": TRE_R257, "code": kind}]}},
        {"url": "listeRouge", "valueBoolean": liste_rouge},
        {"url": "digitization", "valueBoolean": True},
    ]
    if service:
        subs.append({"url": "service", "valueString": service})
    return {"system": "email", "value": address, "extension": [
        {"url": EXT, "valueCoding": {"system": TRE_R256, "code": "MSSANTE"}},
        {"url": META, "extension": subs},
    ]}


def fhir_practitioner(rid: str, rpps: str, family: str, given: str, mailboxes: list[dict[str, Any]],
                 active: bool = True) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Practitioner", "id": rid, "active": active,
        "meta": {"lastUpdated": "2026-08-26T03:00:00.000+00:00"},
        "identifier": [
            {"system": "urn:oid:1.2.250.1.71.4.2.1", "value": "8" + rpps,
             "type": {"coding": [{"system": "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203",
                                  "code": "IDNPS"}]}},
            {"system": "https://rpps.esante.gouv.fr", "value": rpps,
             "type": {"coding": [{"system": "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203",
                                  "code": "RPPS"}]}},
        ],
    }
    if active:
        res["name"] = [{"use": "usual", "family": family, "given": [given], "prefix": ["MME"], "suffix": ["DR"]}]
        res["telecom"] = [{"system": "phone", "value": "0100000000"}, *mailboxes]
    return res


def fhir_organization(rid: str, struct_id: str, name: str, mailboxes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Organization", "id": rid, "active": True,
            "identifier": [{"system": "urn:oid:1.2.250.1.71.4.2.2", "value": struct_id}],
            "name": name, "telecom": mailboxes}


def fhir_role(rid: str, practitioner_id: str, organization_id: str, mailboxes: list[dict[str, Any]],
              active: bool = True) -> dict[str, Any]:
    return {"resourceType": "PractitionerRole", "id": rid, "active": active,
            "practitioner": {"reference": f"Practitioner/{practitioner_id}"},
            "organization": {"reference": f"Organization/{organization_id}"}, "telecom": mailboxes}


@dataclass
class Seen:
    at: float
    path: str
    query: dict[str, list[str]]
    key: str | None


@dataclass
class FakeAnnuaire:
    KEY = KEY
    mailbox = staticmethod(fhir_mailbox)
    practitioner = staticmethod(fhir_practitioner)
    organization = staticmethod(fhir_organization)
    role = staticmethod(fhir_role)

    resources: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    page_size: int = 3
    errors: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    _server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir/v2"

    def start(self) -> FakeAnnuaire:
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                state.seen.append(Seen(time.monotonic(), parts.path, query, self.headers.get("ESANTE-API-KEY")))
                if self.headers.get("ESANTE-API-KEY") != KEY:
                    return self._send(401, {"resourceType": "OperationOutcome"})
                if state.errors:
                    status, headers = state.errors.pop(0)
                    return self._send(status, {"resourceType": "OperationOutcome"}, headers)
                resource = parts.path.rsplit("/", 1)[-1]
                items = state.resources.get(resource, [])
                if "_lastUpdated" not in query and query.get("mailbox-mss:contains") == ["@"]:
                    items = [r for r in items if any(t.get("system") == "email" for t in r.get("telecom") or ())]
                size = int(query.get("_count", ["50"])[0])
                page = int(query.get("_page", ["0"])[0])
                chunk = items[page * size:(page + 1) * size]
                included: list[dict[str, Any]] = []
                if "_include" in query:
                    everyone = {f"{r['resourceType']}/{r['id']}": r for kind in ("Practitioner", "Organization")
                                for r in state.resources.get(kind, [])}
                    refs = {(r.get(field) or {}).get("reference") for r in chunk for field in ("practitioner",
                                                                                                "organization")}
                    included = [everyone[ref] for ref in sorted(r for r in refs if r) if ref in everyone]
                links = [{"relation": "self", "url": self.path}]
                if (page + 1) * size < len(items):
                    nxt = {k: v[0] for k, v in query.items()} | {"_page": str(page + 1)}
                    links.append({"relation": "next", "url": f"{state.base_url}/{resource}?{urlencode(nxt)}"})
                self._send(200, {"resourceType": "Bundle", "type": "searchset", "link": links,
                                 "entry": [{"fullUrl": f"{state.base_url}/{r['resourceType']}/{r['id']}", "resource": r,
                                            "search": {"mode": mode}}
                                           for mode, rs in (("match", chunk), ("include", included)) for r in rs]})

            def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def annuaire() -> Iterator[FakeAnnuaire]:
    server = FakeAnnuaire().start()
    yield server
    server.stop()
