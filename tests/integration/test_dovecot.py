"""The embedded Dovecot, for real: delivery over LMTP with gateway.lmtp, reading over IMAP with imaplib (STARTTLS)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import imaplib
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway import lmtp
from gateway.dovecot import DovecotError, DovecotStartError, MailDirUnreachable

pytestmark = pytest.mark.dovecot

DOMAIN = "dev.mssante.test"  # the accounts of every embedded instance are dovecot_kit.ACCOUNTS, in this domain
RunningDovecot = Any  # tests/integration/conftest.py:RunningDovecot (test modules do not import conftest)

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
ADDED_HEADERS = {b"return-path", b"delivered-to", b"received"}


def tls_context(cfg_ca: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cfg_ca) if cfg_ca else None)
    ctx.check_hostname = False  # the dev certificate names gw.dev.mssante.test, we connect to 127.0.0.1
    return ctx


def imap_plain(dv: RunningDovecot) -> imaplib.IMAP4:
    host, port = dv.imap
    return imaplib.IMAP4(host, port, timeout=15)


def imap_login(dv: RunningDovecot, user: str, password: str | None = None) -> imaplib.IMAP4:
    client = imaplib.IMAP4(dv.imap[0], dv.imap[1], timeout=15)
    client.starttls(tls_context(dv.cfg.tls.ca))
    client.login(user, password if password is not None else dv.accounts[user])
    return client


def deliver(dv: RunningDovecot, recipients: list[str], message: bytes, sender: str = "sender@example.test"
            ) -> dict[str, lmtp.LmtpReply]:
    return asyncio.run(lmtp.deliver(dv.lmtp, sender, recipients, message, timeout=20))


def sample_message(subject: str) -> bytes:
    """A MIME message with an 8-bit part, a line starting with a dot and a binary attachment with lone CR and LF."""
    binary = bytes(range(256)) + b"\r\x00\n\n\r\r\x00" + os.urandom(3000)
    attachment = base64.encodebytes(binary).replace(b"\n", b"\r\n")
    return (
        b"From: Dr Alice <alice@dev.mssante.test>\r\n"
        b"To: Bob <bob@dev.mssante.test>\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"Message-ID: <" + secrets.token_hex(8).encode() + b"@dev.mssante.test>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n"
        b"\r\n"
        b"--b1\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        + "Compte rendu: échographie normale, à revoir dans 3 mois.\r\n".encode()
        + b".a line that starts with a dot\r\n"
        b".\r\n"
        b"--b1\r\n"
        b"Content-Type: application/octet-stream; name=\"scan.bin\"\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=\"scan.bin\"\r\n"
        b"\r\n"
        + attachment
        + b"--b1--\r\n"
    )


def fetch_by_subject(client: imaplib.IMAP4, subject: str) -> bytes:
    typ, data = client.search(None, "SUBJECT", f'"{subject}"')
    assert typ == "OK"
    ids = data[0].split()
    assert len(ids) == 1, f"expected one message with subject {subject!r}, found {len(ids)}"
    typ, fetched = client.fetch(ids[0], "(BODY.PEEK[])")
    assert typ == "OK"
    item = fetched[0]
    assert isinstance(item, tuple)
    return bytes(item[1])


def split_added_headers(fetched: bytes, original: bytes) -> list[bytes]:
    """The names of the header fields Dovecot put in front of the original message."""
    assert fetched.endswith(original), "the stored message differs from the one delivered"
    prefix = fetched[: len(fetched) - len(original)]
    return [m.group(1).lower() for m in re.finditer(rb"^([A-Za-z-]+):", prefix, re.MULTILINE)]


def test_message_is_stored_byte_for_byte(embedded_dovecot: RunningDovecot) -> None:
    subject = f"byte-identity {secrets.token_hex(4)}"
    message = sample_message(subject)
    replies = deliver(embedded_dovecot, [BOB], message)
    assert replies[BOB].code == 250 and replies[BOB].enhanced == "2.0.0"
    client = imap_login(embedded_dovecot, BOB)
    try:
        client.select("INBOX", readonly=True)
        fetched = fetch_by_subject(client, subject)
    finally:
        client.logout()
    names = split_added_headers(fetched, message)
    assert names and set(names) <= ADDED_HEADERS


def test_one_reply_per_recipient_and_unknown_user_refused(embedded_dovecot: RunningDovecot) -> None:
    stranger = f"nobody-{secrets.token_hex(3)}@{DOMAIN}"
    subject = f"two recipients {secrets.token_hex(4)}"
    message = sample_message(subject)
    replies = deliver(embedded_dovecot, [ALICE, stranger, BOB], message)
    assert list(replies) == [ALICE, stranger, BOB]
    assert replies[ALICE].code == 250 and replies[BOB].code == 250
    assert replies[stranger].code == 550 and replies[stranger].enhanced == "5.1.1"
    for user in (ALICE, BOB):
        client = imap_login(embedded_dovecot, user)
        try:
            client.select("INBOX", readonly=True)
            assert fetch_by_subject(client, subject).endswith(message)
        finally:
            client.logout()


def test_login_disabled_before_starttls(embedded_dovecot: RunningDovecot) -> None:
    client = imap_plain(embedded_dovecot)
    try:
        assert "STARTTLS" in client.capabilities
        assert "LOGINDISABLED" in client.capabilities
        assert not any(c.startswith("AUTH=") for c in client.capabilities)
        with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED|disallowed"):
            client.login(ALICE, embedded_dovecot.accounts[ALICE])
    finally:
        client.shutdown()


def test_tls_below_1_2_refused(embedded_dovecot: RunningDovecot) -> None:
    old = tls_context(embedded_dovecot.cfg.tls.ca)
    old.set_ciphers("ALL:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    client = imap_plain(embedded_dovecot)
    try:
        with pytest.raises((ssl.SSLError, OSError)):
            client.starttls(old)
    finally:
        client.sock.close()
    tls12 = tls_context(embedded_dovecot.cfg.tls.ca)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    client = imap_plain(embedded_dovecot)
    try:
        client.starttls(tls12)
        assert isinstance(client.sock, ssl.SSLSocket) and client.sock.version() == "TLSv1.2"
    finally:
        client.shutdown()


def test_wrong_password_refused(embedded_dovecot: RunningDovecot) -> None:
    client = imap_plain(embedded_dovecot)
    client.starttls(tls_context(embedded_dovecot.cfg.tls.ca))
    try:
        assert "AUTH=PLAIN" in client.capabilities and "LOGINDISABLED" not in client.capabilities
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.login(ALICE, "not-the-password")
    finally:
        client.shutdown()


def test_user_cannot_open_another_mailbox(embedded_dovecot: RunningDovecot) -> None:
    subject = f"for bob only {secrets.token_hex(4)}"
    assert deliver(embedded_dovecot, [BOB], sample_message(subject))[BOB].ok
    client = imap_login(embedded_dovecot, ALICE)
    try:
        typ, _ = client.select("INBOX", readonly=True)
        assert typ == "OK"
        typ, data = client.search(None, "SUBJECT", f'"{subject}"')
        assert typ == "OK" and data[0].split() == []
        for name in (f'"{BOB}"', '"../bob/Maildir"', f'"~{BOB}/INBOX"', '"#shared/bob"'):
            typ, _ = client.select(name, readonly=True)
            assert typ == "NO", name
        typ, listing = client.list()
        assert typ == "OK" and not any(b"bob" in line for line in listing if isinstance(line, bytes))
    finally:
        client.logout()


def test_idle_sees_new_mail(embedded_dovecot: RunningDovecot) -> None:
    client = imap_login(embedded_dovecot, ALICE)
    try:
        typ, data = client.select("INBOX")
        assert typ == "OK"
        before = int(data[0] or 0)
        tag = client._new_tag().decode()  # imaplib has no IDLE (RFC 2177): speak it on the TLS socket
        client.send(f"{tag} IDLE\r\n".encode())
        assert client.readline().startswith(b"+")
        assert deliver(embedded_dovecot, [ALICE], sample_message(f"idle {secrets.token_hex(4)}"))[ALICE].ok
        client.sock.settimeout(20)  # a guard against a hang, not a measurement
        line = client.readline()
        while not line.endswith(b"EXISTS\r\n"):
            line = client.readline()
        assert int(line.split()[1]) > before
        client.send(b"DONE\r\n")
        while not line.startswith(tag.encode()):
            line = client.readline()
        assert b" OK " in line
    finally:
        client.logout()


def test_inactive_account_cannot_log_in_nor_receive(dovecot_kit: Any) -> None:
    root = dovecot_kit.new_root()
    accounts = {**dovecot_kit.ACCOUNTS, f"carol@{DOMAIN}": "carol-password-3"}
    url = dovecot_kit.sqlite_accounts(root / "gateway.db", accounts, inactive=(f"carol@{DOMAIN}",))
    dv = dovecot_kit.start(dovecot_kit.config(root, url), root, accounts)
    try:
        with pytest.raises(imaplib.IMAP4.error):
            imap_login(dv, f"carol@{DOMAIN}")
        replies = deliver(dv, [f"carol@{DOMAIN}", ALICE], sample_message("inactive"))
        assert replies[f"carol@{DOMAIN}"].code == 550 and replies[ALICE].code == 250
        mail = dv.cfg.mailboxes.mail_dir
        assert (mail.stat().st_mode & 0o777) == 0o700
        alice_new = mail / DOMAIN / "alice" / "Maildir" / "new"
        files = list(alice_new.iterdir())
        assert files and all((f.stat().st_mode & 0o077) == 0 for f in files)
        assert {f.stat().st_uid for f in files} == {mail.stat().st_uid} != {0}
    finally:
        dovecot_kit.stop(dv)
        shutil.rmtree(root, ignore_errors=True)


def test_restarted_after_sigkill(dovecot_kit: Any) -> None:
    root = dovecot_kit.new_root()
    dv = dovecot_kit.start(dovecot_kit.config(root, dovecot_kit.sqlite_accounts(root / "gateway.db")), root, dovecot_kit.ACCOUNTS)
    try:
        first = dv.supervisor.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while dv.supervisor.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert dv.supervisor.restarts == 1
        dv.loop.run(dv.supervisor.wait_ready(60), timeout=90)
        assert dv.supervisor.pid not in (None, first)
        subject = f"after restart {secrets.token_hex(4)}"
        assert deliver(dv, [ALICE], sample_message(subject))[ALICE].ok
        client = imap_login(dv, ALICE)
        try:
            client.select("INBOX", readonly=True)
            assert fetch_by_subject(client, subject)
        finally:
            client.logout()
        pid = dv.supervisor.pid
    finally:
        dovecot_kit.stop(dv)
        shutil.rmtree(root, ignore_errors=True)
    assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(OSError):
        socket.create_connection(dv.imap, timeout=2)


def test_unreachable_mail_dir_is_named(dovecot_kit: Any) -> None:
    root = dovecot_kit.new_root()
    try:
        locked = root / "locked"
        locked.mkdir(mode=0o700)
        cfg = dovecot_kit.config(root, dovecot_kit.sqlite_accounts(root / "gateway.db"))
        cfg = dataclasses.replace(cfg, mailboxes=dataclasses.replace(cfg.mailboxes, mail_dir=locked / "mail"))
        with pytest.raises(MailDirUnreachable) as info:
            dovecot_kit.start(cfg, root, dovecot_kit.ACCOUNTS)
        assert info.value.path == locked and "chmod o+x" in str(info.value)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_start_failure_is_reported(dovecot_kit: Any) -> None:
    root = dovecot_kit.new_root()
    try:
        cfg = dovecot_kit.config(root, dovecot_kit.sqlite_accounts(root / "gateway.db"))
        bad_tls = dataclasses.replace(cfg.tls, key=root / "missing.key")
        with pytest.raises(DovecotStartError) as info:
            dovecot_kit.start(dataclasses.replace(cfg, tls=bad_tls), root, dovecot_kit.ACCOUNTS)
        assert "missing.key" in " ".join(info.value.log_tail)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_accounts_url(dovecot_kit: Any) -> Iterator[str]:
    """A fresh PostgreSQL database holding the accounts table; dropped afterwards."""
    admin_url = os.environ.get("MSSGW_TEST_PG", "postgresql://root@127.0.0.1:5432/postgres")
    try:
        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no PostgreSQL at {admin_url}: {exc}")
    name = f"mssgw_dovecot_{secrets.token_hex(4)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with psycopg.connect(f"postgresql://root@127.0.0.1:5432/{name}", autocommit=True) as db:
            db.execute(dovecot_kit.ACCOUNTS_DDL)
            for address, password in dovecot_kit.ACCOUNTS.items():
                db.execute("INSERT INTO accounts (address, password_hash, active) VALUES (%s, %s, true)",
                           (address, dovecot_kit.HASHER.hash(password)))
            db.execute("UPDATE accounts SET active = false WHERE address = %s", (BOB,))
        yield f"postgresql+psycopg://root@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.postgres
def test_postgresql_passdb(dovecot_kit: Any, pg_accounts_url: str) -> None:
    root = dovecot_kit.new_root()
    dv = dovecot_kit.start(dovecot_kit.config(root, pg_accounts_url), root, dovecot_kit.ACCOUNTS)
    try:
        sql_conf = (dv.cfg.mailboxes.base_dir / "dovecot-sql.conf.ext")
        assert "driver = pgsql" in sql_conf.read_text() and (sql_conf.stat().st_mode & 0o077) == 0
        subject = f"postgres {secrets.token_hex(4)}"
        replies = deliver(dv, [ALICE, BOB], sample_message(subject))
        assert replies[ALICE].code == 250 and replies[BOB].code == 550  # bob is inactive in this database
        client = imap_login(dv, ALICE)
        try:
            client.select("INBOX", readonly=True)
            assert fetch_by_subject(client, subject)
        finally:
            client.logout()
        with pytest.raises(imaplib.IMAP4.error):
            imap_login(dv, BOB)
    finally:
        dovecot_kit.stop(dv)
        shutil.rmtree(root, ignore_errors=True)


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """TCP sockets in LISTEN state held by `pid` or its descendants (from `ss`, iproute2)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    pids = {pid} | {int(p) for p in subprocess.run(["pgrep", "-s", str(os.getsid(pid))], capture_output=True,
                                                      text=True, check=False).stdout.split()}
    found: set[tuple[str, int]] = set()
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            host, _, port = line.split()[3].rpartition(":")
            found.add((host, int(port)))
    return found


def test_dovecot_exposes_nothing_but_a_loopback_proxy_listener(embedded_dovecot: RunningDovecot) -> None:
    pid = embedded_dovecot.supervisor.pid
    assert pid is not None
    sockets = listening_sockets(pid)
    assert len(sockets) == 1 and all(host == "127.0.0.1" for host, _ in sockets), sockets
    assert embedded_dovecot.imap not in sockets  # the client-facing port is the gateway's relay
    lmtp_socket = embedded_dovecot.cfg.mailboxes.base_dir / "lmtp"
    st = lmtp_socket.stat()
    assert (st.st_mode & 0o777) == 0o600 and st.st_uid == 0
    # The backend refuses a client that does not speak the PROXY protocol first.
    _, backend_port = next(iter(sockets))
    with socket.create_connection(("127.0.0.1", backend_port), timeout=5) as raw:
        raw.sendall(b"a CAPABILITY\r\n")
        raw.settimeout(10)
        try:
            answer = raw.recv(4096)
        except ConnectionResetError:
            answer = b""
        assert answer == b""  # no greeting, no capability: Dovecot hung up


def test_stop_kills_a_dovecot_that_ignores_sigterm(dovecot_kit: Any) -> None:
    root = dovecot_kit.new_root()
    dv = dovecot_kit.start(dovecot_kit.config(root, dovecot_kit.sqlite_accounts(root / "gateway.db")), root, dovecot_kit.ACCOUNTS)
    try:
        pid = dv.supervisor.pid
        dv.supervisor.stop_timeout = 1.0
        os.kill(pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
        dv.loop.run(dv.supervisor.stop())
        assert not Path(f"/proc/{pid}").exists()
    finally:
        dovecot_kit.stop(dv)
        shutil.rmtree(root, ignore_errors=True)


def test_a_dovecot_left_by_a_killed_gateway_is_replaced(dovecot_kit: Any) -> None:
    root = dovecot_kit.new_root()
    cfg = dovecot_kit.config(root, dovecot_kit.sqlite_accounts(root / "gateway.db"))
    dovecot_kit.stop(dovecot_kit.start(cfg, root, dovecot_kit.ACCOUNTS))
    conf = cfg.mailboxes.base_dir / "mssgw-dovecot.conf"
    # What a gateway killed with SIGKILL leaves behind: its Dovecot, still running, holding base_dir.
    orphan = subprocess.Popen([str(cfg.mailboxes.binary), "-F", "-c", str(conf)], stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (cfg.mailboxes.base_dir / "master.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        dv = dovecot_kit.start(cfg, root, dovecot_kit.ACCOUNTS)
        try:
            assert orphan.wait(timeout=30) is not None
            assert dv.supervisor.pid != orphan.pid
            assert deliver(dv, [ALICE], sample_message("after the orphan"))[ALICE].ok
        finally:
            dovecot_kit.stop(dv)
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
        shutil.rmtree(root, ignore_errors=True)


def test_start_errors_name_the_setting(dovecot_kit: Any) -> None:
    root = dovecot_kit.new_root()
    try:
        cfg = dovecot_kit.config(root, dovecot_kit.sqlite_accounts(root / "gateway.db"))
        no_binary = dataclasses.replace(cfg, mailboxes=dataclasses.replace(cfg.mailboxes, binary=root / "no-dovecot"))
        with pytest.raises(DovecotError, match=r"no-dovecot.*apt-get install.*mailboxes.binary"):
            dovecot_kit.start(no_binary, root, dovecot_kit.ACCOUNTS)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", cfg.mailboxes.imap.port))
            taken.listen()
            with pytest.raises(DovecotError, match=r"cannot listen for IMAP on 127.0.0.1:\d+.*mailboxes.imap"):
                dovecot_kit.start(cfg, root, dovecot_kit.ACCOUNTS)
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_pool_reuses_sessions_and_replaces_a_stale_one(embedded_dovecot: RunningDovecot) -> None:
    """Several deliveries over one pooled connection; a session the server closed while idle is replaced."""
    pool = lmtp.LmtpPool(embedded_dovecot.lmtp, size=1)
    bob = "bob@dev.mssante.test"
    try:
        for i in range(3):
            replies = await pool.deliver("alice@dev.mssante.test", [bob], f"Subject: pool {i}\r\n\r\nx\r\n".encode())
            assert replies[bob].code == 250
        [(_, session)] = pool._idle
        await session.close()  # as if Dovecot had dropped the idle connection
        replies = await pool.deliver("alice@dev.mssante.test", [bob, "nobody@dev.mssante.test"],
                                     b"Subject: 4\r\n\r\ny\r\n")
        assert replies[bob].code == 250 and replies["nobody@dev.mssante.test"].code == 550
        assert len(pool._idle) == 1 and pool._idle[0][1] is not session
    finally:
        await pool.close()
