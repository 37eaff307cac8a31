from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from directory_sync.errors import UnknownExtract
from directory_sync.extracts import (
    DIPLOMES_HEADER,
    MSSANTE_HEADER,
    SAVOIR_FAIRE_HEADER,
    ExtractKind,
    ExtractReader,
    sources,
)
from directory_sync.synthetic import (
    mssante_lines,
    personne_activite_lines,
    write_extract,
)

EXAMPLE_56 = ("8|10009999999|810009999999|DR|Docteur|MME|Madame|EXEMPLE|JEANNE|10|Médecin|C|Civil|S|Spécialité "
              "ordinale|SM54|Médecine générale (SM)|L|Libéral|||||C81000999999900|CABINET DR EXEMPLE||CABINET DR "
              "EXEMPLE||12||R|Rue|DES LILAS||75012 PARIS|75012|75112|PARIS 12|||0100000000|||||||ARS/CPAM/CPAM|SA07|"
              "Cabinet individuel|||||||")


def _read(path: Path) -> tuple[ExtractReader, list[tuple[int, list[str]]]]:
    (source,) = sources(path)
    reader = ExtractReader(source)
    rows = list(reader.rows())
    reader.close()
    return reader, rows


@pytest.mark.parametrize(("header", "kind"), [
    (MSSANTE_HEADER, ExtractKind.MSSANTE),
    (SAVOIR_FAIRE_HEADER, ExtractKind.SAVOIR_FAIRE),
    (DIPLOMES_HEADER, ExtractKind.DIPLOMES),
])
def test_kind_is_detected_from_the_header(tmp_path: Path, header: tuple[str, ...], kind: ExtractKind) -> None:
    path = tmp_path / "x.txt"
    path.write_text("|".join(header) + "|\n" + "|".join("v" for _ in header) + "|\n", encoding="utf-8")
    reader, rows = _read(path)
    assert reader.kind is kind
    assert reader.width == len(header)
    assert rows == [(2, ["v"] * len(header))]


def test_the_reference_example_row_with_56_columns_bom_crlf_and_trailing_bar(tmp_path: Path) -> None:
    header = next(personne_activite_lines(1, recent=True)).rstrip("\n")
    path = tmp_path / "PS_LibreAcces_Personne_activite_202608260800.txt"
    path.write_bytes(b"\xef\xbb\xbf" + (header + "\r\n" + EXAMPLE_56 + "\r\n").encode("utf-8"))
    reader, rows = _read(path)
    assert reader.kind is ExtractKind.PERSONNE_ACTIVITE
    assert reader.header[0] == "Type d'identifiant PP"  # the BOM is gone
    assert reader.width == 56
    ((line, fields),) = rows
    assert line == 2
    by_name = dict(zip(reader.header, fields, strict=True))
    assert by_name["Identification nationale PP"] == "810009999999"
    assert by_name["Libellé savoir-faire"] == "Médecine générale (SM)"
    assert by_name["Libellé genre activité"] == ""
    assert fields[-1] == ""  # an empty last column, not the trailing bar


def test_52_column_files_have_no_recent_columns(tmp_path: Path) -> None:
    path = write_extract(tmp_path / "old.txt", personne_activite_lines(20, recent=False))
    reader, rows = _read(path)
    assert reader.width == 52
    assert reader.column("Code rôle") is None
    assert len(rows) == 20


def test_malformed_lines_are_counted_with_their_number_and_reason(tmp_path: Path) -> None:
    lines = list(mssante_lines(6))
    lines[2] = "PER|short|line\n"
    lines[4] = lines[4].replace("FRANCE", "FRANCE|extra|fields")
    path = tmp_path / "m.txt"
    path.write_bytes("".join(lines).encode("utf-8").replace(b"DR|", b"D\xff|", 1))
    reader, rows = _read(path)
    reasons = {m.line: m.reason for m in reader.stats.malformed}
    assert reasons[3] == "3 fields where the header has 31"
    assert reasons[5] == "33 fields where the header has 31"
    bad_utf8 = [m for m in reader.stats.malformed if m.reason.startswith("not UTF-8")]
    assert len(bad_utf8) == 1
    assert reader.stats.malformed_count == 3
    assert len(rows) == 3
    assert all(len(f) == 31 for _, f in rows)


def test_zip_input_lists_each_member_and_reads_it_streaming(tmp_path: Path) -> None:
    path = tmp_path / "PS_LibreAcces.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("PS_LibreAcces_Personne_activite_202608260800.txt", "".join(personne_activite_lines(30)))
        archive.writestr("PS_LibreAcces_SavoirFaire_202608260800.txt",
                         "|".join(SAVOIR_FAIRE_HEADER) + "|\n" + "8|1|81|A|B|10|Médecin|C|Civil|S|Spé|SM54|MG|\n")
        archive.writestr("LISEZMOI.pdf", b"%PDF")
    found = sources(path)
    assert [s.member for s in found] == ["PS_LibreAcces_Personne_activite_202608260800.txt",
                                         "PS_LibreAcces_SavoirFaire_202608260800.txt"]
    with ExtractReader(found[0]) as reader:
        assert reader.kind is ExtractKind.PERSONNE_ACTIVITE
        assert sum(1 for _ in reader.rows()) == 30
    with ExtractReader(found[1]) as reader:
        assert reader.kind is ExtractKind.SAVOIR_FAIRE


def test_an_unknown_file_is_refused_with_its_header(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("nom|prénom|ville\nA|B|C\n", encoding="utf-8")
    with pytest.raises(UnknownExtract, match="nom | prénom"):
        _read(path)
