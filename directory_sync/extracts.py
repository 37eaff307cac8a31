"""Streaming reader of the RPPS / MSSanté public extracts (mssante.md §2.1, §2.2).

The files are UTF-8, `|`-separated, one header line, no quoting; PS_LibreAcces lines end
with a trailing `|`; Personne_activite has 52 columns, or 56 in recent files; the files come
zipped. Columns are found by header name, never by position. The reader yields one tuple of
strings per line (no per-row dict) and counts each malformed line with its number and
reason instead of stopping: the rest of the file still syncs.
"""

from __future__ import annotations

import enum
import io
import logging
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO, Self

from directory_sync.errors import ArchiveRefused, UnknownExtract

log = logging.getLogger(__name__)

SEPARATOR = "|"
MAX_REPORTED_MALFORMED = 1000
MAX_HEADER_BYTES = 64 * 1024  # the longest known header is under 2 KB


@dataclass(frozen=True, slots=True)
class ZipLimits:
    """What one member of an extracts ZIP may inflate to. The MSSanté extract inflates 4.4 times
    (mssante.md §2.2) and text rarely beyond 20; a zip bomb inflates a thousand times and more."""

    max_member_bytes: int = 8 * 1024 ** 3
    max_ratio: int = 100


DEFAULT_ZIP_LIMITS = ZipLimits()
_ZIP_READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError, IndexError,
                    RuntimeError, ValueError, OSError)


class ExtractKind(enum.Enum):
    """The public extracts the directory understands."""

    PERSONNE_ACTIVITE = "PS_LibreAcces_Personne_activite"
    SAVOIR_FAIRE = "PS_LibreAcces_SavoirFaire"
    DIPLOMES = "PS_LibreAcces_Dipl_AutExerc"
    MSSANTE = "Extraction_Correspondance_MSSante"


PERSONNE_ACTIVITE_HEADER: tuple[str, ...] = (
    "Type d'identifiant PP", "Identifiant PP", "Identification nationale PP",
    "Code civilité d'exercice", "Libellé civilité d'exercice", "Code civilité", "Libellé civilité",
    "Nom d'exercice", "Prénom d'exercice", "Code profession", "Libellé profession",
    "Code catégorie professionnelle", "Libellé catégorie professionnelle",
    "Code type savoir-faire", "Libellé type savoir-faire", "Code savoir-faire", "Libellé savoir-faire",
    "Code mode exercice", "Libellé mode exercice", "Numéro SIRET site", "Numéro SIREN site",
    "Numéro FINESS site", "Numéro FINESS établissement juridique", "Identifiant technique de la structure",
    "Raison sociale site", "Enseigne commerciale site", "Complément destinataire (coord. structure)",
    "Complément point géographique (coord. structure)", "Numéro Voie (coord. structure)",
    "Indice répétition voie (coord. structure)", "Code type de voie (coord. structure)",
    "Libellé type de voie (coord. structure)", "Libellé Voie (coord. structure)",
    "Mention distribution (coord. structure)", "Bureau cedex (coord. structure)",
    "Code postal (coord. structure)", "Code commune (coord. structure)", "Libellé commune (coord. structure)",
    "Code pays (coord. structure)", "Libellé pays (coord. structure)", "Téléphone (coord. structure)",
    "Téléphone 2 (coord. structure)", "Télécopie (coord. structure)", "Adresse e-mail (coord. structure)",
    "Code Département (structure)", "Libellé Département (structure)", "Ancien identifiant de la structure",
    "Autorité d'enregistrement", "Code secteur d'activité", "Libellé secteur d'activité",
    "Code section tableau pharmaciens", "Libellé section tableau pharmaciens",
)
PERSONNE_ACTIVITE_RECENT: tuple[str, ...] = (
    "Code rôle", "Libellé rôle", "Code genre activité", "Libellé genre activité",
)
SAVOIR_FAIRE_HEADER: tuple[str, ...] = (
    "Type d'identifiant PP", "Identifiant PP", "Identification nationale PP", "Nom d'exercice",
    "Prénom d'exercice", "Code profession", "Libellé profession", "Code catégorie professionnelle",
    "Libellé catégorie professionnelle", "Code type savoir-faire", "Libellé type savoir-faire",
    "Code savoir-faire", "Libellé savoir-faire",
)
DIPLOMES_HEADER: tuple[str, ...] = (
    "Type d'identifiant PP", "Identifiant PP", "Identification nationale PP", "Nom d'exercice",
    "Prénom d'exercice", "Code type diplôme obtenu", "Libellé type diplôme obtenu", "Code diplôme obtenu",
    "Libellé diplôme obtenu", "Code type autorisation", "Libellé type autorisation",
    "Code discipline autorisation", "Libellé discipline autorisation",
)
MSSANTE_HEADER: tuple[str, ...] = (
    "Type de BAL", "Adresse BAL", "Type Identifiant PP", "Identifiant PP", "Identification nationale PP",
    "Type identifiant structure", "Identification Structure", "Service de rattachement",
    "Civilité d'exercice", "Nom d'exercice", "Prénom d'exercice", "Catégorie profession",
    "Libellé de catégorie profession", "Code Profession", "Libellé Profession", "Code savoir-faire",
    "Libellé savoir-faire", "Dématérialisation", "Raison Sociale structure BAL",
    "Enseigne commerciale structure BAL", "L2COMPLEMENTLOCALISATION", "L3COMPLEMENTDISTRIBUTION",
    "L4NUMEROVOIE", "L4COMPLEMENTNUMEROVOIE", "NL4TYPEVOIE", "L4LIBELLEVOIE", "L5LIEUDITMENTION",
    "L6LIGNEACHEMINEMENT", "Code postal", "Département", "Pays",
)

HEADERS: dict[ExtractKind, tuple[str, ...]] = {
    ExtractKind.PERSONNE_ACTIVITE: PERSONNE_ACTIVITE_HEADER + PERSONNE_ACTIVITE_RECENT,
    ExtractKind.SAVOIR_FAIRE: SAVOIR_FAIRE_HEADER,
    ExtractKind.DIPLOMES: DIPLOMES_HEADER,
    ExtractKind.MSSANTE: MSSANTE_HEADER,
}


def normalise_name(name: str) -> str:
    """A header name compared loosely: NFC, case-folded, typographic apostrophe, spaces."""
    name = unicodedata.normalize("NFC", name).replace("\u2019", "'").replace("\ufeff", "")
    return " ".join(name.split()).casefold()


def detect_kind(header: tuple[str, ...]) -> ExtractKind | None:
    """The extract a header belongs to, from the names that only that extract has."""
    names = {normalise_name(h) for h in header}
    if normalise_name("Adresse BAL") in names:
        return ExtractKind.MSSANTE
    if normalise_name("Identifiant technique de la structure") in names:
        return ExtractKind.PERSONNE_ACTIVITE
    if normalise_name("Code diplôme obtenu") in names:
        return ExtractKind.DIPLOMES
    if normalise_name("Code savoir-faire") in names and normalise_name("Identification nationale PP") in names:
        return ExtractKind.SAVOIR_FAIRE
    return None


@dataclass(frozen=True, slots=True)
class MalformedRow:
    """A line that was skipped: its number (1 = the header) and why."""

    line: int
    reason: str


@dataclass(slots=True)
class ReadStats:
    """What a pass over one extract saw; `malformed` keeps the first MAX_REPORTED_MALFORMED."""

    rows: int = 0
    malformed_count: int = 0
    malformed: list[MalformedRow] = field(default_factory=list)
    bytes_read: int = 0

    def reject(self, line: int, reason: str) -> None:
        self.malformed_count += 1
        if len(self.malformed) < MAX_REPORTED_MALFORMED:
            self.malformed.append(MalformedRow(line, reason))


@dataclass(frozen=True, slots=True)
class ExtractSource:
    """One extract file, plain or a member of a ZIP archive; it can be opened again (two-pass sync)."""

    path: Path
    member: str | None
    size: int
    limits: ZipLimits = DEFAULT_ZIP_LIMITS

    @property
    def name(self) -> str:
        return f"{self.path}!{self.member}" if self.member else str(self.path)

    def open(self) -> BinaryIO:
        if self.member is None:
            return self.path.open("rb")
        try:
            archive = zipfile.ZipFile(self.path)
        except _ZIP_READ_ERRORS as exc:
            raise ArchiveRefused(self.path, None, f"{type(exc).__name__}: {exc}") from None
        try:
            info = archive.getinfo(self.member)
            check_member(self.path, info, self.limits)
            stream = archive.open(info)
        except BaseException as exc:
            archive.close()
            if isinstance(exc, _ZIP_READ_ERRORS + (KeyError,)):
                raise ArchiveRefused(self.path, self.member, f"{type(exc).__name__}: {exc}") from None
            raise
        return _ClosingStream(_GuardedMember(stream, self), archive)


def check_member(path: Path, info: zipfile.ZipInfo, limits: ZipLimits) -> None:
    """Refuse an encrypted member, an unknown compression, or one whose declared size or ratio is past `limits`.

    zipfile stops inflating at the declared size (ZipExtFile), so the declared size bounds what is read.
    """
    if info.flag_bits & 0x1:
        raise ArchiveRefused(path, info.filename, "the member is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ArchiveRefused(path, info.filename, f"compression method {info.compress_type} is not accepted")
    if info.file_size > limits.max_member_bytes:
        raise ArchiveRefused(path, info.filename,
                             f"inflates to {info.file_size} bytes, the limit is {limits.max_member_bytes}")
    if info.file_size > limits.max_ratio * max(info.compress_size, 1):
        raise ArchiveRefused(path, info.filename, f"inflates {info.file_size} bytes from {info.compress_size}, "
                                                  f"more than {limits.max_ratio} times (a zip bomb)")


class _GuardedMember(io.RawIOBase):
    """A ZIP member read as raw bytes, a damaged member (bad deflate data, CRC, truncation) an ArchiveRefused.

    Called once per buffer fill (1 MiB), not per line.
    """

    def __init__(self, member: IO[bytes], source: ExtractSource) -> None:
        self._member = member
        self._source = source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        try:
            data = self._member.read(len(buffer))
        except _ZIP_READ_ERRORS as exc:
            raise ArchiveRefused(self._source.path, self._source.member, f"{type(exc).__name__}: {exc}") from None
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self._member.close()
        finally:
            super().close()


class _ClosingStream(io.BufferedReader):
    """A ZIP member stream that closes its archive with it."""

    def __init__(self, raw: io.RawIOBase, archive: zipfile.ZipFile) -> None:
        super().__init__(raw, buffer_size=1 << 20)
        self._archive = archive

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._archive.close()


def sources(path: Path | str, zip_limits: ZipLimits = DEFAULT_ZIP_LIMITS) -> list[ExtractSource]:
    """The extract files in a path: the file itself, or each `.txt`/`.csv` member of a ZIP.

    A damaged or encrypted ZIP, or a member past `zip_limits`, is refused (`ArchiveRefused`) before any is read.
    """
    p = Path(path)
    if not zipfile.is_zipfile(p):
        return [ExtractSource(p, None, p.stat().st_size)]
    try:
        with zipfile.ZipFile(p) as archive:
            members = [info for info in archive.infolist()
                       if not info.is_dir() and info.filename.lower().endswith((".txt", ".csv"))]
    except _ZIP_READ_ERRORS as exc:
        raise ArchiveRefused(p, None, f"{type(exc).__name__}: {exc}") from None
    for info in members:
        check_member(p, info, zip_limits)
    return [ExtractSource(p, info.filename, info.file_size, zip_limits) for info in members]


class ExtractReader:
    """Reads one extract: its header (kind, column positions), then its rows as tuples.

    `column(name)` gives the position of a header name (None when the file lacks it, e.g. the
    four recent Personne_activite columns in a 52-column file).
    """

    def __init__(self, source: ExtractSource) -> None:
        self.source = source
        self._stream = source.open()
        try:
            first = self._stream.readline(MAX_HEADER_BYTES)
        except BaseException:
            self._stream.close()
            raise
        self.stats = ReadStats(bytes_read=len(first))
        text = first.decode("utf-8-sig", errors="replace").rstrip("\r\n")
        names = text.split(SEPARATOR)
        while names and names[-1].strip() == "":
            names.pop()
        self.header: tuple[str, ...] = tuple(n.strip() for n in names)
        kind = detect_kind(self.header)
        if kind is None:
            self._stream.close()
            raise UnknownExtract(source.name, self.header)
        self.kind = kind
        self.width = len(self.header)
        self._positions = {normalise_name(n): i for i, n in enumerate(self.header)}
        self._line_no = 1

    def column(self, name: str) -> int | None:
        return self._positions.get(normalise_name(name))

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lines(self, progress: Callable[[int], None] | None = None, every: int = 50_000,
              stop: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(line number, raw bytes without the line end) of each non-blank line after the header;
        with `stop`, only the lines that start before that byte offset."""
        stats = self.stats
        line_no = self._line_no
        try:
            for raw in self._stream:
                if stop is not None and stats.bytes_read >= stop:
                    break
                line_no += 1
                stats.bytes_read += len(raw)
                if progress is not None and line_no % every == 0:
                    progress(stats.bytes_read)
                raw = raw.rstrip(b"\r\n")
                if raw and not raw.isspace():
                    yield line_no, raw
        finally:
            self._line_no = line_no

    @property
    def line_no(self) -> int:
        """The number of the last line read (the header is line 1)."""
        return self._line_no

    def skip_to(self, offset: int) -> None:
        """Go to the first line that starts at byte `offset` or after: the line running through
        offset - 1 is left to whoever reads the part before (`lines(stop=offset)`). Line numbers
        then count from there (its first line is 1)."""
        stream, done = self._stream, self.stats.bytes_read
        if offset > done:
            if stream.seekable():
                stream.seek(offset - 1)
            else:  # a ZIP member: inflated and dropped up to there
                left = offset - 1 - done
                while left > 0 and (block := stream.read(min(left, 1 << 20))):
                    left -= len(block)
            self.stats.bytes_read = offset - 1 + len(stream.readline())
        self._line_no = 0

    def parse(self, line_no: int, raw: bytes) -> list[str] | None:
        """The fields of one line (the trailing `|` dropped), or None after counting it as malformed."""
        stats = self.stats
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            stats.reject(line_no, f"not UTF-8 at byte {exc.start}")
            return None
        fields = text.split(SEPARATOR)
        n = len(fields)
        width = self.width
        if n != width:
            if n == width + 1 and fields[-1] == "":
                fields.pop()
            else:
                stats.reject(line_no, f"{n} fields where the header has {width}")
                return None
        stats.rows += 1
        return fields

    def rows(self, progress: Callable[[int], None] | None = None, every: int = 50_000) -> Iterator[tuple[int, list[str]]]:
        """(line number, fields) for each well-formed line."""
        parse = self.parse
        for line_no, raw in self.lines(progress, every):
            fields = parse(line_no, raw)
            if fields is not None:
                yield line_no, fields
