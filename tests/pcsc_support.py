"""Start pcscd (our own reader.conf, vpcd bound to loopback) and a virtual CPS card for the tests.

pcscd is a machine-wide singleton: if one runs already with the gateway's reader configuration
(started by the Makefile), it is reused and left running; otherwise one is started here and
stopped at the end. The tests' card always sits in the second vpcd slot (`... 00 01`, port
0x9C41) so that the demo card of `make run` (slot `00 00`) is never touched.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from cps.errors import CardError
from cps.pcsc import PcscContext

ROOT = Path(__file__).resolve().parent.parent
READER_PREFIX = "Gateway Test PCD"
BASE_PORT = 0x9C40
TEST_SLOT = 1
VPCD_LIBRARY = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so"


def reader_conf(directory: Path) -> Path:
    """Write the reader.conf directory pcscd needs (`-c` wants an absolute path: pcscd chdirs to /)."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "gateway-vpcd").write_text(
        f'FRIENDLYNAME "{READER_PREFIX}"\n'
        f"DEVICENAME   /dev/null:0x{BASE_PORT:04X}\n"
        f"LIBPATH      {VPCD_LIBRARY}\n"
        f"CHANNELID    0x{BASE_PORT:04X}\n")
    return directory


def reader_name(slot: int) -> str:
    return f"{READER_PREFIX} 00 {slot:02d}"


def _readers() -> list[str] | None:
    """The readers pcscd knows, or None when no pcscd answers."""
    try:
        with PcscContext() as ctx:
            return ctx.readers()
    except CardError:
        return None


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def card_present(reader: str) -> bool:
    try:
        with PcscContext() as ctx:
            states = ctx.states([reader])
    except CardError:
        return False
    return bool(states) and states[0].present


def running_pcscd_pid() -> int:
    found = subprocess.run(["pgrep", "-x", "pcscd"], capture_output=True, text=True, check=False).stdout.split()
    if len(found) != 1:
        raise RuntimeError(f"expected one running pcscd, found {found}")
    return int(found[0])


def card_command_prefix(pcscd_pid: int) -> list[str]:
    """Run the card in pcscd's network namespace, refusing a pcscd whose vpcd port faces the network."""
    theirs = os.readlink(f"/proc/{pcscd_pid}/ns/net")
    if theirs == os.readlink("/proc/self/ns/net"):
        raise RuntimeError("pcscd runs in the host network namespace, so vpcd listens on every interface; "
                           "start it with `unshare --net` (see tests/pcsc_support.py)")
    return ["nsenter", f"--net=/proc/{pcscd_pid}/ns/net", "--"]


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

    def start(self) -> None:
        readers = _readers()
        if readers is None:
            conf = reader_conf(self.workdir / "reader.conf.d")
            pcscd = shutil.which("pcscd") or "/usr/sbin/pcscd"
            self._pcscd = subprocess.Popen(
                ["unshare", "--net", "--", "sh", "-c", f'ip link set lo up && exec "{pcscd}" -f -c "{conf}"'],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait(lambda: self.reader in (_readers() or []), 10, "pcscd")
            self.pcscd_pid = self._pcscd.pid
        elif self.reader not in readers:
            raise RuntimeError(f"a pcscd without the gateway's vpcd reader is running (readers: {readers}); "
                               "stop it or start it with the gateway's reader.conf")
        else:
            self.pcscd_pid = running_pcscd_pid()
        self.start_card()

    def start_card(self, latency: float = 0.0) -> None:
        pin_file = self.workdir / "card.pin"
        pin_file.write_text(self.pin)
        pin_file.chmod(0o600)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self._card = subprocess.Popen(
            [*card_command_prefix(self.pcscd_pid), sys.executable, "-m", "cps.virtual_card",
             "--pki", str(self.files.pki), "--rpps", self.files.rpps, "--port", str(BASE_PORT + TEST_SLOT),
             "--pin-file", str(pin_file), "--latency", str(latency)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        assert self._card.stdout is not None
        line = self._card.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"virtual card did not start: {line!r}")
        _wait(lambda: card_present(self.reader), 10, "the card in the reader")

    def control(self, command: str) -> None:
        assert self._card is not None and self._card.stdin is not None and self._card.stdout is not None
        self._card.stdin.write(command + "\n")
        self._card.stdin.flush()
        answer = self._card.stdout.readline().strip()
        if answer != f"ok {command}":
            raise RuntimeError(f"virtual card answered {answer!r} to {command!r}")

    def remove(self, wait: bool = True) -> None:
        self.control("remove")
        if wait:
            _wait(lambda: not card_present(self.reader), 10, "the card to be seen as removed")

    def insert(self, wait: bool = True) -> None:
        self.control("insert")
        if wait:
            _wait(lambda: card_present(self.reader), 10, "the card to be seen as inserted")

    def set_latency(self, seconds: float) -> None:
        self.control(f"latency {seconds}")

    def stop_card(self) -> None:
        if self._card is not None:
            self._card.terminate()
            self._card.wait(timeout=10)
            self._card = None

    def stop(self) -> None:
        self.stop_card()
        if self._pcscd is not None:
            self._pcscd.terminate()
            self._pcscd.wait(timeout=10)
            self._pcscd = None
