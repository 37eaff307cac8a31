"""Fuzz targets of directory_sync/: extract files, their ZIPs and the trust-space XML give rows, counted
malformed lines or a DirectoryError; never another exception, whatever the bytes."""

from __future__ import annotations

import io
import zipfile

from hypothesis import example, given
from hypothesis import strategies as st

from directory_sync.errors import DirectoryError
from directory_sync.extracts import HEADERS, ExtractReader, sources
from directory_sync.mapping import SPECS
from directory_sync.whitelist import NAMESPACE, domain_forms, parse_whitelist
from tests.fuzz.support import fuzz_settings, work_dir

WORK = work_dir("directory")
_field = st.one_of(st.text(max_size=12), st.sampled_from(["PER", "ORG", "APP", "CAB", "810001234567", "a@b.fr",
                                                          "jeanne@dev.mssante.test", "8", "0", ""]))


@st.composite
def extract_files(draw: st.DrawFn) -> bytes:
    """A header of a known extract (columns shuffled, renamed, dropped, a BOM), then lines of any shape."""
    header = list(HEADERS[draw(st.sampled_from(sorted(HEADERS, key=lambda k: k.value)))])
    if draw(st.booleans()):
        header = draw(st.permutations(header))
    if draw(st.booleans()) and header:
        del header[draw(st.integers(0, len(header) - 1))]
    head = "|".join(header).encode("utf-8")
    if draw(st.booleans()):
        head = b"\xef\xbb\xbf" + head.upper()
    width = len(header)
    lines = draw(st.lists(st.one_of(
        st.lists(_field, min_size=width, max_size=width + 1).map(lambda f: "|".join(f).encode("utf-8", "surrogatepass")),
        st.binary(max_size=80),
    ), max_size=8))
    eol = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    return eol.join([head, *lines]) + draw(st.sampled_from([b"", eol]))


def _read_all(path: object) -> None:
    for source in sources(path):  # type: ignore[arg-type]
        with ExtractReader(source) as reader:
            entities = [spec.bind(reader) for spec in SPECS[reader.kind]]
            for _, row in reader.rows():
                for entity in entities:
                    try:
                        entity.extract(row, 0)
                    except DirectoryError:
                        pass


@fuzz_settings()
@given(content=extract_files())
def test_extract_files(content: bytes) -> None:
    path = WORK / "extract.txt"
    path.write_bytes(content)
    try:
        _read_all(path)
    except DirectoryError:
        pass


@st.composite
def zip_archives(draw: st.DrawFn) -> bytes:
    """A ZIP of extract members (stored or deflated), then some of its bytes damaged."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for _ in range(draw(st.integers(1, 3))):
            name = draw(st.sampled_from(["PS_LibreAcces_Personne_activite.txt", "x.csv", "dir/", "a.TXT", "b.bin"]))
            method = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
            archive.writestr(zipfile.ZipInfo(name), draw(extract_files()), compress_type=method)
    data = bytearray(out.getvalue())
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "cut", "zero4", "ff4"]))
        if kind == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at:]
        else:
            data[at:at + 4] = b"\x00" * 4 if kind == "zero4" else b"\xff" * 4
    return bytes(data)


@fuzz_settings()
@given(archive=zip_archives())
def test_extract_archives(archive: bytes) -> None:
    path = WORK / "extract.zip"
    path.write_bytes(archive)
    try:
        _read_all(path)
    except DirectoryError:
        pass


_names = st.sampled_from(["Domaine", "Nom", "Description", "DNCertificatOperateur", "DateDeGeneration",
                          "ListeBlanche", "DateMAJ", "x"])
_domains = st.one_of(st.sampled_from(["hopital.mssante.fr", "médecin.mssante.fr", "xn--mdecin-bva.fr",
                                      "a..b", "-x.fr", "", " ", "a" * 70 + ".fr", "\u200d.fr", "ß.de",
                                      "xn--.fr", "xn--zz.fr", "١٢.com", "a.b.c.d" * 40]),
                     st.text(max_size=30))


@st.composite
def whitelist_documents(draw: st.DrawFn) -> bytes:
    """listeblanchemssante.xml as published, with elements moved, emptied, nested, and odd domain names."""
    ns = draw(st.sampled_from([f' xmlns="{NAMESPACE}"', "", ' xmlns="urn:other"']))

    def element(depth: int) -> str:
        name = draw(_names)
        if depth > 2 or draw(st.booleans()):
            text = draw(_domains) if name == "Nom" else draw(st.text(max_size=10))
            escaped = text.replace("&", "&amp;").replace("<", "&lt;")
            return f"<{name}>{escaped}</{name}>"
        return f"<{name}>" + "".join(element(depth + 1) for _ in range(draw(st.integers(0, 3)))) + f"</{name}>"

    body = "".join(element(0) for _ in range(draw(st.integers(0, 5))))
    prolog = draw(st.sampled_from(["", '<?xml version="1.0" encoding="UTF-8"?>',
                                   '<?xml version="1.0" encoding="ISO-8859-1"?>',
                                   '<!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]>']))
    doc = f"{prolog}<ListeBlanche{ns}>{body}</ListeBlanche>".encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        at = draw(st.integers(0, len(doc)))
        doc = doc[:at] + draw(st.binary(max_size=6)) + doc[at:]
    return doc


@fuzz_settings()
@given(doc=whitelist_documents())
@example(doc=b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">'
             b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;">'
             b'<!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;"><!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;">]>'
             b'<L><Domaine><Nom>&f;&f;&f;&f;&f;&f;&f;&f;.fr</Nom></Domaine></L>')
@example(doc=b'<!DOCTYPE l [<!ENTITY x SYSTEM "file:///etc/passwd">]><L><Domaine><Nom>&x;</Nom></Domaine></L>')
@example(doc=b'<?xml version="1.0" encoding="U-TF-8"?><ListeBlanche></ListeBlanche>')  # LookupError, found fuzzing
def test_trust_space_list(doc: bytes) -> None:
    path = WORK / "listeblanchemssante.xml"
    path.write_bytes(doc)
    try:
        result = parse_whitelist(path)
    except DirectoryError:
        return
    for ascii_form, entry in result.entries.items():
        assert ascii_form.isascii() and ascii_form == ascii_form.lower()
        assert domain_forms(entry.domain_unicode)[0] == ascii_form
        assert "root:" not in (entry.description or "") + ascii_form  # no external entity was fetched
