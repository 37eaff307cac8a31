"""The development directory: what a gateway of the development PKI must know of the others.

Two gateways exchange mail only when each one's directory lists the other's mailboxes with their encryption
certificates (and practitioners with their RPPS number, which the receiving side checks against the signer),
and when each one's trust-space list names both domains with their operator certificate DN. This module
writes those inputs in the ANS formats (the `Extraction_Correspondance_MSSante` extract, the
`listeblanchemssante.xml` list, mssante.md §1.3) and loads them through directory_sync, idempotently.
The `make run` demo (`mssgw demo setup`) and the two-gateway integration tests share it, so the demo runs
the set-up that the tests check. Development and tests only: real directories come from the ANS files.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import Engine

from directory_sync.certificates import add_certificate
from directory_sync.database import migrate
from directory_sync.extracts import MSSANTE_HEADER
from directory_sync.sync import import_paths
from directory_sync.whitelist import NAMESPACE, import_whitelist

EXTRACT_NAME = "Extraction_Correspondance_MSSante_202611250300.txt"
LIST_GENERATED = "2026-11-25T03:00:00"


@dataclass(frozen=True, slots=True)
class DirectoryMailbox:
    """A mailbox another gateway publishes: its encryption certificate (PEM, leaf first), and for a
    practitioner's personal mailbox the RPPS number and name (type PER); an organisation's otherwise (ORG)."""

    address: str
    encryption_cert: Path
    rpps: str | None = None
    surname: str = ""
    given_name: str = ""


def org_row(address: str, siret: str) -> str:
    """One organisation mailbox line of the ANS extract (`Extraction_Correspondance_MSSante`)."""
    fields = ["ORG", address, "", "", "", "3", siret, "Secrétariat", "", "", "", "", "", "", "", "", "", "",
              "CENTRE TEST", "", "", "", "1", "", "R", "DES LILAS", "", "75012 PARIS", "75012", "75", "FRANCE"]
    assert len(fields) == len(MSSANTE_HEADER)
    return "|".join(fields)


def per_row(address: str, rpps: str, surname: str, given: str) -> str:
    """One practitioner's personal mailbox line of the same extract (type PER, identified by RPPS)."""
    fields = ["PER", address, "8", rpps, "8" + rpps, "", "", "", "DR", surname, given, "C", "Civil", "10", "Médecin",
              "", "", "", "CABINET TEST", "", "", "", "1", "", "R", "DES LILAS", "", "75012 PARIS", "75012", "75",
              "FRANCE"]
    assert len(fields) == len(MSSANTE_HEADER)
    return "|".join(fields)


def extract_text(mailboxes: Sequence[DirectoryMailbox]) -> str:
    """The extract listing `mailboxes` (organisations get made-up SIRET numbers, one each)."""
    rows = [per_row(m.address, m.rpps, m.surname, m.given_name) if m.rpps is not None
            else org_row(m.address, f"3000000000{n:04d}") for n, m in enumerate(mailboxes, start=1)]
    return "\n".join(["|".join(MSSANTE_HEADER), *rows]) + "\n"


def operator_dn(certificate: Path) -> str:
    """The subject of a gateway's TLS certificate (the first in a PEM file) as the list writes it (RFC 4514)."""
    return x509.load_pem_x509_certificate(certificate.read_bytes()).subject.rfc4514_string()


def whitelist_xml(domains: Mapping[str, str | None]) -> str:
    """The trust-space list naming each domain, with its operator certificate DN when one is given."""
    entries = "".join(
        f"<Domaine><Nom>{escape(domain)}</Nom><Description>{escape(domain)}</Description>"
        + (f"<DNCertificatOperateur>{escape(dn)}</DNCertificatOperateur>" if dn is not None else "")
        + "</Domaine>" for domain, dn in domains.items())
    return (f'<ListeBlanche xmlns="{NAMESPACE}"><DateDeGeneration>{LIST_GENERATED}</DateDeGeneration>'
            f"{entries}</ListeBlanche>")


def seed_directory(engine: Engine, trust_list: Path, mailboxes: Sequence[DirectoryMailbox]) -> None:
    """Bring a gateway's directory to: the trust space of `trust_list`, exactly `mailboxes` in the extract
    tables, and their encryption certificates. Running it again with the same input changes nothing; with
    another input, what is no longer given goes (the deletion brake is for real extracts, not these)."""
    migrate(engine)
    import_whitelist(engine, trust_list, force=True)
    with tempfile.TemporaryDirectory(prefix="mssgw-extract-") as tmp:
        extract = Path(tmp) / EXTRACT_NAME
        extract.write_text(extract_text(mailboxes), encoding="utf-8")
        import_paths(engine, [extract], force=True)
    for m in mailboxes:
        cert = x509.load_pem_x509_certificate(m.encryption_cert.read_bytes())
        add_certificate(engine, cert.public_bytes(Encoding.DER), address=m.address, usage="encryption", source="dev")
