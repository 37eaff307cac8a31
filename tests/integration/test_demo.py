"""The `make run` demo as README.md walks a newcomer through it (issue 6, item 8): the set-up `make dev-setup`
runs (`mssgw demo setup`), both gateways under `mssgw demo run` as `make run` starts them, the practitioner's
virtual CPS card through pcscd, then `mssgw demo send`: held while the card is locked, sent once the operator
unlocks it (`mssgw card unlock`), and read over IMAP on the peer decrypted, with the peer's security header
naming the card's RPPS number. Ctrl-C (SIGINT) stops both gateways and leaves nothing running.

The configurations are config/dev.toml and config/dev-peer.toml as shipped, copied beside a var/ of their own
with other ports, so that a `make run` on this machine is left alone. Its card sits in the first slot; this
test's card is the one of the second practitioner the demo binds (RPPS 10007654321, `--from paul.testeur@…`)
in the tests' slot, as tests/pcsc_support.py requires.
"""

from __future__ import annotations

import email
import email.policy
import imaplib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from config.loader import load
from gateway.devpki import load_dev_pki
from gateway.tls import client_context
from tests.integration.gateway_support import free_port, inbox_messages, short_tmpdir
from tests.pcsc_support import PcscStack, dev_pki_card

ROOT = Path(__file__).resolve().parents[2]
PIN = "1234"  # the virtual card's default, as for the `make run` card
RPPS = "10007654321"
SENDER = "paul.testeur@dev.mssante.test"
RECIPIENT = "secretariat@peer.mssante.test"
SHIPPED_PORTS = (10587, 10143, 10025, 10588, 10144, 10026)


@dataclass
class Demo:
    root: Path
    config: Path
    peer_config: Path
    launcher: subprocess.Popen[bytes]
    output: Path
    stack: PcscStack

    def mssgw(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway.cli", "-c", str(self.config), *args], cwd=ROOT,
                              input=stdin, capture_output=True, text=True, timeout=300, check=False)


def copy_configs(root: Path) -> tuple[Path, Path]:
    """The shipped demo configurations under root/config (so ../var is root/var), every port a free one."""
    ports = {str(p): str(free_port()) for p in SHIPPED_PORTS}
    (root / "config").mkdir()
    copies = []
    for name in ("dev.toml", "dev-peer.toml"):
        text = (ROOT / "config" / name).read_text(encoding="utf-8")
        text = re.sub(r"\b(" + "|".join(ports) + r")\b", lambda m: ports[m.group(1)], text)
        (root / "config" / name).write_text(text, encoding="utf-8")
        copies.append(root / "config" / name)
    return copies[0], copies[1]


def wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)
    return value


@pytest.fixture(scope="module")
def demo(dovecot_binary: Path) -> Iterator[Demo]:
    root = short_tmpdir()
    config, peer_config = copy_configs(root)
    kept: dict[Path, bytes] = {}
    for run in (1, 2):  # `make run` sets up at every start: the second time keeps keys, passwords and lists
        setup = subprocess.run([sys.executable, "-m", "gateway.cli", "-c", str(config), "demo", "setup",
                                "--peer-config", str(peer_config)], cwd=ROOT, capture_output=True, text=True,
                               timeout=300, check=False)
        assert setup.returncode == 0, setup.stdout + setup.stderr
        files = [root / "var" / name for name in ("dev-accounts.txt", "peer/dev-accounts.txt", "pki/manifest.json",
                                                  "peer/pki/organisation/org.key", "trust/anchors.pem",
                                                  "trust/listeblanche.xml")]
        if run == 2:
            assert {f: f.read_bytes() for f in files} == kept
        kept = {f: f.read_bytes() for f in files}
    pki = load_dev_pki(root / "var" / "pki")
    stack = dev_pki_card(root / "pcsc", pki, RPPS, pin=PIN)
    ours = x509.load_pem_x509_certificate(pki.practitioner(RPPS).sign_cert.read_bytes())
    info = subprocess.run([sys.executable, "-m", "gateway.cli", "card", "info", "--reader", stack.reader], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    if ours.fingerprint(hashes.SHA256()).hex(":").upper() not in info.stdout:
        stack.stop()
        raise AssertionError(f"the card in {stack.reader} is not this test's (a card process left running by "
                             f"another session holds the tests' slot?):\n{info.stdout}{info.stderr}")
    output = root / "demo-run.log"
    with output.open("wb") as out:
        launcher = subprocess.Popen([sys.executable, "-m", "gateway.cli", "-c", str(config), "demo", "run",
                                     "--peer-config", str(peer_config)], cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT)
    world = Demo(root, config, peer_config, launcher, output, stack)
    try:
        wait_for(lambda: b"The demo is running" in output.read_bytes() or launcher.poll() is not None, 120,
                 "both gateways")
        assert launcher.poll() is None, output.read_text()
        yield world
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGINT)
            launcher.wait(90)
        stack.stop()
        print(output.read_text()[-5000:])  # shown when a test fails
        if not os.environ.get("MSSGW_KEEP_TEST_DIRS"):
            shutil.rmtree(root, ignore_errors=True)


def password(creds: Path, address: str) -> str:
    return dict(line.split(" ", 1) for line in creds.read_text().splitlines())[address]


def peer_inbox(demo: Demo) -> list[bytes]:
    peer = load(demo.peer_config)
    with imaplib.IMAP4("127.0.0.1", peer.mailboxes.imap.port, timeout=30) as c:
        c.starttls(ssl_context=client_context(str(peer.tls.ca)))
        c.login(RECIPIENT, password(demo.root / "var" / "peer" / "dev-accounts.txt", RECIPIENT))
        return inbox_messages(c)


def test_the_walkthrough_sends_signed_encrypted_mail_that_the_peer_reads_verified(demo: Demo) -> None:
    # Before the unlock: the message waits for the card, and `demo send` says how to unlock it.
    held = demo.mssgw("demo", "send", "--peer-config", str(demo.peer_config), "--from", SENDER, "--wait", "60")
    assert held.returncode == 0, held.stdout + held.stderr
    assert "250 2.0.0" in held.stdout and "Held:" in held.stdout and "mssgw card unlock" in held.stdout, held.stdout
    assert peer_inbox(demo) == []

    unlock = demo.mssgw("card", "unlock", "--reader", demo.stack.reader, "--pin-file", "-", stdin=PIN + "\n")
    assert unlock.returncode == 0, unlock.stderr
    [released] = wait_for(lambda: peer_inbox(demo), 90, "the held message in the peer's inbox")

    # With the card unlocked, `demo send` follows its message into the peer's mailbox and shows the verdict.
    sent = demo.mssgw("demo", "send", "--peer-config", str(demo.peer_config), "--from", SENDER, "--wait", "90")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert f"Delivered to {RECIPIENT}" in sent.stdout and "MSSGW-Security: verified" in sent.stdout, sent.stdout
    assert "FETCH * (BODY.PEEK[HEADER.FIELDS" in sent.stdout  # how to read it, as the walkthrough shows

    def both() -> list[bytes] | None:
        inbox = peer_inbox(demo)
        return inbox if len(inbox) == 2 else None

    messages = wait_for(both, 30, "both messages")
    assert released in messages
    for raw in messages:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        security = str(msg["MSSGW-Security"])
        assert security.startswith("verified") and f"rpps={RPPS}" in security, security
        assert msg.get_content_type() == "text/plain"  # decrypted: no S/MIME envelope left
        assert "Ce message de démonstration" in msg.get_content()
        assert msg["From"] == SENDER


def gateway_processes(root: Path) -> list[str]:
    """The command lines of running gateways and Dovecot masters whose files lie under `root`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(root) in cmdline and ("gateway.cli" in cmdline or "dovecot" in cmdline):
            found.append(cmdline)
    return found


def test_ctrl_c_stops_both_gateways_and_leaves_nothing_running(demo: Demo) -> None:
    assert len([c for c in gateway_processes(demo.root) if " run" in c]) >= 3  # the launcher and two gateways
    demo.launcher.send_signal(signal.SIGINT)
    assert demo.launcher.wait(90) == 0, demo.output.read_text()[-3000:]
    assert "both gateways stopped" in demo.output.read_text()
    assert wait_for(lambda: not gateway_processes(demo.root), 30, "no process left") is True
