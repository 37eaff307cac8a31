"""Realistic synthetic extracts (fake values, exact headers) for tests, benchmarks and demos.

Same seed, same file. A second file made with `changed_share` differs from the first in about
that share of entries (names, activities, services), and `removed_share` drops entries, so a
re-import has a known amount of work. RPPS numbers have the real shape (11 digits, Luhn
check digit); names carry accents and apostrophes; structures are shared by several
practitioners, as in the real file.
"""

from __future__ import annotations

import random
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from directory_sync.extracts import (
    MSSANTE_HEADER,
    PERSONNE_ACTIVITE_HEADER,
    PERSONNE_ACTIVITE_RECENT,
)

LAST_NAMES = (
    "MARTIN", "BERNARD", "DUBOIS", "THOMAS", "ROBERT", "PETIT", "DURAND", "LEFÈVRE", "GÉRARD", "MERCIER",
    "D'ALMEIDA", "N'DIAYE", "LE GALL", "DE LA FONTAINE", "FRANÇOIS", "BOUCHÉ", "MÜLLER", "O'CONNOR",
    "NGUYEN", "BENOÎT", "CHÂTEAU", "L'HERMITE", "PÉREZ", "GARNIER", "FAURE", "ROUSSEL", "HÉBERT", "LAMBERT",
)
FIRST_NAMES = (
    "JEANNE", "MARIE", "LÉA", "CHLOÉ", "HÉLÈNE", "ANNE-SOPHIE", "FRANÇOISE", "INÈS", "JÉRÔME", "FRANÇOIS",
    "PIERRE", "JEAN-BAPTISTE", "RAPHAËL", "NOËL", "THÉO", "LOUIS", "ZOÉ", "CÉLINE", "MAËLLE", "JOËL",
)
PROFESSIONS = (
    ("10", "Médecin", "SM54", "Médecine générale (SM)"), ("10", "Médecin", "SM26", "Cardiologie et maladies vasculaires"),
    ("40", "Chirurgien-Dentiste", "SCD01", "Orthopédie dento-faciale"), ("21", "Pharmacien", "", ""),
    ("50", "Sage-Femme", "", ""), ("60", "Infirmier", "", ""), ("70", "Masseur-Kinésithérapeute", "", ""),
)
MODES = (("L", "Libéral"), ("S", "Salarié"), ("B", "Bénévole"))
SECTORS = (("SA07", "Cabinet individuel"), ("SA08", "Cabinet de groupe"), ("SA01", "Etablissement public de santé"),
           ("SA05", "Centre de santé"))
STREETS = ("DES LILAS", "DE LA RÉPUBLIQUE", "JEAN JAURÈS", "DU GÉNÉRAL DE GAULLE", "SAINT-ÉLOI", "DE L'ÉGLISE")
CITIES = (("75012", "75112", "PARIS 12", "75", "Paris"), ("69003", "69383", "LYON 3E", "69", "Rhône"),
          ("13005", "13205", "MARSEILLE 5E", "13", "Bouches-du-Rhône"), ("40100", "40088", "DAX", "40", "Landes"),
          ("97400", "97411", "SAINT-DENIS", "974", "La Réunion"))
DOMAINS = ("medecin.mssante.fr", "pro.mssante.fr", "pharmacien.mssante.fr", "ch-dax.mssante.fr",
           "chu-lyon.mssante.fr", "infirmier.mssante.fr")
SERVICES = ("", "", "Cardiologie", "Urgences", "Secrétariat médical", "Pédiatrie")


def luhn_complete(digits: str) -> str:
    """`digits` followed by its Luhn check digit (the RPPS number's last digit)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return digits + str((10 - total % 10) % 10)


def _ascii_local(first: str, last: str) -> str:
    table = str.maketrans("ÀÂÄÇÉÈÊËÎÏÔÖÛÜÙŸ", "AAACEEEEIIOOUUUY")
    clean = f"{first}.{last}".translate(table).replace("'", "").replace(" ", "-").lower()
    return clean


def personne_activite_lines(
    rows: int, *, seed: int = 1, recent: bool = True, changed_share: float = 0.0, removed_share: float = 0.0,
    change_seed: int = 99, crlf: bool = False,
) -> Iterator[str]:
    """Lines of a PS_LibreAcces_Personne_activite file (header first, each ending with `|`)."""
    rng = random.Random(seed)
    chg = random.Random(change_seed)
    header = PERSONNE_ACTIVITE_HEADER + (PERSONNE_ACTIVITE_RECENT if recent else ())
    eol = "\r\n" if crlf else "\n"
    yield "|".join(header) + "|" + eol
    n_struct = max(1, rows // 4)
    produced = 0
    person = 0
    while produced < rows:
        person += 1
        rpps = luhn_complete(f"10{person:08d}")
        adeli = rng.random() < 0.05
        id_type, id_pp = ("0", f"{person % 100:02d}{rng.randrange(10**7):07d}") if adeli else ("8", rpps)
        last = rng.choice(LAST_NAMES)
        first = rng.choice(FIRST_NAMES)
        female = rng.random() < 0.55
        civ = ("MME", "Madame") if female else ("M", "Monsieur")
        prof = rng.choice(PROFESSIONS)
        n_act = 1 + (rng.random() < 0.35) + (rng.random() < 0.1)
        acts = []
        for _ in range(n_act):
            s = 1 + rng.randrange(n_struct)
            acts.append((s, rng.choice(MODES), rng.choice(SECTORS), rng.randrange(1, 200), rng.choice(STREETS),
                         rng.choice(CITIES)))
        drop = removed_share and chg.random() < removed_share
        change = (not drop) and changed_share and chg.random() < changed_share
        if change:
            if chg.random() < 0.5:
                last = last + "-" + chg.choice(LAST_NAMES)
            else:
                s, mode, _sector, num, street, city = acts[0]
                acts[0] = (s, mode, chg.choice(SECTORS[:1]) if _sector != SECTORS[0] else SECTORS[1], num,
                           street, city)
        for s, mode, sector, _num, _street, _city in acts:
            produced += 1
            if drop:
                continue
            struct = _structure(s)
            fields = [
                id_type, id_pp, id_type + id_pp, "DR" if prof[0] == "10" else "", "Docteur" if prof[0] == "10" else "",
                civ[0], civ[1], last, first, prof[0], prof[1], "C", "Civil", "S" if prof[2] else "",
                "Spécialité ordinale" if prof[2] else "", prof[2], prof[3], mode[0], mode[1],
                *struct, "ARS/CPAM/CPAM", sector[0], sector[1], "", "",
            ]
            if recent:
                fields += ["FON-01", "Titulaire de cabinet", "GENR01", "Activité standard de soin"]
            yield "|".join(fields) + "|" + eol
            if produced >= rows:
                break


def _structure(s: int) -> list[str]:
    """Columns 20–47 of structure number `s`: derived from `s` alone, so every line of a shared
    structure agrees (as in the real file) without keeping them in memory."""
    city = CITIES[s % len(CITIES)]
    name = f"CABINET {LAST_NAMES[(s * 7919) % len(LAST_NAMES)]}" if s % 7 else f"CENTRE HOSPITALIER DE {city[2]}"
    siret = f"{(s * 1000003) % 10**14:014d}" if s % 3 == 0 else ""
    finess = f"{(s * 7907) % 10**9:09d}" if s % 7 == 0 else ""
    return [
        siret, siret[:9], finess, "", f"C{81000000000000 + s:014d}", name, name if s % 2 else "", "", "",
        str(1 + s % 299), "B" if s % 11 == 0 else "", "R", "Rue", STREETS[s % len(STREETS)], "",
        f"{city[0]} {city[2]}", city[0], city[1], city[2], "", "", f"01{(s * 2654435761) % 10**8:08d}", "", "", "",
        city[3], city[4], "",
    ]


def mssante_lines(
    rows: int, *, seed: int = 2, changed_share: float = 0.0, removed_share: float = 0.0, change_seed: int = 98,
    duplicates: int = 0, crlf: bool = False,
) -> Iterator[str]:
    """Lines of an Extraction_Correspondance_MSSante file; PER owners share RPPS numbers with the PS file."""
    rng = random.Random(seed)
    chg = random.Random(change_seed)
    eol = "\r\n" if crlf else "\n"
    yield "|".join(MSSANTE_HEADER) + eol
    first_line: str | None = None
    for i in range(rows):
        last = rng.choice(LAST_NAMES)
        first = rng.choice(FIRST_NAMES)
        domain = rng.choice(DOMAINS)
        city = rng.choice(CITIES)
        service = rng.choice(SERVICES)
        per = rng.random() < 0.85
        if per:
            rpps = luhn_complete(f"10{i + 1:08d}")
            local = f"{_ascii_local(first, last)}.{i}"
            prof = rng.choice(PROFESSIONS)
            fields = ["PER", f"{local}@{domain}", "8", rpps, "8" + rpps, "", "", service, "DR", last, first, "C",
                      "Civil", prof[0], prof[1], prof[2], prof[3], "OUI", f"CABINET {last}", "", "", "",
                      str(rng.randrange(1, 300)), "", "R", rng.choice(STREETS), "", f"{city[0]} {city[2]}", city[0],
                      city[3], "FRANCE"]
        else:
            finess = f"{rng.randrange(10**8):09d}"
            fields = ["ORG", f"secretariat.{i}@{domain}", "", "", "", "1", "1" + finess, service or "Direction", "",
                      "", "", "", "", "", "", "", "", "", f"CENTRE HOSPITALIER DE {city[2]}", "", "", "", "1", "",
                      "AV", "DE LA GARE", "", f"{city[0]} {city[2]}", city[0], city[3], "FRANCE"]
        if removed_share and chg.random() < removed_share:
            continue
        if changed_share and chg.random() < changed_share:
            fields[7] = "Service " + chg.choice(("A", "B", "C", "D")) + str(chg.randrange(100))
        line = "|".join(fields) + eol
        if first_line is None:
            first_line = line
        yield line
        if duplicates and i % max(1, rows // duplicates) == 0 and i:
            yield line


def write_extract(path: Path, lines: Iterable[str], *, zipped: bool = False, member: str | None = None) -> Path:
    """Write lines as UTF-8 (optionally inside a ZIP, as the ANS publishes them)."""
    if zipped:
        name = member or path.with_suffix(".txt").name
        with (zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive,
              archive.open(name, "w") as out):
            buf: list[str] = []
            for line in lines:
                buf.append(line)
                if len(buf) >= 10_000:
                    out.write("".join(buf).encode("utf-8"))
                    buf.clear()
            out.write("".join(buf).encode("utf-8"))
        return path
    with path.open("w", encoding="utf-8", newline="") as out:
        out.writelines(lines)
    return path
