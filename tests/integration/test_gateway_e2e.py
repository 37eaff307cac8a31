"""The whole path, with the gateway as a real process (`mssgw run`): a client submits over SMTP
(STARTTLS + AUTH), the gateway spools and delivers over LMTP to its own Dovecot, and the
recipient reads the message over IMAP (STARTTLS + LOGIN), byte for byte. Also: the spool
survives SIGKILL right after a `250`, IDLE sees new mail, and Ctrl-C stops cleanly.
"""

from __future__ import annotations

import email.utils
import imaplib
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from config.schema import DatabaseConfig
from gateway.db import make_engine, metadata
from tests.integration.gateway_support import (
    ALICE,
    BOB,
    DOMAIN,
    PASSWORDS,
    GatewayProcess,
    inbox_messages,
    short_tmpdir,
)


@pytest.fixture
def gateway(dovecot_binary: Path, dev_pki_dir: Path) -> Iterator[GatewayProcess]:
    root = short_tmpdir()
    gw = GatewayProcess(root, dev_pki_dir)
    gw.start()
    yield gw
    if gw.proc is not None and gw.proc.poll() is None:
        gw.interrupt()
    pidfile = root / "dc" / "master.pid"  # a Dovecot orphaned by a SIGKILLed gateway that did not restart
    if pidfile.exists():
        subprocess.run(["pkill", "-F", str(pidfile), "-f", "mssgw-dovecot.conf"], check=False)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def gateway_on_postgresql(dovecot_binary: Path, dev_pki_dir: Path, pg_database: str) -> Iterator[GatewayProcess]:
    """The same gateway with its accounts and queue in PostgreSQL (Dovecot then reads accounts with pgsql)."""
    root = short_tmpdir()
    gw = GatewayProcess(root, dev_pki_dir, pg_database)
    gw.start()
    yield gw
    if gw.proc is not None and gw.proc.poll() is None:
        gw.interrupt()
    engine = make_engine(DatabaseConfig(url=pg_database))
    metadata.drop_all(engine)
    engine.dispose()
    shutil.rmtree(root, ignore_errors=True)


def a_message(subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = ALICE, BOB, subject
    msg["Date"] = email.utils.formatdate()
    msg["Message-ID"] = email.utils.make_msgid(domain=DOMAIN)
    msg.set_content("Compte rendu de consultation.\nÀ classer dans le dossier.\n", charset="utf-8", cte="8bit")
    blob = bytes(range(256)) * 64 + b"\r\r\n\n\x00"  # every byte value, lone CR and LF included
    msg.add_attachment(blob, maintype="application", subtype="octet-stream", filename="scan.bin")
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def wait_for(predicate, timeout: float = 20):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def added_headers(fetched: bytes, original: bytes) -> list[bytes]:
    assert fetched.endswith(original), "the body or the client's headers changed on the way"
    prefix = fetched[: len(fetched) - len(original)]
    return re.findall(rb"^([A-Za-z-]+):", prefix, flags=re.MULTILINE)


def test_submission_to_imap_byte_for_byte(gateway: GatewayProcess) -> None:
    original = a_message("Résultats")
    with gateway.smtp() as s:
        refused = s.sendmail(ALICE, [BOB], original)
    assert refused == {}
    with gateway.imap() as c:
        [fetched] = wait_for(lambda: inbox_messages(c))
    assert set(added_headers(fetched, original)) <= {b"Return-Path", b"Delivered-To", b"Received"}
    assert b"by gw.dev.mssante.test (mssgw) with ESMTPSA" in fetched
    with gateway.imap(ALICE) as c:
        assert inbox_messages(c) == []  # the sender's own mailbox is untouched


def test_submission_to_imap_on_postgresql(gateway_on_postgresql: GatewayProcess) -> None:
    original = a_message("PostgreSQL")
    with gateway_on_postgresql.smtp() as s:
        assert s.sendmail(ALICE, [BOB], original) == {}
    with gateway_on_postgresql.imap() as c:
        [fetched] = wait_for(lambda: inbox_messages(c))
    assert fetched.endswith(original)


def test_login_before_starttls_is_refused(gateway: GatewayProcess) -> None:
    c = imaplib.IMAP4("127.0.0.1", gateway.imap_port, timeout=10)
    assert "LOGINDISABLED" in c.capabilities
    with pytest.raises(imaplib.IMAP4.error):
        c.login(BOB, PASSWORDS[BOB])
    c.shutdown()
    with socket.create_connection(("127.0.0.1", gateway.smtp_port), timeout=10) as raw:
        raw.recv(200)
        raw.sendall(b"EHLO x\r\nMAIL FROM:<alice@dev.mssante.test>\r\n")
        time.sleep(0.2)
        assert b"530 5.7.0 Must issue a STARTTLS command first" in raw.recv(2000)


def test_idle_sees_new_mail(gateway: GatewayProcess) -> None:
    c = gateway.imap()
    c.select("INBOX")
    tag = c._new_tag()
    c.send(tag + b" IDLE\r\n")
    assert c.readline().startswith(b"+")
    with gateway.smtp() as s:
        s.sendmail(ALICE, [BOB], a_message("pendant IDLE"))
    c.sock.settimeout(20)
    line = c.readline()
    while b"EXISTS" not in line:
        line = c.readline()
    assert re.match(rb"\* 1 EXISTS", line)
    c.send(b"DONE\r\n")
    c.logout()


def test_acknowledged_message_survives_sigkill(gateway: GatewayProcess) -> None:
    """Kill the gateway right after each 250; restarted, it delivers every message exactly once."""
    ids = []
    for i in range(3):
        msg = a_message(f"crash {i}")
        ids.append(re.search(rb"Message-ID: (<[^>]+>)", msg).group(1))  # type: ignore[union-attr]
        s = gateway.smtp()
        s.mail(ALICE)
        s.rcpt(BOB)
        code, reply = s.data(msg)
        assert code == 250, reply
        gateway.kill()   # no QUIT, no flush: SIGKILL at once
        s.close()
        gateway.start()
    with gateway.imap() as c:
        fetched = wait_for(lambda: len(inbox_messages(c)) >= len(ids) and inbox_messages(c))
    got = [re.search(rb"Message-ID: (<[^>]+>)", m).group(1) for m in fetched]  # type: ignore[union-attr]
    assert sorted(got) == sorted(ids), "a message was lost or delivered twice"


def test_ctrl_c_stops_cleanly(gateway: GatewayProcess) -> None:
    with gateway.smtp() as s:
        s.sendmail(ALICE, [BOB], a_message("avant l'arrêt"))
    with gateway.imap() as c:
        assert wait_for(lambda: inbox_messages(c))
    dovecot_pid = int((gateway.root / "dc" / "master.pid").read_text())
    assert gateway.interrupt() == 0
    log = gateway.log.read_text()
    assert "Traceback" not in log
    assert "gateway stopped" in log
    assert not Path(f"/proc/{dovecot_pid}").exists() or b"dovecot" not in Path(
        f"/proc/{dovecot_pid}/cmdline").read_bytes()
    spool_files = os.listdir(gateway.root / "spool" / "msg")
    assert spool_files == []  # delivered before it stopped, nothing left half-done
