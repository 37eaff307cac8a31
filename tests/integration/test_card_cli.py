"""`mssgw card ...` as an operator runs it, against pcscd + vpcd + the virtual CPS card."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for pcsc_support

from pcsc_support import ROOT, PcscStack, make_test_pki

from cps.pcsc import PcscContext

pytestmark = pytest.mark.pcsc

PIN = "4321"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PcscStack]:
    files = make_test_pki(tmp_path_factory.mktemp("cli-pki"), rpps="10007654321")
    pcsc = PcscStack(tmp_path_factory.mktemp("pcsc"), files, pin=PIN)
    try:
        pcsc.start()
        yield pcsc
    finally:
        pcsc.stop()


def mssgw(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "card", *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, timeout=60, check=False)


def listed(stack: PcscStack) -> str:
    """The `card list` line of the tests' reader (the `make run` card may sit in the other slot)."""
    return next(x for x in mssgw("list").stdout.splitlines() if x.startswith(stack.reader))


def test_list_shows_holder_rpps_validity_and_tries(stack: PcscStack) -> None:
    result = mssgw("list")
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith(stack.reader))
    assert "Jeanne EXEMPLE, RPPS 10007654321" in line
    assert "signature certificate valid until" in line
    assert "PIN tries left 3, locked" in line


def test_info_prints_certificates_and_fingerprints(stack: PcscStack) -> None:
    result = mssgw("info", "--reader", stack.reader)
    assert result.returncode == 0, result.stderr
    assert "CPS3 contact" in result.stdout
    assert "CN=810007654321" in result.stdout
    assert result.stdout.count("SHA-256") == 2


def test_wrong_pin_from_a_file_is_tried_once_and_not_echoed(stack: PcscStack, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("8765\n")
    result = mssgw("unlock", "--reader", stack.reader, "--pin-file", str(pin_file))
    assert result.returncode == 2
    assert "wrong PIN, 2 tries left" in result.stderr
    assert "8765" not in result.stdout + result.stderr
    assert "PIN tries left 2" in listed(stack)


def test_unlock_from_stdin_serves_the_running_gateway(stack: PcscStack) -> None:
    """The gateway keeps its connection open; without any, pcscd powers the card down and the PIN state goes."""
    with PcscContext() as ctx:
        gateway_connection = ctx.connect(stack.reader)
        try:
            result = mssgw("unlock", "--reader", stack.reader, "--pin-file", "-", stdin=PIN + "\n")
            assert result.returncode == 0, result.stderr
            assert "unlocked (3 tries)" in result.stdout
            assert "PIN tries left 3, unlocked" in listed(stack)
        finally:
            gateway_connection.disconnect(reset=True)
    assert "PIN tries left 3, locked" in listed(stack)


def test_unblock_with_the_puk(stack: PcscStack, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("0000")
    for _ in range(3):
        mssgw("unlock", "--reader", stack.reader, "--pin-file", str(wrong))
    assert "BLOCKED" in listed(stack)
    blocked = mssgw("unlock", "--reader", stack.reader, "--pin-file", "-", stdin=PIN + "\n")
    assert blocked.returncode == 2 and "PIN blocked" in blocked.stderr
    new_pin = tmp_path / "new"
    new_pin.write_text(PIN)
    result = mssgw("unblock", "--reader", stack.reader, "--puk-file", "-", "--new-pin-file", str(new_pin),
                   stdin="12345678\n")
    assert result.returncode == 0, result.stderr
    assert "PIN tries left 3" in listed(stack)
