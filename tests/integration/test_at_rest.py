"""At rest (issue 7, item 7): what the gateways leave on disk after a full flow at DEBUG log level.

The flow: alice submits with AUTH on gateway A to bob on gateway B (signed with her organisation key, encrypted,
relayed, decrypted and verified on B); jeanne, whose account signs with her CPS card, sends while the card is
locked, so the message waits in A's spool until the operator unlocks the card with its PIN (`mssgw card unlock`);
bob reads both over IMAP; one wrong SMTP password and one wrong IMAP password are tried.

Then: the logs of both gateways (Dovecot's included) and the unlock command's output hold no body text, no
password (plain or base64 as AUTH carries it), no PIN (digits or APDU hex) and no private key (PEM markers or any
line of the key files); no file modified during the flow, anywhere under /tmp and /var/tmp, holds the body text
outside the recipients' mailboxes; spool, database, mailboxes and keys are readable by their service user only.
"""

from __future__ import annotations

import base64
import email
import email.policy
import functools
import imaplib
import os
import pwd
import secrets
import shutil
import smtplib
import ssl
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from gateway.devpki import DevPki, Practitioner
from tests.integration.gateway_support import (
    CARD_HOLDER_PASSWORD,
    GatewayProcess,
    TwoGateways,
    dev_pkis,
    inbox_messages,
    short_tmpdir,
    two_gateways,
    wait_until,
)
from tests.pcsc_support import PcscStack, dev_pki_card

PIN = "48159263"  # eight digits: unlikely to occur by chance in a log of hex ids and fingerprints
RPPS = "10007654321"  # not the `make run` demo card, which may sit in the other slot
WRONG_PASSWORD = "not-the-password-" + secrets.token_hex(6)
MAIL_USER = "mssgw-mail"


@dataclass
class Flow:
    world: TwoGateways
    token: str
    started: float
    held_spool_file_mode: int
    unlock_output: str


def letter(sender: str, to: str, subject: str, body: str) -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{secrets.token_hex(8)}@at-rest>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n").encode()


def spool_empty(gw: GatewayProcess) -> bool:
    return not any((gw.root / "spool" / "msg").iterdir())


def bobs_mail(world: TwoGateways, marker: bytes) -> list[bytes]:
    with world.b.imap(world.bob) as c:
        return [m for m in inbox_messages(c) if marker in m]


@pytest.fixture(scope="module")
def flow(dovecot_binary: Path) -> Iterator[Flow]:
    root = short_tmpdir()
    pki_a, pki_b = dev_pkis(root)
    jeanne = pki_a.practitioner(RPPS)
    stack = dev_pki_card(root / "pcsc", pki_a, RPPS, pin=PIN)
    world: TwoGateways | None = None
    try:
        world = two_gateways(root, pki_a, pki_b, card_holders=[jeanne], log_level="DEBUG")
        ensure_own_card(world.a, stack, jeanne)
        world.start()
        yield run_flow(world, stack, jeanne)
    finally:
        if world is not None:
            world.stop()
        stack.stop()
        if not os.environ.get("MSSGW_KEEP_TEST_DIRS"):
            shutil.rmtree(root, ignore_errors=True)


def ensure_own_card(gw: GatewayProcess, stack: PcscStack, jeanne: Practitioner) -> None:
    """The PIN is tried once, on our card only: a virtual card left running by another session in the tests'
    slot would cost it a try and fail the flow for a reason that is not the gateway's."""
    ours = x509.load_pem_x509_certificate(jeanne.sign_cert.read_bytes()).fingerprint(hashes.SHA256()).hex(":")
    info = gw.mssgw("card", "info", "--reader", stack.reader).stdout
    if ours.upper() not in info.upper():
        pytest.fail(f"the card in {stack.reader} is not the one this test started (a virtual card of another "
                    f"session still runs there?):\n{info}")


def run_flow(world: TwoGateways, stack: PcscStack, jeanne: Practitioner) -> Flow:
    token = secrets.token_hex(12)
    started = time.time() - 1
    with world.a.smtp(world.alice) as s:
        assert s.sendmail(world.alice, [world.bob], letter(world.alice, world.bob, "Résultats",
                                                           f"Compte rendu confidentiel {token} alice")) == {}
    assert wait_until(lambda: bobs_mail(world, token.encode())), "alice's message did not reach bob"
    with world.a.smtp_as(jeanne.email, CARD_HOLDER_PASSWORD) as s:
        assert s.sendmail(jeanne.email, [world.bob], letter(jeanne.email, world.bob, "Ordonnance",
                                                            f"Ordonnance confidentielle {token} jeanne")) == {}
    assert wait_until(lambda: " hold " in world.a.mssgw("queue", "list").stdout), world.a.mssgw("queue", "list")
    [held] = wait_until(lambda: list((world.a.root / "spool" / "msg").iterdir()))
    assert token.encode() in held.read_bytes()  # plaintext waits in the spool, which is why its mode matters
    held_mode = stat.S_IMODE(held.stat().st_mode)
    unlock = world.a.mssgw("card", "unlock", "--reader", stack.reader, "--pin-file", "-", stdin=PIN + "\n")
    assert unlock.returncode == 0, unlock.stderr
    received = wait_until(lambda: len(got := bobs_mail(world, token.encode())) >= 2 and got)
    assert received, "bob did not receive both messages"
    for message in received:
        verdict = email.message_from_bytes(message, policy=email.policy.default)["MSSGW-Security"]
        assert verdict.startswith("verified"), verdict
    with pytest.raises(smtplib.SMTPAuthenticationError):
        world.a.smtp_as(world.alice, WRONG_PASSWORD)
    with pytest.raises(imaplib.IMAP4.error):
        imap = imaplib.IMAP4("127.0.0.1", world.b.imap_port, timeout=30)
        tls = ssl.create_default_context(cafile=world.b.ca)
        tls.check_hostname = False  # the certificate names the gateway's host; we dial 127.0.0.1
        imap.starttls(ssl_context=tls)
        imap.login(world.bob, WRONG_PASSWORD)
    for gw in (world.a, world.b):  # everything delivered: the spools are empty again
        assert wait_until(functools.partial(spool_empty, gw), 30)
    return Flow(world, token, started, held_mode, unlock.stdout + unlock.stderr)


# --- the logs ----------------------------------------------------------------------------------------------------------

def private_key_lines(pki: DevPki) -> set[bytes]:
    """Every base64 line of every private key file the dev PKI wrote."""
    lines: set[bytes] = set()
    for path in pki.directory.rglob("*.key"):
        lines.update(line for line in path.read_bytes().splitlines() if line and not line.startswith(b"-----"))
    assert lines
    return lines


def secrets_of(flow: Flow) -> dict[str, bytes]:
    world = flow.world
    found = {"body text": flow.token.encode(), "PIN": PIN.encode(), "PIN as APDU hex": PIN.encode().hex().encode(),
             "PEM marker": b"-----BEGIN", "private key": b"PRIVATE KEY"}
    accounts = {world.alice: world.a.passwords[world.alice], world.bob: world.b.passwords[world.bob],
                "jeanne": CARD_HOLDER_PASSWORD, "the wrong password": WRONG_PASSWORD}
    for who, password in accounts.items():
        found[f"password of {who}"] = password.encode()
        found[f"password of {who}, base64"] = base64.b64encode(password.encode())
        if "@" in who:
            found[f"AUTH PLAIN of {who}"] = base64.b64encode(f"\0{who}\0{password}".encode())
    return found


def test_logs_hold_no_body_password_pin_or_key(flow: Flow) -> None:
    logs = {"gateway A": flow.world.a.log.read_bytes(), "gateway B": flow.world.b.log.read_bytes(),
            "mssgw card unlock": flow.unlock_output.encode()}
    assert b"DEBUG" in logs["gateway A"] and b"card" in logs["gateway A"]  # the logs are the verbose ones
    for name, text in logs.items():
        leaks = [what for what, needle in secrets_of(flow).items() if needle in text]
        assert not leaks, f"the log of {name} contains: {leaks}"
        for pki in (flow.world.pki_a, flow.world.pki_b):
            assert not any(line in text for line in private_key_lines(pki)), f"the log of {name} holds key material"


# --- temporary files ---------------------------------------------------------------------------------------------------

def files_holding(needle: bytes, tops: list[Path], *, since: float, skip: list[Path]) -> list[Path]:
    hits = []
    for top in tops:
        for folder, dirs, files in os.walk(top, onerror=lambda _: None):
            here = Path(folder)
            dirs[:] = [d for d in dirs if here / d not in skip]
            for name in files:
                path = here / name
                try:
                    st = path.lstat()
                    if not stat.S_ISREG(st.st_mode) or st.st_mtime < since or st.st_size > 50 << 20:
                        continue
                    if needle in path.read_bytes():
                        hits.append(path)
                except OSError:
                    continue
    return hits


def test_no_plaintext_left_outside_the_mailboxes(flow: Flow) -> None:
    mailboxes = [gw.root / "mail" for gw in (flow.world.a, flow.world.b)]
    hits = files_holding(flow.token.encode(), [Path("/tmp"), Path("/var/tmp")], since=flow.started, skip=mailboxes)
    assert hits == []
    maildir = flow.world.b.maildir(flow.world.bob)
    assert len(files_holding(flow.token.encode(), [maildir / "new", maildir / "cur"], since=0, skip=[])) == 2
    assert not any((maildir / "tmp").iterdir())  # Dovecot's delivery temporaries are gone too


# --- modes -------------------------------------------------------------------------------------------------------------

def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_spool_and_database_are_private(flow: Flow) -> None:
    assert flow.held_spool_file_mode == 0o600
    for gw in (flow.world.a, flow.world.b):
        for d in ("spool", "spool/msg", "spool/tmp", "spool/inflight"):
            assert mode(gw.root / d) == 0o700, d
        db = gw.root / "gateway.db"
        files = [db, *(p for p in (db.with_name("gateway.db-wal"), db.with_name("gateway.db-shm")) if p.exists())]
        assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}


def check_private_tree(top: Path, owner: str) -> None:
    uid = pwd.getpwnam(owner).pw_uid
    assert top.stat().st_uid == uid and mode(top) == 0o700
    for folder, dirs, files in os.walk(top):
        for d in dirs:
            path = Path(folder) / d
            assert path.stat().st_uid == uid and mode(path) & 0o077 == 0, f"{path}: {oct(mode(path))}"
        for f in files:
            path = Path(folder) / f
            assert path.stat().st_uid == uid, path
            if Path(folder).name in ("new", "cur", "tmp"):  # the messages themselves
                assert mode(path) == 0o600, f"{path}: {oct(mode(path))}"


def test_mailboxes_belong_to_the_mail_user_only(flow: Flow) -> None:
    for gw in (flow.world.a, flow.world.b):
        check_private_tree(gw.root / "mail", MAIL_USER)
    maildir = flow.world.b.maildir(flow.world.bob)
    assert any((maildir / "new").iterdir()) or any((maildir / "cur").iterdir())  # the check saw messages


def test_private_keys_written_by_dev_setup_are_private(flow: Flow) -> None:
    for pki in (flow.world.pki_a, flow.world.pki_b):
        secrets_written = [p for p in pki.directory.rglob("*")
                           if p.suffix in (".key", ".p12") or p.name == "p12-password"]
        assert len(secrets_written) >= 4
        for path in secrets_written:
            assert mode(path) == 0o600, f"{path}: {oct(mode(path))}"
            assert mode(path.parent) == 0o700, f"{path.parent}: {oct(mode(path.parent))}"


def test_gateway_process_runs_with_a_private_umask_and_no_core_dumps(flow: Flow) -> None:
    gw: GatewayProcess = flow.world.a
    assert gw.proc is not None
    status = Path(f"/proc/{gw.proc.pid}/status").read_text()
    umask = next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:"))
    assert int(umask, 8) == 0o077
    limits = Path(f"/proc/{gw.proc.pid}/limits").read_text()
    core = next(line.split()[4:6] for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core == ["0", "0"], core  # a core file would hold plaintext and keys


def test_dovecot_sql_configuration_is_private(flow: Flow) -> None:
    """It names the database (and carries a PostgreSQL password when there is one)."""
    for gw in (flow.world.a, flow.world.b):
        assert mode(gw.root / "dc" / "dovecot-sql.conf.ext") == 0o600
