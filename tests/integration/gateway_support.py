"""A gateway as a real process (`mssgw run`) for integration tests, with its own directory,
accounts and log, and the clients that talk to it."""

from __future__ import annotations

import imaplib
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from config.schema import DatabaseConfig
from gateway.accounts import AccountStore
from gateway.db import create_tables, make_engine

DOMAIN = "dev.mssante.test"
ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
PASSWORDS = {ALICE: "alice-long-password", BOB: "bob-long-password"}
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_tmpdir() -> Path:
    """Short (unix socket paths are limited to 107 bytes) and reachable by the mail user."""
    path = Path(tempfile.mkdtemp(prefix="mssgw-e2e-", dir="/tmp"))
    path.chmod(0o755)
    return path


class GatewayProcess:
    """`python -m gateway.cli -c CONFIG run` in its own process, with its log in a file.

    `extra` is appended to the configuration (e.g. [relay], [smime], [inbound] tables); `ca`
    replaces the trust anchors of the PKI (two gateways trust each other's roots).
    """

    def __init__(self, root: Path, pki: Path, database_url: str | None = None, *, domain: str = DOMAIN,
                 hostname: str = "gw.dev.mssante.test", accounts: Mapping[str, str] | None = None,
                 ca: Path | None = None, extra: str = "") -> None:
        self.root = root
        root.mkdir(mode=0o755, exist_ok=True)
        self.database_url = database_url or f"sqlite:///{root / 'gateway.db'}"
        self.smtp_port, self.imap_port, self.inbound_port = free_port(), free_port(), free_port()
        self.passwords = dict(accounts if accounts is not None else PASSWORDS)
        self.config = root / "gateway.toml"
        self.config.write_text(f"""
hostname = "{hostname}"
local_domains = ["{domain}"]
[tls]
cert = "{pki / 'gateway' / 'tls-server-chain.pem'}"
key = "{pki / 'gateway' / 'tls-server.key'}"
ca = "{ca or pki / 'ca-bundle.pem'}"
[database]
url = "{self.database_url}"
[spool]
dir = "spool"
[submission]
listen = {{ host = "127.0.0.1", port = {self.smtp_port} }}
[mailboxes]
mode = "embedded"
imap = {{ host = "127.0.0.1", port = {self.imap_port} }}
base_dir = "dc"
mail_dir = "mail"
[logging]
level = "DEBUG"
{extra.replace("INBOUND_PORT", str(self.inbound_port))}
""", encoding="utf-8")
        self.ca = str(ca or pki / "ca-bundle.pem")
        self.log = root / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        engine = make_engine(DatabaseConfig(url=self.database_url))
        create_tables(engine)
        store = AccountStore(engine)
        for address, password in self.passwords.items():
            store.add(address, password)
        engine.dispose()

    def mssgw(self, *args: str) -> subprocess.CompletedProcess[str]:
        """An operator command against this gateway's configuration."""
        return subprocess.run([sys.executable, "-m", "gateway.cli", "-c", str(self.config), *args], cwd=ROOT,
                              capture_output=True, text=True, check=False)

    def start(self, timeout: float = 30) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        out = open(self.log, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "-c", str(self.config), "run"],
                                     cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        deadline = time.monotonic() + timeout
        while b"gateway ready" not in self.log.read_bytes()[offset:]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the gateway did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def interrupt(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(30)

    def smtp(self, user: str = ALICE) -> smtplib.SMTP:
        c = smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=15)
        c.starttls(context=self._tls())
        c.login(user, self.passwords[user])
        return c

    def imap(self, user: str = BOB) -> imaplib.IMAP4:
        c = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=15)
        c.starttls(ssl_context=self._tls())
        c.login(user, self.passwords[user])
        return c

    def _tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.check_hostname = False  # the certificate names gw.dev.mssante.test; we dial 127.0.0.1
        return ctx


