"""How each extract's columns feed the directory tables (by header name, mssante.md §2.2).

An `EntitySpec` names a table, its key and the header each column comes from; bound to a
reader it becomes a fast extractor (one `itemgetter` per row) that returns the key, a 64-bit
content hash and the values, or the reason the row is malformed.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from sqlalchemy import Table

from directory_sync.errors import MissingColumns, RowRejected
from directory_sync.extracts import ExtractKind, ExtractReader
from directory_sync.models import (
    Activity,
    Diploma,
    KnowHow,
    Mailbox,
    Practitioner,
    Structure,
)

MAILBOX_TYPES = frozenset({"PER", "ORG", "APP", "CAB"})

Values = tuple[str | None, ...]


def address_key(address: str) -> str | None:
    """The lookup key of an address: local part as published, domain lower-cased; None if invalid."""
    local, sep, domain = address.strip().rpartition("@")
    if not sep or not local or not domain or " " in address.strip():
        return None
    return f"{local}@{domain.lower()}"


_CONTENT_HASH = hashlib.blake2b(digest_size=16)
"""Copied for each row: a copy costs less than a new hash object, whose parameters are parsed each time."""
_SIGNED_HEAD = struct.Struct(">q").unpack_from


def content_digest(values: Values) -> bytes:
    """The content digest of a row: the BLAKE2b-128 of its fields joined by US (0x1F), an empty field as ''."""
    digest = _CONTENT_HASH.copy()
    digest.update("\x1f".join(v if v is not None else "" for v in values).encode("utf-8"))
    return digest.digest()


def hash64(digest: bytes) -> int:
    """The row hash kept in a BIGINT: the digest's first 8 bytes as a signed big-endian integer."""
    value: int = _SIGNED_HEAD(digest)[0]
    return value


@dataclass(frozen=True, slots=True)
class EntitySpec:
    """One table fed by an extract.

    `per_line`: the extract's line entity, one row per line (activities, know-how, diplomas,
    mailboxes). Its content hash is the hash of its line, which it also keeps as `line_hash`: that
    is what a re-import compares (sync.py). The kind's other entities are the keys its rows name
    in columns of the same names (an activity's `id_nat_ps` and `structure_id`).

    key_header None means the row has no identifier: the key is the owner's idNat_PS (the
    first field) followed by the line's hash, and a change is delete + insert.
    """

    name: str
    table: Table
    key_column: str
    fields: tuple[tuple[str, str], ...]
    key_header: str | None = None
    required: tuple[str, ...] = ()
    needed: tuple[str, ...] = ()
    optional_entity: bool = False
    constants: tuple[tuple[str, Any], ...] = ()
    normalise_key: Callable[[str], str | None] | None = None
    validate: Callable[[Values], str | None] | None = None
    per_line: bool = False

    @property
    def columns(self) -> tuple[str, ...]:
        """The insert columns: `extract`'s parameters, then `line_hash` for the line entity."""
        line = ("line_hash",) if self.per_line else ()
        return (self.key_column, *(c for c, _ in self.fields), *(c for c, _ in self.constants), "row_hash", *line)

    def values_sql(self, paramstyle: str = "qmark") -> str:
        """The VALUES of `extract`'s parameters, a field's '' stored as NULL. With numbered parameters (SQLite's
        qmark) a CASE, which costs SQLite less than NULLIF (a function call), which costs it less than binding
        None from Python; with PostgreSQL's %s, which cannot name a parameter twice, NULLIF."""
        fields = range(2, len(self.fields) + 2)  # after the key, 1-based
        if paramstyle == "qmark":
            return ", ".join(f"CASE WHEN ?{n} <> '' THEN ?{n} END" if n in fields else f"?{n}"
                             for n in range(1, len(self.columns) + 1))
        return ", ".join("NULLIF(%s, '')" if n in fields else "%s" for n in range(1, len(self.columns) + 1))

    def bind(self, reader: ExtractReader) -> BoundEntity:
        key = () if self.key_header is None else (self.key_header,)
        missing = [h for h in dict.fromkeys((*key, *self.required, *self.needed)) if reader.column(h) is None]
        if missing:
            raise MissingColumns(reader.source.name, reader.kind.value, tuple(missing))
        return BoundEntity(self, reader)


class BoundEntity:
    """An EntitySpec bound to the column positions of one file.

    `extract(row, line_hash)` gives (key, content hash, insert parameters), or None when the row has no
    such entity; it raises RowRejected when the row is unusable for this table. The parameters keep the
    fields as the file spells them, an empty field as '': the insert statements turn '' into NULL
    (`EntitySpec.values_sql`).
    """

    def __init__(self, spec: EntitySpec, reader: ExtractReader) -> None:
        self.spec = spec
        self.table = spec.table
        positions = [reader.column(h) for _, h in spec.fields]
        present = [p for p in positions if p is not None]
        self._slots = [None if p is None else present.index(p) for p in positions]
        getter = itemgetter(*present) if present else (lambda _row: ())
        self._get: Callable[[list[str]], Any] = getter
        self._single = len(present) == 1
        self._all_present = len(present) == len(positions)
        self._key_pos = None if spec.key_header is None else reader.column(spec.key_header)
        self._required = tuple((h, reader.column(h)) for h in spec.required)
        self._constants: tuple[Any, ...] = tuple(v for _, v in spec.constants)
        self.key_position = self._key_pos if spec.normalise_key is None else None
        """Where the key stands in a row, when it is used as it stands (stripped), else None."""
        # A closure made once per file: it runs for every line of a national extract.
        self.extract: Callable[[list[str], int], tuple[str, int, tuple[Any, ...]] | None] = self._extractor()

    def _extractor(self) -> Callable[[list[str], int], tuple[str, int, tuple[Any, ...]] | None]:
        spec = self.spec
        get, single, all_present, slots = self._get, self._single, self._all_present, self._slots
        key_pos, required, constants = self._key_pos, self._required, self._constants
        normalise, validate, optional, per_line = spec.normalise_key, spec.validate, spec.optional_entity, spec.per_line
        key_header = spec.key_header
        new_hash, signed_head = _CONTENT_HASH.copy, _SIGNED_HEAD

        def extract(row: list[str], line_hash: int) -> tuple[str, int, tuple[Any, ...]] | None:
            for header, pos in required:
                if pos is None or not row[pos]:
                    raise RowRejected(f"empty {header!r}")
            values = get(row)
            if single:
                values = (values,)
            if not all_present:
                values = tuple(None if s is None else values[s] for s in slots)
            if validate is not None:
                reason = validate(values)
                if reason is not None:
                    raise RowRejected(reason)
            if per_line:
                row_hash = line_hash
            else:
                joined = "\x1f".join(values) if all_present else "\x1f".join([v or "" for v in values])
                digest = new_hash()  # hash64(content_digest(values)), inlined
                digest.update(joined.encode("utf-8"))
                row_hash = signed_head(digest.digest())[0]
            if key_pos is None:
                # Owner first, so that a file sorted by practitioner inserts in key order.
                key: str | None = (values[0] or "") + format(line_hash & 0xFFFF_FFFF_FFFF, "012x")
            else:
                key = row[key_pos].strip()
                if normalise is not None and key:
                    key = normalise(key)
                    if key is None:
                        raise RowRejected(f"invalid {key_header!r}: {row[key_pos].strip()!r}")
            if not key:
                if optional:
                    return None
                raise RowRejected(f"empty {key_header!r}")
            if per_line:
                return key, row_hash, (key,) + values + constants + (row_hash, line_hash)
            return key, row_hash, (key,) + values + constants + (row_hash,)

        return extract


def _practitioner_fields() -> tuple[tuple[str, str], ...]:
    return (
        ("id_type", "Type d'identifiant PP"), ("id_pp", "Identifiant PP"),
        ("exercise_civility_code", "Code civilité d'exercice"),
        ("exercise_civility", "Libellé civilité d'exercice"),
        ("civility_code", "Code civilité"), ("civility", "Libellé civilité"),
        ("last_name", "Nom d'exercice"), ("first_name", "Prénom d'exercice"),
        ("profession_code", "Code profession"), ("profession", "Libellé profession"),
        ("category_code", "Code catégorie professionnelle"), ("category", "Libellé catégorie professionnelle"),
    )


PRACTITIONER = EntitySpec(
    name="practitioners", table=Practitioner.__table__, key_column="id_nat_ps",  # type: ignore[arg-type]
    key_header="Identification nationale PP", fields=_practitioner_fields(),
    needed=("Type d'identifiant PP", "Identifiant PP", "Nom d'exercice", "Prénom d'exercice"),
)

STRUCTURE = EntitySpec(
    name="structures", table=Structure.__table__, key_column="structure_id",  # type: ignore[arg-type]
    key_header="Identifiant technique de la structure", optional_entity=True,
    fields=(
        ("siret", "Numéro SIRET site"), ("siren", "Numéro SIREN site"), ("finess_site", "Numéro FINESS site"),
        ("finess_legal", "Numéro FINESS établissement juridique"), ("name", "Raison sociale site"),
        ("trade_name", "Enseigne commerciale site"),
        ("addressee", "Complément destinataire (coord. structure)"),
        ("geo_complement", "Complément point géographique (coord. structure)"),
        ("street_number", "Numéro Voie (coord. structure)"),
        ("street_repeat", "Indice répétition voie (coord. structure)"),
        ("street_type_code", "Code type de voie (coord. structure)"),
        ("street_type", "Libellé type de voie (coord. structure)"), ("street", "Libellé Voie (coord. structure)"),
        ("distribution", "Mention distribution (coord. structure)"), ("cedex", "Bureau cedex (coord. structure)"),
        ("postal_code", "Code postal (coord. structure)"), ("commune_code", "Code commune (coord. structure)"),
        ("commune", "Libellé commune (coord. structure)"), ("country_code", "Code pays (coord. structure)"),
        ("country", "Libellé pays (coord. structure)"), ("phone", "Téléphone (coord. structure)"),
        ("phone2", "Téléphone 2 (coord. structure)"), ("fax", "Télécopie (coord. structure)"),
        ("email", "Adresse e-mail (coord. structure)"), ("department_code", "Code Département (structure)"),
        ("department", "Libellé Département (structure)"), ("former_id", "Ancien identifiant de la structure"),
        ("registration_authority", "Autorité d'enregistrement"),
    ),
)

ACTIVITY = EntitySpec(
    name="activities", table=Activity.__table__, key_column="activity_key",  # type: ignore[arg-type]
    per_line=True, required=("Identification nationale PP",),
    fields=(
        ("id_nat_ps", "Identification nationale PP"), ("structure_id", "Identifiant technique de la structure"),
        ("know_how_type_code", "Code type savoir-faire"), ("know_how_type", "Libellé type savoir-faire"),
        ("know_how_code", "Code savoir-faire"), ("know_how", "Libellé savoir-faire"),
        ("practice_mode_code", "Code mode exercice"), ("practice_mode", "Libellé mode exercice"),
        ("sector_code", "Code secteur d'activité"), ("sector", "Libellé secteur d'activité"),
        ("pharmacist_section_code", "Code section tableau pharmaciens"),
        ("pharmacist_section", "Libellé section tableau pharmaciens"),
        ("role_code", "Code rôle"), ("role", "Libellé rôle"),
        ("activity_kind_code", "Code genre activité"), ("activity_kind", "Libellé genre activité"),
    ),
)

KNOW_HOW = EntitySpec(
    name="know-how", table=KnowHow.__table__, key_column="know_how_key",  # type: ignore[arg-type]
    per_line=True, required=("Identification nationale PP",),
    fields=(
        ("id_nat_ps", "Identification nationale PP"), ("profession_code", "Code profession"),
        ("category_code", "Code catégorie professionnelle"), ("type_code", "Code type savoir-faire"),
        ("type_label", "Libellé type savoir-faire"), ("code", "Code savoir-faire"),
        ("label", "Libellé savoir-faire"),
    ),
)

DIPLOMA = EntitySpec(
    name="diplomas", table=Diploma.__table__, key_column="diploma_key",  # type: ignore[arg-type]
    per_line=True, required=("Identification nationale PP",),
    fields=(
        ("id_nat_ps", "Identification nationale PP"), ("diploma_type_code", "Code type diplôme obtenu"),
        ("diploma_type", "Libellé type diplôme obtenu"), ("diploma_code", "Code diplôme obtenu"),
        ("diploma", "Libellé diplôme obtenu"), ("authorisation_type_code", "Code type autorisation"),
        ("authorisation_type", "Libellé type autorisation"),
        ("authorisation_discipline_code", "Code discipline autorisation"),
        ("authorisation_discipline", "Libellé discipline autorisation"),
    ),
)


_MAILBOX_FIELDS = (
    ("address", "Adresse BAL"), ("mailbox_type", "Type de BAL"), ("id_type", "Type Identifiant PP"),
    ("id_pp", "Identifiant PP"), ("id_nat_ps", "Identification nationale PP"),
    ("structure_id_type", "Type identifiant structure"), ("structure_id", "Identification Structure"),
    ("service", "Service de rattachement"), ("civility", "Civilité d'exercice"),
    ("last_name", "Nom d'exercice"), ("first_name", "Prénom d'exercice"),
    ("category_code", "Catégorie profession"), ("category", "Libellé de catégorie profession"),
    ("profession_code", "Code Profession"), ("profession", "Libellé Profession"),
    ("know_how_code", "Code savoir-faire"), ("know_how", "Libellé savoir-faire"),
    ("dematerialisation", "Dématérialisation"), ("structure_name", "Raison Sociale structure BAL"),
    ("structure_trade_name", "Enseigne commerciale structure BAL"),
    ("address_line2", "L2COMPLEMENTLOCALISATION"), ("address_line3", "L3COMPLEMENTDISTRIBUTION"),
    ("street_number", "L4NUMEROVOIE"), ("street_number_complement", "L4COMPLEMENTNUMEROVOIE"),
    ("street_type", "NL4TYPEVOIE"), ("street", "L4LIBELLEVOIE"), ("locality", "L5LIEUDITMENTION"),
    ("routing_line", "L6LIGNEACHEMINEMENT"), ("postal_code", "Code postal"), ("department", "Département"),
    ("country", "Pays"),
)
_MAILBOX_TYPE = [c for c, _ in _MAILBOX_FIELDS].index("mailbox_type")
_MAILBOX_OWNER = [c for c, _ in _MAILBOX_FIELDS].index("id_nat_ps")


def _check_mailbox(values: Values) -> str | None:
    """Why a mailbox row (its fields in `_MAILBOX_FIELDS` order) is unusable, or None. By position: it runs for
    every line of the MSSanté extract."""
    kind = values[_MAILBOX_TYPE] or None
    if kind not in MAILBOX_TYPES:
        return f"unknown mailbox type {kind!r}"
    if kind in ("PER", "CAB") and not values[_MAILBOX_OWNER]:
        return f"a {kind} mailbox without 'Identification nationale PP'"
    return None


MAILBOX = EntitySpec(
    name="mailboxes", table=Mailbox.__table__, key_column="address_key",  # type: ignore[arg-type]
    key_header="Adresse BAL", normalise_key=address_key, validate=_check_mailbox, per_line=True,
    needed=("Type de BAL", "Identification nationale PP", "Identification Structure"),
    fields=_MAILBOX_FIELDS, constants=(("liste_rouge", False), ("source", "extract")),
)

SPECS: dict[ExtractKind, tuple[EntitySpec, ...]] = {
    ExtractKind.PERSONNE_ACTIVITE: (PRACTITIONER, STRUCTURE, ACTIVITY),
    ExtractKind.SAVOIR_FAIRE: (KNOW_HOW,),
    ExtractKind.DIPLOMES: (DIPLOMA,),
    ExtractKind.MSSANTE: (MAILBOX,),
}
"""Per kind, its entities; the last one is the line entity (`per_line`)."""

