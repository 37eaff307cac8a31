"""pcscd and a virtual CPS card for the tests (built on cps.devstack), and a throwaway practitioner PKI.

pcscd is a machine-wide singleton: if one runs already with the gateway's reader (started by
`make run` through `python -m cps.devstack up`), it is reused and left running; otherwise one is
started here, in its own loopback-only network namespace, and stopped at the end. The tests'
card always sits in the second vpcd slot (`... 00 01`, port 0x9C41), so the demo card of
`make run` (slot `00 00`) is never touched.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import functools
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from cps.devstack import (
    BASE_PORT,
    DevStackError,
    card_command,
    card_present,
    reader_name,
    readers,
    running_pcscd_pid,
    start_pcscd,
    wait_until,
)
from gateway.devpki import DevPki

ROOT = Path(__file__).resolve().parent.parent
TEST_SLOT = 1
LOCK_FILE = Path("/tmp/mssgw-pcsc-tests.lock")


@dataclass
class PracticeCardFiles:
    pki: Path
    rpps: str
    ca_cert: Path


def make_test_pki(directory: Path, rpps: str = "10001234567", key_size: int = 2048) -> PracticeCardFiles:
    """A throwaway CA and one practitioner's sign/auth keys, in the dev PKI layout."""
    now = dt.datetime.now(dt.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "TEST AC IGC-SANTE FORT PERSONNES"),
                         x509.NameAttribute(NameOID.COUNTRY_NAME, "FR")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
          .not_valid_after(now + dt.timedelta(days=365))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    base = directory / "practitioners" / rpps
    base.mkdir(parents=True, exist_ok=True)
    for name, usage in (("sign", x509.KeyUsage(True, True, False, False, False, False, False, False, False)),
                        ("auth", x509.KeyUsage(True, False, True, False, False, False, False, False, False))):
        key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
        rdn = x509.RelativeDistinguishedName
        subject = x509.Name([
            rdn([x509.NameAttribute(NameOID.COUNTRY_NAME, "FR")]),
            rdn([x509.NameAttribute(NameOID.TITLE, "Médecin")]),
            rdn([x509.NameAttribute(NameOID.COMMON_NAME, "8" + rpps),
                 x509.NameAttribute(NameOID.SURNAME, "EXEMPLE"),
                 x509.NameAttribute(NameOID.GIVEN_NAME, "Jeanne")]),
        ])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=365))
                .add_extension(usage, critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.RFC822Name("jeanne.exemple@dev.mssante.test")]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        (base / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (base / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_path = directory / "ca-bundle.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return PracticeCardFiles(pki=directory, rpps=rpps, ca_cert=ca_path)


def dev_pki_card(workdir: Path, pki: DevPki, rpps: str, *, pin: str = "1234") -> PcscStack:
    """pcscd (reused or ours) and, in the tests' slot, the started virtual card of practitioner `rpps` of a
    development PKI (gateway.devpki); `stop()` it afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    stack = PcscStack(workdir, PracticeCardFiles(pki=pki.directory, rpps=rpps, ca_cert=pki.personnes_cert), pin=pin)
    stack.start()
    return stack


class PcscStack:
    """pcscd (reused or ours) plus one virtual card process in slot `TEST_SLOT`."""

    def __init__(self, workdir: Path, files: PracticeCardFiles, *, pin: str = "1234") -> None:
        self.workdir = workdir.resolve()
        self.files = files
        self.pin = pin
        self.reader = reader_name(TEST_SLOT)
        self._pcscd: subprocess.Popen[bytes] | None = None
        self.pcscd_pid = 0
        self._card: subprocess.Popen[str] | None = None
        self._lock: IO[str] | None = None

    def start(self) -> None:
        self._lock_slot()
        known = readers()
        if known is None:
            self._pcscd = start_pcscd(self.workdir / "reader.conf.d")
            self.pcscd_pid = self._pcscd.pid
        elif self.reader not in known:
            raise DevStackError(f"a pcscd without the gateway's vpcd reader is running (readers: {known}); "
                                "stop it, or start it with `python -m cps.devstack up`")
        else:
            self.pcscd_pid = running_pcscd_pid()
        _evict_stale_cards()
        self.start_card()

    def start_card(self, latency: float = 0.0) -> None:
        pin_file = self.workdir / "card.pin"
        pin_file.write_text(self.pin)
        pin_file.chmod(0o600)
        self._card = subprocess.Popen(
            card_command(self.pcscd_pid, self.files.pki, self.files.rpps, TEST_SLOT, pin_file=pin_file,
                         latency=latency),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
            cwd=ROOT)
        assert self._card.stdout is not None
        line = self._card.stdout.readline()
        if not line.startswith("ready"):
            raise DevStackError(f"virtual card did not start: {line!r}")
        wait_until(lambda: card_present(self.reader), 10, "the card in the reader")

    def control(self, command: str) -> None:
        assert self._card is not None and self._card.stdin is not None and self._card.stdout is not None
        self._card.stdin.write(command + "\n")
        self._card.stdin.flush()
        answer = self._card.stdout.readline().strip()
        if answer != f"ok {command}":
            raise DevStackError(f"virtual card answered {answer!r} to {command!r}")

    def remove(self, wait: bool = True) -> None:
        self.control("remove")
        if wait:
            wait_until(lambda: not card_present(self.reader), 10, "the card to be seen as removed")

    def insert(self, wait: bool = True) -> None:
        self.control("insert")
        if wait:
            wait_until(lambda: card_present(self.reader), 10, "the card to be seen as inserted")

    def set_latency(self, seconds: float) -> None:
        self.control(f"latency {seconds}")

    def stop_card(self) -> None:
        if self._card is not None:
            self._card.terminate()
            self._card.wait(timeout=10)
            self._card = None

    def _lock_slot(self) -> None:
        """Serialise test sessions on this machine: they share pcscd and the tests' slot."""
        self._lock = LOCK_FILE.open("w")
        deadline = time.monotonic() + 600
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DevStackError(f"another test session holds {LOCK_FILE} for more than 10 minutes") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.stop_card()
        if self._pcscd is not None:
            self._pcscd.terminate()
            self._pcscd.wait(timeout=10)
            self._pcscd = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _evict_stale_cards() -> None:
    """Stop a virtual card left in the tests' slot by a test session that was killed.

    Called with the slot lock held: a live session would hold the lock, so any card process still
    serving the slot's vpcd port belongs to a dead one and would answer in place of ours."""
    port_argument = ["--port", str(BASE_PORT + TEST_SLOT)]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "cps.virtual_card" not in argv:
            continue
        at = argv.index("--port") if "--port" in argv else -1
        if at < 0 or argv[at:at + 2] != port_argument:
            continue
        pid = int(proc.name)
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            continue
        wait_until(functools.partial(_gone, pid), 10, f"the stale virtual card (pid {pid}) to stop")


def _gone(pid: int) -> bool:
    """The process has exited (or is a zombie nobody reaps: PID 1 here does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True
