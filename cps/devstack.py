"""pcscd with the gateway's vpcd reader, plus a virtual CPS card, for `make run`, the tests and the bench.

    python -m cps.devstack up --state-dir var/pcsc --pki var/pki --rpps 10001234567 [--slot 0]
    python -m cps.devstack status --state-dir var/pcsc
    python -m cps.devstack down --state-dir var/pcsc

pcscd is a machine-wide singleton (one socket, /run/pcscd/pcscd.comm). `up` reuses a running
pcscd when it already offers the gateway's reader, and otherwise starts one with our own
reader.conf (an absolute path: pcscd chdirs to /) inside a network namespace that holds only a
loopback interface, because vpcd listens on every interface. The card joins that namespace
(`nsenter --net`) and connects to vpcd on 127.0.0.1. `down` stops only what `up` started (pid
files in the state directory). Development and tests only; the gateway never imports this.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cps.errors import CardError
from cps.pcsc import PcscContext

log = logging.getLogger(__name__)

READER_PREFIX = "Gateway Test PCD"
BASE_PORT = 0x9C40
VPCD_LIBRARY = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
ROOT = Path(__file__).resolve().parent.parent


class DevStackError(RuntimeError):
    """pcscd or the virtual card could not be started as required."""


def reader_name(slot: int) -> str:
    return f"{READER_PREFIX} 00 {slot:02d}"


def write_reader_conf(directory: Path) -> Path:
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "gateway-vpcd").write_text(
        f'FRIENDLYNAME "{READER_PREFIX}"\n'
        f"DEVICENAME   /dev/null:0x{BASE_PORT:04X}\n"
        f"LIBPATH      {VPCD_LIBRARY}\n"
        f"CHANNELID    0x{BASE_PORT:04X}\n")
    return directory


def readers() -> list[str] | None:
    """The readers pcscd knows, or None when no pcscd answers."""
    try:
        with PcscContext() as ctx:
            return ctx.readers()
    except CardError:
        return None


def card_present(reader: str) -> bool:
    try:
        with PcscContext() as ctx:
            states = ctx.states([reader])
    except CardError:
        return False
    return bool(states) and states[0].present


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise DevStackError(f"timed out after {timeout:g}s waiting for {what}")


def running_pcscd_pid() -> int:
    found = subprocess.run(["pgrep", "-x", "-r", "D,R,S", "pcscd"], capture_output=True, text=True, check=False).stdout.split()
    if len(found) != 1:
        raise DevStackError(f"expected one running pcscd, found {found or 'none'}")
    return int(found[0])


def netns_prefix(pcscd_pid: int) -> list[str]:
    """Enter pcscd's network namespace; refuse a pcscd whose vpcd port faces the network."""
    theirs = os.readlink(f"/proc/{pcscd_pid}/ns/net")
    if theirs == os.readlink("/proc/self/ns/net"):
        raise DevStackError("pcscd runs in the host network namespace, so vpcd listens on every interface; "
                            "stop it and let `python -m cps.devstack up` start one")
    return ["nsenter", f"--net=/proc/{pcscd_pid}/ns/net", "--"]


def start_pcscd(conf_dir: Path, **popen: object) -> subprocess.Popen[bytes]:
    """Start pcscd -f on `conf_dir` in a fresh network namespace (loopback only) and wait for our reader."""
    if not VPCD_LIBRARY.exists():
        raise DevStackError(f"{VPCD_LIBRARY} is missing: apt-get install pcscd vsmartcard-vpcd")
    pcscd = shutil.which("pcscd") or "/usr/sbin/pcscd"
    conf = write_reader_conf(conf_dir)
    process: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
        ["unshare", "--net", "--", "sh", "-c", f'ip link set lo up && exec "{pcscd}" -f -c "{conf}"'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    try:
        wait_until(lambda: reader_name(0) in (readers() or []), 10, "pcscd and its vpcd reader")
    except DevStackError:
        process.terminate()
        raise
    return process


def card_command(pcscd_pid: int, pki: Path, rpps: str, slot: int, *, pin_file: Path | None = None,
                 latency: float = 0.0) -> list[str]:
    command = [*netns_prefix(pcscd_pid), sys.executable, "-m", "cps.virtual_card", "--pki", str(pki.resolve()),
               "--rpps", rpps, "--port", str(BASE_PORT + slot), "--latency", str(latency)]
    if pin_file is not None:
        command += ["--pin-file", str(pin_file.resolve())]
    return command


def _pid_alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def up(state_dir: Path, pki: Path, rpps: str, slot: int) -> str:
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    known = readers()
    if known is None:
        pcscd = start_pcscd(state_dir / "reader.conf.d", start_new_session=True)
        (state_dir / "pcscd.pid").write_text(str(pcscd.pid))
        pcscd_pid = pcscd.pid
    elif reader_name(slot) not in known:
        raise DevStackError(f"a pcscd without the gateway's vpcd reader runs (readers: {known}): stop it first")
    else:
        pcscd_pid = running_pcscd_pid()
    if _pid_alive(state_dir / "card.pid") is None:
        log_file = (state_dir / "card.log").open("ab")
        card = subprocess.Popen(card_command(pcscd_pid, pki, rpps, slot), stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=log_file, cwd=ROOT, start_new_session=True,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
        (state_dir / "card.pid").write_text(str(card.pid))
    wait_until(lambda: card_present(reader_name(slot)), 10, f"the virtual card in {reader_name(slot)}")
    return reader_name(slot)


def down(state_dir: Path) -> None:
    for name in ("card.pid", "pcscd.pid"):
        pid_file = state_dir / name
        pid = _pid_alive(pid_file)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
        pid_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cps.devstack", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--state-dir", type=Path, default=ROOT / "var" / "pcsc")
    parser.add_argument("--pki", type=Path, default=ROOT / "var" / "pki")
    parser.add_argument("--rpps", default="10001234567")
    parser.add_argument("--slot", type=int, default=0, choices=(0, 1))
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            print(f"virtual CPS card of RPPS {args.rpps} in {up(args.state_dir, args.pki, args.rpps, args.slot)}")
        elif args.action == "down":
            down(args.state_dir)
        else:
            for reader in readers() or []:
                print(f"{reader}: {'card' if card_present(reader) else 'empty'}")
    except DevStackError as exc:
        print(f"cps.devstack: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
