"""Extract archives: a zip bomb, an encrypted, damaged or lying ZIP is refused with ArchiveRefused, not read."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from directory_sync.errors import ArchiveRefused, DirectoryError
from directory_sync.extracts import DEFAULT_ZIP_LIMITS, ExtractReader, ZipLimits, sources
from directory_sync.synthetic import mssante_lines, write_extract

MEMBER = "Extraction_Correspondance_MSSante.txt"


def _zip(path: Path, lines: int = 200) -> Path:
    return write_extract(path, mssante_lines(lines), zipped=True, member=MEMBER)


def _rows(path: Path, limits: ZipLimits = DEFAULT_ZIP_LIMITS) -> int:
    (source,) = sources(path, limits)
    with ExtractReader(source) as reader:
        return sum(1 for _ in reader.rows())


def test_an_honest_archive_is_read(tmp_path):
    assert _rows(_zip(tmp_path / "ok.zip")) == 200


def test_zip_bomb_by_ratio(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(MEMBER, b"Adresse BAL|Type de BAL\n" + b"|" * 50_000_000)
    with pytest.raises(ArchiveRefused, match="more than 100 times") as caught:
        sources(bomb)
    assert caught.value.member == MEMBER and isinstance(caught.value, DirectoryError)


def test_member_over_the_size_limit(tmp_path):
    path = _zip(tmp_path / "big.zip")
    with pytest.raises(ArchiveRefused, match="the limit is 1000"):
        sources(path, ZipLimits(max_member_bytes=1000))


def test_encrypted_member(tmp_path):
    path = _zip(tmp_path / "enc.zip")
    data = bytearray(path.read_bytes())
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # general purpose bit 0 (APPNOTE 4.4.4)
        at = data.index(signature)
        data[at + flag_at] |= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveRefused, match="encrypted"):
        sources(path)


def test_truncated_archive(tmp_path):
    path = _zip(tmp_path / "cut.zip")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] + data[-22:])  # end record kept, central directory gone
    with pytest.raises(ArchiveRefused):
        _rows(path)


def test_damaged_deflate_data_is_refused_while_reading(tmp_path):
    path = _zip(tmp_path / "bad.zip", lines=5000)
    data = bytearray(path.read_bytes())
    start = data.index(MEMBER.encode()) + len(MEMBER) + 200
    data[start:start + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveRefused, match=MEMBER):
        _rows(path)


def test_member_that_inflates_past_its_declared_size(tmp_path):
    """zipfile stops at the declared size; the CRC then fails: refused, never more than declared read."""
    path = _zip(tmp_path / "lie.zip")
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(MEMBER)
    data = bytearray(path.read_bytes())
    central = data.index(b"PK\x01\x02")
    declared = info.file_size // 2
    data[central + 24:central + 28] = declared.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveRefused, match="CRC"):
        _rows(path)


def test_member_without_a_name(tmp_path):
    """Found fuzzing: zipfile's ZipInfo.is_dir raised IndexError on an empty member name."""
    path = tmp_path / "noname.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(zipfile.ZipInfo(""), b"x")
    with pytest.raises(ArchiveRefused, match="IndexError"):
        sources(path)
