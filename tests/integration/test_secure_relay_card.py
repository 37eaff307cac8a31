"""The secure relay with a practitioner's CPS card (issue 6, items 2 and 7): gateway A signs with the virtual
CPS card through pcscd; while the card is locked or removed the message waits in state `hold`, and the
operator's unlock (`mssgw card unlock`) sends it on. Gateway B checks the signer's RPPS number against the
directory entry of the From address and marks the message verified.
"""

from __future__ import annotations

import email
import email.policy
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.devpki import Practitioner
from tests.integration.gateway_support import (
    CARD_HOLDER_PASSWORD,
    TwoGateways,
    dev_pkis,
    inbox_messages,
    short_tmpdir,
    two_gateways,
    wait_until,
)
from tests.pcsc_support import PcscStack, dev_pki_card

PIN = "1234"
RPPS = "10007654321"  # not the `make run` demo card (10001234567), which may sit in the other slot


@pytest.fixture(scope="module")
def setup(dovecot_binary: Path) -> Iterator[tuple[TwoGateways, PcscStack, Practitioner]]:
    root = short_tmpdir()
    pki_a, pki_b = dev_pkis(root)
    jeanne = pki_a.practitioner(RPPS)
    stack = dev_pki_card(root / "pcsc", pki_a, RPPS, pin=PIN)
    world = two_gateways(root, pki_a, pki_b, card_holders=[jeanne])
    try:
        world.start()
        yield world, stack, jeanne
    finally:
        world.stop()
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)


def queue_states(world: TwoGateways) -> str:
    return world.a.mssgw("queue", "list").stdout


def bobs_mail(world: TwoGateways, subject: bytes) -> list[bytes]:
    with world.b.imap(world.bob) as c:
        return [m for m in inbox_messages(c) if subject in m]


def send(world: TwoGateways, jeanne: Practitioner, subject: str) -> None:
    mail = (f"From: {jeanne.email}\r\nTo: {world.bob}\r\nSubject: {subject}\r\n\r\nOrdonnance.\r\n").encode()
    with world.a.smtp_as(jeanne.email, CARD_HOLDER_PASSWORD) as s:
        assert s.sendmail(jeanne.email, [world.bob], mail) == {}


def unlock(world: TwoGateways, stack: PcscStack) -> None:
    result = world.a.mssgw("card", "unlock", "--reader", stack.reader, "--pin-file", "-", stdin=PIN + "\n")
    assert result.returncode == 0, result.stderr


def test_locked_card_holds_then_unlock_sends_signed_by_the_card(setup) -> None:  # type: ignore[no-untyped-def]
    world, stack, jeanne = setup
    send(world, jeanne, "Carte verrouillee")
    assert wait_until(lambda: " hold " in queue_states(world)), queue_states(world)
    unlock(world, stack)
    [received] = wait_until(lambda: bobs_mail(world, b"Carte verrouillee"))
    security = email.message_from_bytes(received, policy=email.policy.default)["MSSGW-Security"]
    assert security.startswith("verified") and f"rpps={RPPS}" in security, security


def test_removed_card_holds_and_reinserted_card_releases(setup) -> None:  # type: ignore[no-untyped-def]
    world, stack, jeanne = setup
    stack.remove()
    send(world, jeanne, "Carte retiree")
    assert wait_until(lambda: " hold " in queue_states(world)), queue_states(world)
    stack.insert()
    unlock(world, stack)  # a reinserted card needs its PIN again, as a real one does
    [received] = wait_until(lambda: bobs_mail(world, b"Carte retiree"))
    assert email.message_from_bytes(received, policy=email.policy.default)["MSSGW-Security"].startswith("verified")
