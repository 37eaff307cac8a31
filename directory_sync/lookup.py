"""Recipient lookup for the SMTP session (DESIGN.md flow 1: `550 5.1.1` when unknown).

A lookup is one primary-key read of `dir_mailbox` plus one indexed read of the usable
certificates, run on a small thread pool so the event loop never waits on the database. The
domain is compared case-insensitively (RFC 5321 §2.4), the local part exactly as published.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import Engine, or_, select
from sqlalchemy.exc import SQLAlchemyError

from directory_sync.errors import DirectoryUnavailable
from directory_sync.mapping import address_key
from directory_sync.models import Certificate, Mailbox

log = logging.getLogger(__name__)

ENCRYPTION_USAGES = ("encryption", "any")


@dataclass(frozen=True, slots=True)
class RecipientCertificate:
    """A certificate the S/MIME layer may encrypt to; only its fingerprint is ever logged."""

    fingerprint_sha256: str
    subject: str
    not_after: dt.datetime
    der: bytes


@dataclass(frozen=True, slots=True)
class Recipient:
    """A published MSSanté mailbox and its owner, as the directory knows them."""

    address: str
    mailbox_type: str
    id_nat_ps: str | None
    rpps: str | None
    civility: str | None
    last_name: str | None
    first_name: str | None
    profession: str | None
    structure_id: str | None
    structure_name: str | None
    service: str | None
    liste_rouge: bool
    certificates: tuple[RecipientCertificate, ...]


_MAILBOX = select(
    Mailbox.address, Mailbox.mailbox_type, Mailbox.id_type, Mailbox.id_pp, Mailbox.id_nat_ps, Mailbox.civility,
    Mailbox.last_name, Mailbox.first_name, Mailbox.profession, Mailbox.structure_id, Mailbox.structure_name,
    Mailbox.service, Mailbox.liste_rouge,
)


class DirectoryLookup:
    """`await lookup(address)`: the recipient, or None when the address is not published."""

    def __init__(self, engine: Engine, *, threads: int = 4) -> None:
        self._engine = engine
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dir-lookup")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    async def lookup(self, address: str) -> Recipient | None:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.lookup_blocking, address)

    def lookup_blocking(self, address: str, now: dt.datetime | None = None) -> Recipient | None:
        key = address_key(address)
        if key is None:
            return None
        try:
            with self._engine.connect() as conn:
                row = conn.execute(_MAILBOX.where(Mailbox.address_key == key)).first()
                if row is None:
                    return None
                when = now or dt.datetime.now(dt.UTC)
                owners = [Certificate.address_key == key]
                if row.id_nat_ps:
                    owners.append(Certificate.id_nat_ps == row.id_nat_ps)
                certs = conn.execute(
                    select(Certificate.fingerprint_sha256, Certificate.subject, Certificate.not_after, Certificate.der)
                    .where(or_(*owners), Certificate.usage.in_(ENCRYPTION_USAGES),
                           Certificate.not_before <= when, Certificate.not_after > when)
                    .order_by(Certificate.not_after.desc())
                ).all()
        except SQLAlchemyError as exc:
            log.warning("directory lookup failed: %s", type(exc).__name__)
            raise DirectoryUnavailable(type(exc).__name__) from exc
        return Recipient(
            address=row.address, mailbox_type=row.mailbox_type, id_nat_ps=row.id_nat_ps,
            rpps=row.id_pp if row.id_type == "8" else None, civility=row.civility, last_name=row.last_name,
            first_name=row.first_name, profession=row.profession, structure_id=row.structure_id,
            structure_name=row.structure_name, service=row.service, liste_rouge=bool(row.liste_rouge),
            certificates=tuple(
                RecipientCertificate(c.fingerprint_sha256, c.subject, _aware(c.not_after), c.der) for c in certs
            ),
        )


def _aware(value: dt.datetime) -> dt.datetime:
    """SQLite returns naive datetimes; they were stored in UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
