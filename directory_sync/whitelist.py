"""The MSSanté trust space: `listeblanchemssante.xml` (mssante.md §1.3).

One `Domaine` per authorised domain, in the namespace `https://listeblanche.mssante.fr/schema`,
with the operator certificate's DN. `Nom` may be Unicode (IDN): each domain is stored both as
Unicode and as its ASCII (punycode) form (IDNA 2008 with UTS #46 mapping), so a peer's EHLO,
a certificate SAN or an address domain matches whichever form it uses.
"""

from __future__ import annotations

import datetime as dt
import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import idna
from sqlalchemy import Engine, delete, insert, select

from directory_sync.errors import DeletionBrake, WhitelistError
from directory_sync.models import SyncRun, TrustDomain
from directory_sync.sync import DEFAULT_MAX_DELETE_SHARE

log = logging.getLogger(__name__)

NAMESPACE = "https://listeblanche.mssante.fr/schema"
KIND = "listeblanchemssante"


@dataclass(frozen=True, slots=True)
class TrustDomainEntry:
    domain_ascii: str
    domain_unicode: str
    description: str | None
    operator_dn: str | None
    responsible_contact: str | None
    support_contact: str | None
    updated: str | None


@dataclass(slots=True)
class Whitelist:
    generated: str | None = None
    entries: dict[str, TrustDomainEntry] = field(default_factory=dict)
    malformed: list[tuple[int, str]] = field(default_factory=list)


def domain_forms(domain: str) -> tuple[str, str]:
    """(ASCII, Unicode) forms of a domain, lower-case; ValueError when it is not a valid IDN."""
    name = domain.strip().rstrip(".")
    if not name:
        raise ValueError("empty domain")
    try:
        ascii_form = idna.encode(name, uts46=True).decode("ascii").lower()
        unicode_form = idna.decode(ascii_form).lower()
    except idna.IDNAError as exc:
        raise ValueError(str(exc)) from exc
    return ascii_form, unicode_form


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _iter_domains(stream: BinaryIO) -> Iterator[tuple[str, ET.Element | None, str | None]]:
    """('date', None, text) for DateDeGeneration, ('domain', element, None) per Domaine."""
    for event, elem in ET.iterparse(stream, events=("end",)):
        del event
        name = _local(elem.tag)
        if name == "DateDeGeneration":
            yield "date", None, (elem.text or "").strip() or None
        elif name == "Domaine":
            yield "domain", elem, None
            elem.clear()


def parse_whitelist(path: Path | str) -> Whitelist:
    """Parse the list; a `Domaine` without a usable `Nom` is reported (its position), not fatal."""
    result = Whitelist()
    index = 0
    try:
        with Path(path).open("rb") as stream:
            for what, elem, text in _iter_domains(stream):
                if what == "date":
                    result.generated = text
                    continue
                assert elem is not None
                index += 1
                children = {_local(c.tag): (c.text or "").strip() or None for c in elem}
                raw = children.get("Nom")
                if raw is None:
                    result.malformed.append((index, "Domaine without Nom"))
                    continue
                try:
                    ascii_form, unicode_form = domain_forms(raw)
                except ValueError as exc:
                    result.malformed.append((index, f"invalid domain {raw!r}: {exc}"))
                    continue
                if ascii_form in result.entries:
                    continue
                result.entries[ascii_form] = TrustDomainEntry(
                    ascii_form, unicode_form, children.get("Description"), children.get("DNCertificatOperateur"),
                    children.get("ResponsableContact"), children.get("SupportContact"), children.get("DateMAJ"),
                )
    except ET.ParseError as exc:
        raise WhitelistError(path, f"not well-formed XML: {exc}") from exc
    except (LookupError, ValueError) as exc:  # an encoding Python does not know, or cannot decode with
        raise WhitelistError(path, f"unreadable XML: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise WhitelistError(path, f"cannot be read: {exc}") from exc
    if index == 0:
        raise WhitelistError(path, "no Domaine element: not a listeblanchemssante.xml file")
    return result


@dataclass(frozen=True, slots=True)
class WhitelistReport:
    generated: str | None
    domains: int
    inserted: int
    updated: int
    deleted: int
    malformed: tuple[tuple[int, str], ...]

    def summary(self) -> str:
        if not (self.inserted or self.updated or self.deleted):
            return f"trust space: {self.domains} domains; nothing changed"
        return (f"trust space: {self.domains} domains (+{self.inserted} ~{self.updated} -{self.deleted}), "
                f"{len(self.malformed)} malformed")


def import_whitelist(
    engine: Engine, path: Path | str, *, max_delete_share: float = DEFAULT_MAX_DELETE_SHARE, force: bool = False,
) -> WhitelistReport:
    """Replace the stored trust space with the file's, in one transaction, behind the deletion brake."""
    started = dt.datetime.now(dt.UTC)
    wl = parse_whitelist(path)
    cols = ("domain_ascii", "domain_unicode", "description", "operator_dn", "responsible_contact",
            "support_contact", "updated")
    with engine.begin() as conn:
        stored = {r[0]: tuple(r) for r in conn.execute(select(*(getattr(TrustDomain, c) for c in cols))).all()}
        wanted = {k: (e.domain_ascii, e.domain_unicode, e.description, e.operator_dn, e.responsible_contact,
                      e.support_contact, e.updated) for k, e in wl.entries.items()}
        gone = [k for k in stored if k not in wanted]
        new = [k for k in wanted if k not in stored]
        changed = [k for k in wanted if k in stored and stored[k] != wanted[k]]
        if stored and not force and len(gone) > max_delete_share * len(stored):
            exc = DeletionBrake(TrustDomain.__tablename__, len(gone), len(stored), max_delete_share)
        else:
            exc = None
            if gone or changed:
                conn.execute(delete(TrustDomain).where(TrustDomain.domain_ascii.in_(gone + changed)))
            rows = [dict(zip(cols, wanted[k], strict=True)) for k in new + changed]
            if rows:
                conn.execute(insert(TrustDomain), rows)
    report = WhitelistReport(wl.generated, len(wl.entries), len(new), len(changed), len(gone), tuple(wl.malformed))
    with engine.begin() as conn:
        conn.execute(insert(SyncRun).values(
            kind=KIND, source=str(path), started_at=started, finished_at=dt.datetime.now(dt.UTC),
            status="refused" if exc else ("ok" if new or changed or gone else "unchanged"), forced=force,
            rows_read=len(wl.entries), rows_malformed=len(wl.malformed),
            inserted=0 if exc else len(new), updated=0 if exc else len(changed), deleted=0 if exc else len(gone),
            message=str(exc) if exc else None,
        ))
    if exc is not None:
        raise exc
    log.info("%s", report.summary())
    return report


class TrustSpace:
    """The authorised domains held in memory (about 9,000), reloaded after each whitelist import."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._domains: dict[str, str | None] = {}

    def reload(self) -> int:
        with self._engine.connect() as conn:
            rows = conn.execute(select(TrustDomain.domain_ascii, TrustDomain.operator_dn)).all()
        self._domains = {r[0]: r[1] for r in rows}
        return len(self._domains)

    def is_trust_space_domain(self, domain: str) -> bool:
        try:
            ascii_form, _ = domain_forms(domain)
        except ValueError:
            return False
        return ascii_form in self._domains

    def operator_dn(self, domain: str) -> str | None:
        try:
            ascii_form, _ = domain_forms(domain)
        except ValueError:
            return None
        return self._domains.get(ascii_form)


def is_trust_space_domain(engine: Engine, domain: str) -> bool:
    """One-off check against the database (the gateway keeps a `TrustSpace` instead)."""
    try:
        ascii_form, _ = domain_forms(domain)
    except ValueError:
        return False
    with engine.connect() as conn:
        return conn.execute(select(TrustDomain.domain_ascii).where(TrustDomain.domain_ascii == ascii_form)).first() \
            is not None
