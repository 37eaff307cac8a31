"""Fixtures for integration tests: real servers on loopback ports, in short temporary directories.

- `embedded_dovecot` (one per session): a running embedded Dovecot, started by the gateway's own DovecotSupervisor
  on a background event loop, with a complete GatewayConfig (TLS from gateway.devpki, the accounts of ACCOUNTS in a
  temporary SQLite file). Blocking clients (imaplib, smtplib) can be used from the tests directly: the supervisor and
  its IMAP relay run on their own loop in their own thread.
- `dovecot_kit`: helpers for tests that need an instance of their own (another database, a restart, a failure):
  `new_root()`, `sqlite_accounts(path, accounts, inactive=())`, `config(root, url)`, `start(cfg, root, accounts)`,
  `stop(running)`.
- `dev_pki_dir`: the development PKI, once per session; `dovecot_binary`: skips where Dovecot or root is missing
  (fails under CI) and creates the mail user as the Makefile does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
from collections.abc import Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from argon2 import PasswordHasher

from config.schema import (
    DatabaseConfig,
    DovecotConfig,
    GatewayConfig,
    Listener,
    LoggingConfig,
    SpoolConfig,
    SubmissionConfig,
    TLSConfig,
)
from gateway.dovecot import DovecotSupervisor

T = TypeVar("T")

MAIL_USER = "mssgw-mail"
DOMAIN = "dev.mssante.test"
HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)

# Passwords of the accounts every embedded Dovecot starts with (test values, not secrets).
ACCOUNTS: Mapping[str, str] = {
    f"alice@{DOMAIN}": "alice-password-1",
    f"bob@{DOMAIN}": "bob-password-22",
}

ACCOUNTS_DDL = """CREATE TABLE IF NOT EXISTS accounts (
    address TEXT PRIMARY KEY, password_hash TEXT NOT NULL, active BOOLEAN NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, updated_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)"""


def ensure_mail_user(name: str = MAIL_USER) -> None:
    """Create the unprivileged mail user as the Makefile does, if it is missing (idempotent)."""
    if subprocess.run(["id", "-u", name], check=False, capture_output=True).returncode == 0:
        return
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def short_tmpdir(prefix: str = "mssgw-") -> Path:
    """Under /tmp, short: unix socket paths are limited to 107 bytes, and /root is not reachable by the mail user."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def sqlite_accounts(path: Path, accounts: Mapping[str, str] = ACCOUNTS, *, inactive: tuple[str, ...] = ()) -> str:
    """An SQLite accounts table (the gateway's schema) with argon2id hashes; returns its SQLAlchemy URL."""
    with sqlite3.connect(path) as db:
        db.execute(ACCOUNTS_DDL)
        for address, password in accounts.items():
            db.execute("INSERT OR REPLACE INTO accounts (address, password_hash, active) VALUES (?, ?, ?)",
                       (address, HASHER.hash(password), address not in inactive))
    path.chmod(0o600)
    return f"sqlite:///{path}"


def make_gateway_config(root: Path, pki_dir: Path, database_url: str, *, imap_port: int | None = None,
                        submission_port: int | None = None) -> GatewayConfig:
    """A complete GatewayConfig whose every path lies under `root` and every listener on a free loopback port."""
    return GatewayConfig(
        hostname="gw.dev.mssante.test",
        local_domains=(DOMAIN,),
        tls=TLSConfig(cert=pki_dir / "gateway" / "tls-server.crt", key=pki_dir / "gateway" / "tls-server.key",
                      ca=pki_dir / "ca-bundle.pem"),
        database=DatabaseConfig(url=database_url),
        spool=SpoolConfig(dir=root / "spool"),
        submission=SubmissionConfig(listen=Listener("127.0.0.1", submission_port or free_port())),
        mailboxes=DovecotConfig(mode="embedded", imap=Listener("127.0.0.1", imap_port or free_port()),
                                base_dir=root / "dovecot", mail_dir=root / "mail", mail_user=MAIL_USER),
        logging=LoggingConfig(level="DEBUG"),
    )


class LoopThread:
    """An event loop in a thread of its own, for servers that blocking clients talk to from the test thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="server-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclasses.dataclass
class RunningDovecot:
    """A running embedded Dovecot: its config, its supervisor and the loop the supervisor lives on."""

    cfg: GatewayConfig
    supervisor: DovecotSupervisor
    loop: LoopThread
    accounts: Mapping[str, str]
    root: Path

    @property
    def imap(self) -> tuple[str, int]:
        host, port = self.supervisor.imap_address
        return str(host), int(port)

    @property
    def lmtp(self) -> str:
        return str(self.cfg.mailboxes.lmtp_endpoint)


def start_dovecot(cfg: GatewayConfig, root: Path, accounts: Mapping[str, str]) -> RunningDovecot:
    loop = LoopThread()
    supervisor = loop.run(_make_supervisor(cfg))
    try:
        loop.run(supervisor.start())
        loop.run(supervisor.wait_ready())
    except BaseException:
        loop.run(supervisor.stop())
        loop.close()
        raise
    return RunningDovecot(cfg, supervisor, loop, accounts, root)


async def _make_supervisor(cfg: GatewayConfig) -> DovecotSupervisor:
    return DovecotSupervisor(cfg)  # built on the server loop, which its asyncio.Events belong to


def stop_dovecot(running: RunningDovecot) -> None:
    running.loop.run(running.supervisor.stop())
    running.loop.close()


class DovecotKit:
    """The helpers above, handed to tests as a fixture (test modules do not import conftest)."""

    ACCOUNTS = ACCOUNTS
    ACCOUNTS_DDL = ACCOUNTS_DDL
    DOMAIN = DOMAIN
    HASHER = HASHER

    def __init__(self, pki_dir: Path) -> None:
        self.pki_dir = pki_dir

    new_root = staticmethod(short_tmpdir)
    sqlite_accounts = staticmethod(sqlite_accounts)
    start = staticmethod(start_dovecot)
    stop = staticmethod(stop_dovecot)

    def config(self, root: Path, database_url: str) -> GatewayConfig:
        return make_gateway_config(root, self.pki_dir, database_url)


@pytest.fixture(scope="session")
def dovecot_kit(dovecot_binary: Path, dev_pki_dir: Path) -> DovecotKit:
    """Helpers to build configs and start further embedded Dovecot instances (each test stops its own)."""
    return DovecotKit(dev_pki_dir)


@pytest.fixture(scope="session")
def dev_pki_dir() -> Iterator[Path]:
    """The development PKI (gateway.devpki), created once per session in a temporary directory."""
    from gateway.devpki import create_dev_pki

    root = short_tmpdir("mssgw-pki-")
    create_dev_pki(root / "pki")
    yield root / "pki"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def dovecot_binary() -> Path:
    binary = Path("/usr/sbin/dovecot")
    if not binary.exists() or not Path("/usr/lib/dovecot/imap-login").exists():
        if os.environ.get("CI"):
            raise RuntimeError("Dovecot is missing: apt-get install dovecot-imapd dovecot-lmtpd dovecot-sqlite")
        pytest.skip("Dovecot is not installed (dovecot-imapd, dovecot-lmtpd, dovecot-sqlite)")
    if os.geteuid() != 0:
        pytest.skip("the embedded Dovecot needs root (it stores mail as the mail user)")
    ensure_mail_user()
    return binary


@pytest.fixture(scope="session")
def embedded_dovecot(dovecot_binary: Path, dev_pki_dir: Path) -> Iterator[RunningDovecot]:
    """One embedded Dovecot for the session: accounts ACCOUNTS in SQLite, IMAP STARTTLS on a free loopback port."""
    root = short_tmpdir()
    url = sqlite_accounts(root / "gateway.db")
    running = start_dovecot(make_gateway_config(root, dev_pki_dir, url), root, ACCOUNTS)
    yield running
    stop_dovecot(running)
    shutil.rmtree(root, ignore_errors=True)
