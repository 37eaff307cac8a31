"""Client of the Annuaire Santé FHIR API v2, and the increments it brings (mssante.md §2.4).

- Authentication by the `ESANTE-API-KEY` header; at most 17 calls per second per application,
  enforced here by a sliding window (1.1 s: a margin for network jitter); 429 and 5xx answers
  (and transport errors) are retried with exponential backoff and jitter, honouring `Retry-After`.
- Searches page through `Bundle.link[relation=next]` (50 entries per page by default).
- Mailboxes are read from Practitioner (PER without a structure), PractitionerRole (PER at a
  structure; its practitioner and organisation come by `_include`) and Organization (ORG,
  APP): the `telecom` entries whose `fr-core-contact-point-email-type` extension says
  MSSANTE; the `as-ext-mailbox-mss-metadata` extension gives their type (TRE_R257), the
  liste rouge flag, the service and the description.
- A resource returned with `active=false` is closed: its mailboxes leave the directory.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import random
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Self

import httpx
from sqlalchemy import Connection, Engine, and_, delete, func, insert, or_, select

from directory_sync.errors import FhirError
from directory_sync.mapping import address_key, content_digest, hash64
from directory_sync.models import Mailbox, SyncRun

log = logging.getLogger(__name__)

PRODUCTION_BASE_URL = "https://gateway.api.esante.gouv.fr/fhir/v2"
API_KEY_HEADER = "ESANTE-API-KEY"
IDNPS_SYSTEM = "urn:oid:1.2.250.1.71.4.2.1"
IDNST_SYSTEM = "urn:oid:1.2.250.1.71.4.2.2"
RPPS_SYSTEM = "https://rpps.esante.gouv.fr"
EMAIL_TYPE_EXT = "fr-core-contact-point-email-type"
MAILBOX_META_EXT = "as-ext-mailbox-mss-metadata"
MAILBOX_TYPES = frozenset({"PER", "ORG", "APP", "CAB"})
KIND = "fhir"
ROLE_INCLUDES = ["PractitionerRole:practitioner", "PractitionerRole:organization"]

Params = dict[str, str | list[str]]


@dataclass(frozen=True, slots=True)
class FhirSettings:
    base_url: str = PRODUCTION_BASE_URL
    api_key: str = ""
    rate_per_second: int = 17
    page_size: int = 100
    max_retries: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    timeout: float = 30.0


class RateLimiter:
    """At most `rate` acquisitions in any window of `window` seconds.

    The API counts its quota per second at its end; network jitter can bring two requests
    closer there than they left here, so the default window keeps a 10 % margin.
    """

    def __init__(self, rate: int, window: float = 1.1) -> None:
        self._rate = rate
        self._window = window
        self._stamps: collections.deque[float] = collections.deque()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                while self._stamps and now - self._stamps[0] >= self._window:
                    self._stamps.popleft()
                if len(self._stamps) < self._rate:
                    self._stamps.append(now)
                    return
                await asyncio.sleep(self._window - (now - self._stamps[0]))


@dataclass(slots=True)
class ClientStats:
    requests: int = 0
    retries: int = 0
    pages: int = 0


class FhirClient:
    """GET with quota, retries and paging; `search()` yields the resources of every page."""

    def __init__(self, settings: FhirSettings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self.stats = ClientStats()
        self._limiter = RateLimiter(settings.rate_per_second)
        self._http = httpx.AsyncClient(
            headers={API_KEY_HEADER: settings.api_key, "Accept": "application/fhir+json"},
            timeout=settings.timeout, transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def get_json(self, url: str, params: Params | None = None) -> dict[str, Any]:
        s = self.settings
        last: str = ""
        status: int | None = None
        for attempt in range(s.max_retries + 1):
            await self._limiter.acquire()
            self.stats.requests += 1
            delay: float | None = None
            try:
                resp = await self._http.get(url, params=params)
            except httpx.TransportError as exc:
                status, last = None, f"{type(exc).__name__}: {exc}"
            else:
                status = resp.status_code
                if status == 200:
                    body = resp.json()
                    if not isinstance(body, dict):
                        raise FhirError(url, status, "the answer is not a JSON object")
                    return body
                last = resp.text[:200]
                if status != 429 and status < 500:
                    raise FhirError(url, status, last)
                delay = _retry_after(resp.headers.get("Retry-After"))
            if attempt == s.max_retries:
                break
            if delay is None:
                delay = min(s.backoff_max, s.backoff_base * 2**attempt) * (0.5 + random.random() / 2)
            self.stats.retries += 1
            log.info("FHIR %s answered %s, retry %d in %.2f s", url, status, attempt + 1, delay)
            await asyncio.sleep(min(delay, s.backoff_max))
        raise FhirError(url, status, f"gave up after {s.max_retries} retries: {last}")

    async def pages(self, resource: str, params: Params) -> AsyncIterator[list[tuple[str, dict[str, Any]]]]:
        """Each page of a search as (search mode, resource): "match", or "include" for `_include`d ones."""
        url: str | None = f"{self.settings.base_url.rstrip('/')}/{resource}"
        query: Params | None = {"_count": str(self.settings.page_size), **params}
        while url is not None:
            bundle = await self.get_json(url, query)
            self.stats.pages += 1
            page = []
            for entry in bundle.get("entry") or ():
                res = entry.get("resource")
                if isinstance(res, dict):
                    page.append((str((entry.get("search") or {}).get("mode", "match")), res))
            yield page
            url = next((lk.get("url") for lk in bundle.get("link") or () if lk.get("relation") == "next"), None)
            query = None  # the next link carries the whole query

    async def search(self, resource: str, params: Params) -> AsyncIterator[dict[str, Any]]:
        async for page in self.pages(resource, params):
            for mode, res in page:
                if mode != "include":
                    yield res


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class FhirMailbox:
    address: str
    mailbox_type: str
    liste_rouge: bool
    service: str | None
    description: str | None
    dematerialisation: str | None


@dataclass(frozen=True, slots=True)
class FhirOwner:
    """A Practitioner, PractitionerRole or Organization reduced to what the directory keeps."""

    kind: str
    ref: str
    active: bool
    id_nat_ps: str | None
    rpps: str | None
    structure_id: str | None
    last_name: str | None
    first_name: str | None
    civility: str | None
    structure_name: str | None
    mailboxes: tuple[FhirMailbox, ...]


def _ext(items: Iterable[Any] | None, suffix: str) -> dict[str, Any] | None:
    for e in items or ():
        if isinstance(e, dict) and str(e.get("url", "")).endswith(suffix):
            return e
    return None


def _codes(concept: dict[str, Any] | None) -> list[str]:
    return [str(c.get("code")) for c in (concept or {}).get("coding") or () if c.get("code")]


def mailboxes_of(resource: dict[str, Any]) -> tuple[FhirMailbox, ...]:
    """The MSSanté mailboxes in a resource's `telecom` (profile as-mailbox-mss)."""
    found = []
    for tc in resource.get("telecom") or ():
        if tc.get("system") != "email" or not tc.get("value"):
            continue
        kind = _ext(tc.get("extension"), EMAIL_TYPE_EXT)
        if kind is None or (kind.get("valueCoding") or {}).get("code") != "MSSANTE":
            continue
        meta = _ext(tc.get("extension"), MAILBOX_META_EXT) or {}
        subs = {str(s.get("url")): s for s in meta.get("extension") or () if isinstance(s, dict)}
        types = _codes((subs.get("type") or {}).get("valueCodeableConcept"))
        mailbox_type = next((t for t in types if t in MAILBOX_TYPES), None)
        if mailbox_type is None:
            mailbox_type = "ORG" if resource.get("resourceType") == "Organization" else "PER"
        digit = (subs.get("digitization") or {}).get("valueBoolean")
        found.append(FhirMailbox(
            address=str(tc["value"]).strip(), mailbox_type=mailbox_type,
            liste_rouge=bool((subs.get("listeRouge") or {}).get("valueBoolean", False)),
            service=(subs.get("service") or {}).get("valueString"),
            description=(subs.get("description") or {}).get("valueString"),
            dematerialisation=None if digit is None else ("OUI" if digit else "NON"),
        ))
    return tuple(found)


def _identifiers(resource: dict[str, Any] | None) -> dict[str, str]:
    return {str(i.get("system")): str(i.get("value"))
            for i in (resource or {}).get("identifier") or () if i.get("value")}


def owner_of(resource: dict[str, Any], included: dict[str, dict[str, Any]] | None = None) -> FhirOwner:
    """The owner of a resource's mailboxes; a PractitionerRole borrows its practitioner's identity
    and its organisation's name from the resources `_include`d in the same page."""
    kind = str(resource.get("resourceType"))
    ref = f"{kind}/{resource.get('id')}"
    active = resource.get("active", True) is not False
    person, org = resource, None
    if kind == "PractitionerRole":
        refs = included or {}
        person = refs.get(str((resource.get("practitioner") or {}).get("reference")), {})
        org = refs.get(str((resource.get("organization") or {}).get("reference")))
    elif kind == "Organization":
        person, org = {}, resource
    ids, org_ids = _identifiers(person), _identifiers(org)
    name: dict[str, Any] = next(iter(person.get("name") or ()), {})
    return FhirOwner(
        kind, ref, active, ids.get(IDNPS_SYSTEM), ids.get(RPPS_SYSTEM), org_ids.get(IDNST_SYSTEM),
        name.get("family"), " ".join(name.get("given") or ()) or None, " ".join(name.get("prefix") or ()) or None,
        None if org is None else org.get("name"), mailboxes_of(resource),
    )


@dataclass(slots=True)
class FhirReport:
    resources: int = 0
    closed_resources: int = 0
    upserted: int = 0
    closed_mailboxes: int = 0
    skipped: list[str] = field(default_factory=list)
    requests: int = 0
    retries: int = 0
    pages: int = 0

    def summary(self) -> str:
        return (f"FHIR: {self.resources} resources in {self.pages} pages ({self.requests} requests, "
                f"{self.retries} retries); {self.upserted} mailboxes upserted, {self.closed_mailboxes} closed "
                f"({self.closed_resources} inactive resources), {len(self.skipped)} skipped")


_MAILBOX_COLUMNS = ("address_key", "address", "mailbox_type", "id_type", "id_pp", "id_nat_ps", "structure_id",
                    "service", "civility", "last_name", "first_name", "structure_name", "dematerialisation",
                    "liste_rouge", "description", "fhir_ref", "source", "row_hash")


def _apply(conn: Connection, owner: FhirOwner, report: FhirReport) -> None:
    if not owner.active:
        report.closed_resources += 1
        clauses = [Mailbox.fhir_ref == owner.ref]
        if owner.kind == "Practitioner" and owner.id_nat_ps:
            clauses.append(and_(Mailbox.id_nat_ps == owner.id_nat_ps, Mailbox.mailbox_type.in_(("PER", "CAB"))))
        if owner.kind == "Organization" and owner.structure_id:
            clauses.append(and_(Mailbox.structure_id == owner.structure_id, Mailbox.mailbox_type.in_(("ORG", "APP"))))
        report.closed_mailboxes += conn.execute(delete(Mailbox).where(or_(*clauses))).rowcount or 0
        return
    keys = []
    for mb in owner.mailboxes:
        key = address_key(mb.address)
        if key is None:
            report.skipped.append(f"{owner.ref}: invalid address {mb.address!r}")
            continue
        keys.append(key)
        values = (key, mb.address, mb.mailbox_type, "8" if owner.rpps else None, owner.rpps, owner.id_nat_ps,
                  owner.structure_id, mb.service, owner.civility, owner.last_name, owner.first_name,
                  owner.structure_name, mb.dematerialisation)
        row = dict(zip(_MAILBOX_COLUMNS, (*values, mb.liste_rouge, mb.description, owner.ref, "fhir",
                                          hash64(content_digest(values))), strict=True))
        conn.execute(delete(Mailbox).where(Mailbox.address_key == key))
        conn.execute(insert(Mailbox).values(**row))
        report.upserted += 1
    gone = delete(Mailbox).where(Mailbox.fhir_ref == owner.ref)
    if keys:
        gone = gone.where(Mailbox.address_key.not_in(keys))
    report.closed_mailboxes += conn.execute(gone).rowcount or 0


async def sync_fhir(
    engine: Engine, client: FhirClient, *, since: dt.datetime | None = None,
    resources: tuple[str, ...] = ("Practitioner", "PractitionerRole", "Organization"),
) -> FhirReport:
    """Apply the API's mailboxes (all of them, or those changed since `since`), one page per transaction.

    Without `since`, only resources that carry a mailbox are asked for
    (`mailbox-mss:contains=@`); with it, every resource updated since then, so that closed
    ones (`active=false`, which carry no telecom) are seen too. Roles come with their
    practitioner and organisation (`_include`).
    """
    started = dt.datetime.now(dt.UTC)
    report = FhirReport()
    base: Params = {"mailbox-mss:contains": "@"} if since is None else {
        "_lastUpdated": "ge" + since.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    status, message = "ok", None
    try:
        for resource in resources:
            params = {**base, "_include": ROLE_INCLUDES} if resource == "PractitionerRole" else base
            async for page in client.pages(resource, params):
                included = {f"{r.get('resourceType')}/{r.get('id')}": r for mode, r in page if mode == "include"}
                owners = [owner_of(r, included) for mode, r in page if mode != "include"]
                report.resources += len(owners)
                if owners:
                    await asyncio.to_thread(_apply_page, engine, owners, report)
    except Exception as exc:
        status, message = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        report.requests, report.retries, report.pages = client.stats.requests, client.stats.retries, client.stats.pages
        await asyncio.to_thread(_record, engine, report, started, status, message, client.settings.base_url)
    log.info("%s", report.summary())
    return report


def last_successful_sync(engine: Engine) -> dt.datetime | None:
    """When the last complete FHIR sync started: the `--since` of the next increment."""
    with engine.connect() as conn:
        value = conn.execute(select(func.max(SyncRun.started_at))
                             .where(SyncRun.kind == KIND, SyncRun.status == "ok")).scalar_one()
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _apply_page(engine: Engine, owners: list[FhirOwner], report: FhirReport) -> None:
    """Apply one page in one transaction.

    A mailbox written here has no extract line (`line_hash` NULL), so the next import of the
    MSSanté extract compares every key instead of going by line (sync.py).
    """
    with engine.begin() as conn:
        for owner in owners:
            _apply(conn, owner, report)


def _record(engine: Engine, report: FhirReport, started: dt.datetime, status: str, message: str | None,
            source: str) -> None:
    with engine.begin() as conn:
        conn.execute(insert(SyncRun).values(
            kind=KIND, source=source, started_at=started, finished_at=dt.datetime.now(dt.UTC), status=status,
            forced=False, rows_read=report.resources, rows_malformed=len(report.skipped), inserted=report.upserted,
            updated=0, deleted=report.closed_mailboxes, message=message,
        ))
