"""SQL models of the directory (SQLAlchemy 2.x), shared by SQLite and PostgreSQL.

Tables carry the `dir_` prefix because the gateway's own tables (accounts, queue) live in the
same database. Rows fed from the extracts keep a 64-bit content hash (`row_hash`) so that a
re-import compares hashes instead of every column; the rows of an extract's line entity
(activities, know-how, diplomas, mailboxes) also keep the hash of the line they came from
(`line_hash`), so that a re-import parses only the lines that changed (sync.py). Identifiers follow the Annuaire Santé
(mssante.md §2.3): idNat_PS is the type digit followed by the RPPS or ADELI number.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Practitioner(Base):
    """A health professional (PS_LibreAcces_Personne_activite, columns 1–13)."""

    __tablename__ = "dir_practitioner"

    id_nat_ps: Mapped[str] = mapped_column(String(20), primary_key=True)
    id_type: Mapped[str | None] = mapped_column(String(2))
    id_pp: Mapped[str | None] = mapped_column(String(20))
    exercise_civility_code: Mapped[str | None] = mapped_column(String(10))
    exercise_civility: Mapped[str | None] = mapped_column(String(60))
    civility_code: Mapped[str | None] = mapped_column(String(10))
    civility: Mapped[str | None] = mapped_column(String(60))
    last_name: Mapped[str | None] = mapped_column(String(200))
    first_name: Mapped[str | None] = mapped_column(String(200))
    profession_code: Mapped[str | None] = mapped_column(String(10))
    profession: Mapped[str | None] = mapped_column(String(200))
    category_code: Mapped[str | None] = mapped_column(String(10))
    category: Mapped[str | None] = mapped_column(String(200))
    row_hash: Mapped[int] = mapped_column(BigInteger)


class Structure(Base):
    """A site where professionals practise (columns 20–47), keyed by its technical id."""

    __tablename__ = "dir_structure"

    structure_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    siret: Mapped[str | None] = mapped_column(String(14))
    siren: Mapped[str | None] = mapped_column(String(9))
    finess_site: Mapped[str | None] = mapped_column(String(9))
    finess_legal: Mapped[str | None] = mapped_column(String(9))
    name: Mapped[str | None] = mapped_column(String(300))
    trade_name: Mapped[str | None] = mapped_column(String(300))
    addressee: Mapped[str | None] = mapped_column(String(200))
    geo_complement: Mapped[str | None] = mapped_column(String(200))
    street_number: Mapped[str | None] = mapped_column(String(20))
    street_repeat: Mapped[str | None] = mapped_column(String(10))
    street_type_code: Mapped[str | None] = mapped_column(String(10))
    street_type: Mapped[str | None] = mapped_column(String(60))
    street: Mapped[str | None] = mapped_column(String(200))
    distribution: Mapped[str | None] = mapped_column(String(200))
    cedex: Mapped[str | None] = mapped_column(String(200))
    postal_code: Mapped[str | None] = mapped_column(String(10))
    commune_code: Mapped[str | None] = mapped_column(String(10))
    commune: Mapped[str | None] = mapped_column(String(200))
    country_code: Mapped[str | None] = mapped_column(String(10))
    country: Mapped[str | None] = mapped_column(String(100))
    phone: Mapped[str | None] = mapped_column(String(40))
    phone2: Mapped[str | None] = mapped_column(String(40))
    fax: Mapped[str | None] = mapped_column(String(40))
    email: Mapped[str | None] = mapped_column(String(200))
    department_code: Mapped[str | None] = mapped_column(String(10))
    department: Mapped[str | None] = mapped_column(String(100))
    former_id: Mapped[str | None] = mapped_column(String(40))
    registration_authority: Mapped[str | None] = mapped_column(String(100))
    row_hash: Mapped[int] = mapped_column(BigInteger)


class Activity(Base):
    """One line of PS_LibreAcces_Personne_activite: a practitioner's activity at a structure.

    The extract has no activity identifier, so the key is a digest of the row's content: a
    changed activity is a deletion plus an insertion.
    """

    __tablename__ = "dir_activity"

    activity_key: Mapped[str] = mapped_column(String(32), primary_key=True)
    id_nat_ps: Mapped[str] = mapped_column(String(20), index=True)
    structure_id: Mapped[str | None] = mapped_column(String(40), index=True)
    know_how_type_code: Mapped[str | None] = mapped_column(String(10))
    know_how_type: Mapped[str | None] = mapped_column(String(100))
    know_how_code: Mapped[str | None] = mapped_column(String(20))
    know_how: Mapped[str | None] = mapped_column(String(200))
    practice_mode_code: Mapped[str | None] = mapped_column(String(10))
    practice_mode: Mapped[str | None] = mapped_column(String(100))
    sector_code: Mapped[str | None] = mapped_column(String(20))
    sector: Mapped[str | None] = mapped_column(String(200))
    pharmacist_section_code: Mapped[str | None] = mapped_column(String(10))
    pharmacist_section: Mapped[str | None] = mapped_column(String(200))
    role_code: Mapped[str | None] = mapped_column(String(20))
    role: Mapped[str | None] = mapped_column(String(200))
    activity_kind_code: Mapped[str | None] = mapped_column(String(20))
    activity_kind: Mapped[str | None] = mapped_column(String(200))
    row_hash: Mapped[int] = mapped_column(BigInteger)
    line_hash: Mapped[int | None] = mapped_column(BigInteger, index=True)


class KnowHow(Base):
    """One line of PS_LibreAcces_SavoirFaire (a practitioner's specialties and competences)."""

    __tablename__ = "dir_know_how"

    know_how_key: Mapped[str] = mapped_column(String(32), primary_key=True)
    id_nat_ps: Mapped[str] = mapped_column(String(20), index=True)
    profession_code: Mapped[str | None] = mapped_column(String(10))
    category_code: Mapped[str | None] = mapped_column(String(10))
    type_code: Mapped[str | None] = mapped_column(String(10))
    type_label: Mapped[str | None] = mapped_column(String(100))
    code: Mapped[str | None] = mapped_column(String(20))
    label: Mapped[str | None] = mapped_column(String(200))
    row_hash: Mapped[int] = mapped_column(BigInteger)
    line_hash: Mapped[int | None] = mapped_column(BigInteger, index=True)


class Diploma(Base):
    """One line of PS_LibreAcces_Dipl_AutExerc (diplomas and authorisations to practise)."""

    __tablename__ = "dir_diploma"

    diploma_key: Mapped[str] = mapped_column(String(32), primary_key=True)
    id_nat_ps: Mapped[str] = mapped_column(String(20), index=True)
    diploma_type_code: Mapped[str | None] = mapped_column(String(20))
    diploma_type: Mapped[str | None] = mapped_column(String(200))
    diploma_code: Mapped[str | None] = mapped_column(String(40))
    diploma: Mapped[str | None] = mapped_column(String(300))
    authorisation_type_code: Mapped[str | None] = mapped_column(String(20))
    authorisation_type: Mapped[str | None] = mapped_column(String(200))
    authorisation_discipline_code: Mapped[str | None] = mapped_column(String(40))
    authorisation_discipline: Mapped[str | None] = mapped_column(String(300))
    row_hash: Mapped[int] = mapped_column(BigInteger)
    line_hash: Mapped[int | None] = mapped_column(BigInteger, index=True)


class Mailbox(Base):
    """A published MSSanté mailbox (BAL), from Extraction_Correspondance_MSSante or FHIR.

    `address_key` is the lookup key: the local part as published, the domain lower-cased
    (mssante.md §1.5: the address never changes after creation). Owner data is kept
    denormalised, as the extract publishes it, so a lookup is a single primary-key read.
    """

    __tablename__ = "dir_mailbox"

    address_key: Mapped[str] = mapped_column(String(320), primary_key=True)
    address: Mapped[str] = mapped_column(String(320))
    mailbox_type: Mapped[str] = mapped_column(String(3))
    id_type: Mapped[str | None] = mapped_column(String(2))
    id_pp: Mapped[str | None] = mapped_column(String(20))
    id_nat_ps: Mapped[str | None] = mapped_column(String(20), index=True)
    structure_id_type: Mapped[str | None] = mapped_column(String(10))
    structure_id: Mapped[str | None] = mapped_column(String(40), index=True)
    service: Mapped[str | None] = mapped_column(String(300))
    civility: Mapped[str | None] = mapped_column(String(60))
    last_name: Mapped[str | None] = mapped_column(String(200))
    first_name: Mapped[str | None] = mapped_column(String(200))
    category_code: Mapped[str | None] = mapped_column(String(10))
    category: Mapped[str | None] = mapped_column(String(200))
    profession_code: Mapped[str | None] = mapped_column(String(10))
    profession: Mapped[str | None] = mapped_column(String(200))
    know_how_code: Mapped[str | None] = mapped_column(String(20))
    know_how: Mapped[str | None] = mapped_column(String(200))
    dematerialisation: Mapped[str | None] = mapped_column(String(20))
    structure_name: Mapped[str | None] = mapped_column(String(300))
    structure_trade_name: Mapped[str | None] = mapped_column(String(300))
    address_line2: Mapped[str | None] = mapped_column(String(200))
    address_line3: Mapped[str | None] = mapped_column(String(200))
    street_number: Mapped[str | None] = mapped_column(String(20))
    street_number_complement: Mapped[str | None] = mapped_column(String(20))
    street_type: Mapped[str | None] = mapped_column(String(60))
    street: Mapped[str | None] = mapped_column(String(200))
    locality: Mapped[str | None] = mapped_column(String(200))
    routing_line: Mapped[str | None] = mapped_column(String(200))
    postal_code: Mapped[str | None] = mapped_column(String(10))
    department: Mapped[str | None] = mapped_column(String(60))
    country: Mapped[str | None] = mapped_column(String(100))
    liste_rouge: Mapped[bool] = mapped_column(Boolean, default=False)
    description: Mapped[str | None] = mapped_column(Text)
    fhir_ref: Mapped[str | None] = mapped_column(String(200), index=True)
    source: Mapped[str] = mapped_column(String(10), default="extract")
    row_hash: Mapped[int] = mapped_column(BigInteger)
    line_hash: Mapped[int | None] = mapped_column(BigInteger, index=True)


class Certificate(Base):
    """A certificate usable for a mailbox or for every mailbox of a practitioner.

    Only the fingerprint is logged; the DER is kept so that the S/MIME layer can encrypt to it.
    """

    __tablename__ = "dir_certificate"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    fingerprint_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    address_key: Mapped[str | None] = mapped_column(String(320), index=True)
    id_nat_ps: Mapped[str | None] = mapped_column(String(20), index=True)
    usage: Mapped[str] = mapped_column(String(20))
    subject: Mapped[str] = mapped_column(Text)
    not_before: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    not_after: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    source: Mapped[str] = mapped_column(String(20))
    der: Mapped[bytes] = mapped_column(LargeBinary)


class TrustDomain(Base):
    """A domain of the MSSanté trust space (listeblanchemssante.xml, mssante.md §1.3)."""

    __tablename__ = "dir_trust_domain"

    domain_ascii: Mapped[str] = mapped_column(String(255), primary_key=True)
    domain_unicode: Mapped[str] = mapped_column(String(255), index=True)
    description: Mapped[str | None] = mapped_column(Text)
    operator_dn: Mapped[str | None] = mapped_column(Text)
    responsible_contact: Mapped[str | None] = mapped_column(String(320))
    support_contact: Mapped[str | None] = mapped_column(String(320))
    updated: Mapped[str | None] = mapped_column(String(40))


class SyncRun(Base):
    """What one sync did (or refused to do), for operators and for `directory stats`."""

    __tablename__ = "dir_sync_run"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(40))
    source: Mapped[str] = mapped_column(Text)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(20))
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    rows_read: Mapped[int] = mapped_column(Integer, default=0)
    rows_malformed: Mapped[int] = mapped_column(Integer, default=0)
    inserted: Mapped[int] = mapped_column(Integer, default=0)
    updated: Mapped[int] = mapped_column(Integer, default=0)
    deleted: Mapped[int] = mapped_column(Integer, default=0)
    message: Mapped[str | None] = mapped_column(Text)

