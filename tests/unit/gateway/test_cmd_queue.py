"""`mssgw queue ...` as an operator runs it: a real process on a real configuration and database."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from config.loader import load
from gateway.db import create_tables, make_engine
from gateway.spool import Spool

ROOT = Path(__file__).resolve().parents[3]
CONFIG = """
hostname = "gw.test"
local_domains = ["x.test"]
[tls]
cert = "c.pem"
key = "k.pem"
[database]
url = "sqlite:///gw.db"
[spool]
dir = "spool"
[submission]
listen = { host = "127.0.0.1", port = 1 }
[mailboxes]
mode = "external"
imap = { host = "127.0.0.1", port = 1 }
base_dir = "dc"
mail_dir = "mail"
lmtp = "unix:/nonexistent"
"""


def mssgw(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "-c", str(config), "queue", *args],
                          cwd=ROOT, capture_output=True, text=True, check=False)


def test_list_show_release_delete(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(CONFIG)
    cfg = load(config)
    engine = make_engine(cfg.database)
    create_tables(engine)
    spool = Spool(cfg.spool.dir, engine)
    qid = spool.accept("a@x.test", ["b@x.test"], b"Subject: secret body\r\n\r\nconfidential\r\n", account="a@x.test")
    spool.claim_due(1)
    spool.hold(qid, "card removed from its reader")

    listed = mssgw(config, "list")
    assert listed.returncode == 0 and qid in listed.stdout and "hold" in listed.stdout
    shown = mssgw(config, "show", qid)
    assert "card removed from its reader" in shown.stdout and "b@x.test" in shown.stdout
    assert "confidential" not in listed.stdout + shown.stdout  # never the content
    assert mssgw(config, "release", qid).returncode == 0
    again = mssgw(config, "release", qid)
    assert again.returncode == 2 and "not held nor deferred" in again.stderr
    assert mssgw(config, "delete", qid).returncode == 0
    assert "0 message(s)" in mssgw(config, "list").stdout
    unknown = mssgw(config, "show", "NOPE")
    assert unknown.returncode == 2 and "no message NOPE" in unknown.stderr
    engine.dispose()
