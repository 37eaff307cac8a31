"""Fixtures of the card unit tests: a throwaway practitioner PKI and an in-process virtual card OS."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for pcsc_support

from pcsc_support import PracticeCardFiles, make_test_pki

from cps.virtual_card import load_practitioner
from cps.virtual_os import CardFiles, VirtualCpsOs


@pytest.fixture(scope="session")
def practice_pki(tmp_path_factory: pytest.TempPathFactory) -> PracticeCardFiles:
    return make_test_pki(tmp_path_factory.mktemp("cps-pki"))


@pytest.fixture(scope="session")
def card_files(practice_pki: PracticeCardFiles) -> CardFiles:
    return load_practitioner(practice_pki.pki, practice_pki.rpps)


@pytest.fixture()
def card_os(card_files: CardFiles) -> VirtualCpsOs:
    return VirtualCpsOs(card_files, pin="1234", puk="12345678")


class ScriptedTransport:
    """Replays a script of (expected C-APDU, R-APDU) pairs and fails on the first difference."""

    def __init__(self, script: list[tuple[str, str]]) -> None:
        self.script = [(bytes.fromhex(c.replace(" ", "")), bytes.fromhex(r.replace(" ", ""))) for c, r in script]
        self.sent: list[bytes] = []

    def transmit(self, apdu: bytes) -> bytes:
        index = len(self.sent)
        self.sent.append(apdu)
        assert index < len(self.script), f"unexpected extra APDU {apdu.hex(' ')}"
        expected, reply = self.script[index]
        assert apdu == expected, f"APDU {index}: sent {apdu.hex(' ')}, expected {expected.hex(' ')}"
        return reply

    def done(self) -> bool:
        return len(self.sent) == len(self.script)


class OsTransport:
    """Feeds APDUs straight to a `VirtualCpsOs` (no PC/SC): for the command-set logic."""

    def __init__(self, card: VirtualCpsOs) -> None:
        self.card = card

    def transmit(self, apdu: bytes) -> bytes:
        return self.card.process(apdu)


@pytest.fixture()
def scripted() -> type[ScriptedTransport]:
    """The scripted transport class: `scripted([(c_apdu_hex, r_apdu_hex), ...])`."""
    return ScriptedTransport


@pytest.fixture()
def os_transport(card_os: VirtualCpsOs) -> OsTransport:
    return OsTransport(card_os)
