"""`mssgw directory ...` end to end, in-process, on a SQLite database named by a real config file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from directory_sync.synthetic import mssante_lines, write_extract
from gateway.cli import main

CONFIG = """
hostname = "gw.test"
local_domains = ["test"]
[tls]
cert = "tls.crt"
key = "tls.key"
[database]
url = "sqlite:///directory.db"
[spool]
dir = "spool"
[submission]
listen = { host = "127.0.0.1", port = 10587 }
[mailboxes]
mode = "embedded"
imap = { host = "127.0.0.1", port = 10143 }
base_dir = "dovecot"
mail_dir = "mail"
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


def test_import_lookup_stats_and_the_brake(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = list(mssante_lines(200))
    zipped = write_extract(tmp_path / "mss.zip", lines, zipped=True, member="Extraction_Correspondance_MSSante.txt")
    assert main(["-c", str(config), "directory", "import", str(zipped)]) == 0
    out = capsys.readouterr()
    assert "mailboxes +200 ~0 -0 (now 200)" in out.out
    assert "load:" in out.err  # the progress line of a non-terminal

    assert main(["-c", str(config), "directory", "import", "--quiet", str(zipped)]) == 0
    assert "nothing changed" in capsys.readouterr().out

    address = lines[1].split("|")[1]
    assert main(["-c", str(config), "directory", "lookup", address.upper().replace(address.split("@")[0].upper(),
                                                                                    address.split("@")[0])]) == 0
    shown = capsys.readouterr().out
    assert f"address       {address}" in shown
    assert "certificate   none usable for encryption" in shown
    assert main(["-c", str(config), "directory", "lookup", "inconnu@medecin.mssante.fr"]) == 1
    capsys.readouterr()

    truncated = write_extract(tmp_path / "short.txt", lines[:101])
    assert main(["-c", str(config), "directory", "import", "--quiet", str(truncated)]) == 2
    assert "refusing to delete 100 of 200 rows of dir_mailbox" in capsys.readouterr().err
    assert main(["-c", str(config), "directory", "import", "--quiet", "--force", str(truncated)]) == 0
    capsys.readouterr()

    assert main(["-c", str(config), "directory", "stats"]) == 0
    stats = capsys.readouterr().out
    assert "mailboxes             100" in stats
    assert "refused" in stats and "unchanged" in stats


def test_unknown_files_and_missing_files_are_one_line_errors(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    other = tmp_path / "other.txt"
    other.write_text("a|b\n1|2\n", encoding="utf-8")
    assert main(["-c", str(config), "directory", "import", str(other)]) == 2
    assert "not a known RPPS/MSSanté extract" in capsys.readouterr().err
    assert main(["-c", str(config), "directory", "import", str(tmp_path / "absent.zip")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_sync_fhir_then_increment_since_the_last_run(
    config: Path, tmp_path: Path, annuaire: Any, capsys: pytest.CaptureFixture[str],
) -> None:
    annuaire.resources["Practitioner"] = [annuaire.practitioner("p1", "10000000001", "EXEMPLE", "JEANNE",
                                                                [annuaire.mailbox("jeanne@pro.mssante.fr")])]
    key = tmp_path / "key"
    key.write_text(annuaire.KEY + "\n", encoding="utf-8")
    base = ["-c", str(config), "directory", "sync-fhir", "--base-url", annuaire.base_url, "--api-key-file", str(key)]
    assert main(base) == 0
    assert "1 mailboxes upserted" in capsys.readouterr().out
    assert "mailbox-mss:contains" in annuaire.seen[0].query
    assert main([*base, "--since", "last"]) == 0
    capsys.readouterr()
    assert annuaire.seen[-1].query["_lastUpdated"][0].startswith("ge20")
    assert main(["-c", str(config), "directory", "lookup", "jeanne@pro.mssante.fr"]) == 0
    assert "RPPS          10000000001" in capsys.readouterr().out


def test_import_applies_the_configured_zip_limits(config: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`[limits] max_zip_ratio` reaches the import: an extract that inflates more than allowed is refused and
    the directory keeps what it had; the default ratio (100) takes the same file."""
    lines = list(mssante_lines(300))  # repetitive text: deflate packs it more than 2 to 1
    zipped = write_extract(tmp_path / "mss.zip", lines, zipped=True, member="Extraction_Correspondance_MSSante.txt")
    strict = tmp_path / "strict.toml"
    strict.write_text(CONFIG + "[limits]\nmax_zip_ratio = 2\n", encoding="utf-8")
    assert main(["-c", str(strict), "directory", "import", "--quiet", str(zipped)]) != 0
    assert "more than 2 times (a zip bomb)" in capsys.readouterr().err
    assert main(["-c", str(config), "directory", "import", "--quiet", str(zipped)]) == 0
    assert "mailboxes +300" in capsys.readouterr().out
