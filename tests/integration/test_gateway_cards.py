"""gateway.cards through the real PC/SC stack: pcscd + vpcd + the virtual CPS card (tests/pcsc_support.py).

Issue 6 §2 and §7: the card of an account is found by its RPPS number among the readers; signing with it
makes S/MIME that `openssl cms` opens and verifies; a locked or removed card raises an error the pipeline
reads as "hold"; reinsertion plus the operator's unlock calls `on_ready(account)`, which releases that account's held messages
from a real spool.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for pcsc_support

from pcsc_support import ROOT, PcscStack, PracticeCardFiles, make_test_pki

from config.schema import DatabaseConfig
from cps.errors import CardError, PinRequired
from cps.worker import CardSession
from gateway.cards import CardKeys, CardUnavailable, HoldForCard, release_held
from gateway.db import create_tables, make_engine
from gateway.spool import Spool
from smime.certpath import TrustStore, ValidationPolicy
from smime.keys import Decrypter, Signer
from smime.message import open_message, sign_and_encrypt

pytestmark = pytest.mark.pcsc

RPPS = "10005550123"
PIN = "2468"
ACCOUNT = "jeanne.exemple@dev.mssante.test"
MESSAGE = (b"From: jeanne.exemple@dev.mssante.test\r\nTo: paul.testeur@autre.mssante.test\r\n"
           b"Subject: compte rendu\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nBonjour,\r\n")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> PracticeCardFiles:
    return make_test_pki(tmp_path_factory.mktemp("cards-pki"), rpps=RPPS)


@pytest.fixture(scope="module")
def stack(files: PracticeCardFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PcscStack]:
    pcsc = PcscStack(tmp_path_factory.mktemp("pcsc"), files, pin=PIN)
    try:
        pcsc.start()
        yield pcsc
    finally:
        pcsc.stop()


@pytest.fixture()
async def keys(stack: PcscStack) -> AsyncIterator[CardKeys]:
    """CardKeys over every reader pcscd knows, the tests' card freshly reinserted (so locked)."""
    await asyncio.to_thread(stack.remove)
    await asyncio.to_thread(stack.insert)
    cards = CardKeys({ACCOUNT.upper(): RPPS, "other@dev.mssante.test": "10009999999"}, timeout=10, poll=0.2)
    await cards.start()
    try:
        yield cards
    finally:
        await cards.close()


def _practitioner(files: PracticeCardFiles, name: str) -> Path:
    return Path(files.pki, "practitioners", RPPS, name)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


async def _operator_unlock(stack: PcscStack) -> None:
    """What `mssgw card unlock` does, through the cps API: VERIFY once on its own connection, no reset."""
    operator = CardSession(stack.reader, timeout=10)
    try:
        await operator.unlock(PIN)
    finally:
        await operator.close(reset=False)


async def test_finds_the_card_by_rpps(keys: CardKeys, files: PracticeCardFiles) -> None:
    signer: Signer = keys.signer_for(ACCOUNT)
    decrypter: Decrypter = keys.decrypter_for(ACCOUNT)
    assert isinstance(signer, Signer) and isinstance(decrypter, Decrypter)
    assert signer.certificate == _cert(_practitioner(files, "sign.crt"))
    assert signer.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "8" + RPPS
    assert decrypter.certificate == _cert(_practitioner(files, "auth.crt"))
    assert keys.binds(ACCOUNT.upper()) and not keys.binds("nobody@dev.mssante.test")
    with pytest.raises(CardUnavailable) as absent:
        keys.signer_for("other@dev.mssante.test").certificate  # noqa: B018 - the property raises
    assert keys.hold_reason(absent.value) == ("CPS card of RPPS 10009999999 (account other@dev.mssante.test): "
                                              "not in any reader")


async def test_locked_card_holds_then_unlocked_card_signs_for_openssl(keys: CardKeys, stack: PcscStack,
                                                                      files: PracticeCardFiles,
                                                                      tmp_path: Path) -> None:
    signer = keys.signer_for(ACCOUNT)
    recipient = _cert(_practitioner(files, "auth.crt"))
    with pytest.raises(PinRequired) as locked:
        await sign_and_encrypt(MESSAGE, signer, [recipient], sender_encryption_certificate=recipient)
    reason = keys.hold_reason(locked.value)
    assert reason is not None and "locked" in reason
    assert keys.hold_reason(ValueError("not a card problem")) is None

    unlock = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "gateway.cli", "card", "unlock", "--reader", stack.reader,
                         "--pin-file", "-"], input=PIN + "\n", capture_output=True, text=True, cwd=ROOT, timeout=60,
        check=False)
    assert unlock.returncode == 0, unlock.stderr
    assert PIN not in unlock.stdout + unlock.stderr

    decrypter = keys.decrypter_for(ACCOUNT)
    sealed = await sign_and_encrypt(MESSAGE, signer, [recipient], sender_encryption_certificate=decrypter.certificate)
    (tmp_path / "sealed.eml").write_bytes(sealed)
    decrypt = await asyncio.to_thread(
        subprocess.run, ["openssl", "cms", "-decrypt", "-in", str(tmp_path / "sealed.eml"), "-recip",
                         str(_practitioner(files, "auth.crt")), "-inkey", str(_practitioner(files, "auth.key")),
                         "-out", str(tmp_path / "signed.eml")], capture_output=True, text=True, check=False)
    assert decrypt.returncode == 0, decrypt.stderr
    verify = await asyncio.to_thread(
        subprocess.run, ["openssl", "cms", "-verify", "-in", str(tmp_path / "signed.eml"), "-CAfile",
                         str(files.ca_cert), "-purpose", "any", "-out", str(tmp_path / "content.eml")],
        capture_output=True, text=True, check=False)
    assert verify.returncode == 0, verify.stderr
    assert b"Bonjour," in (tmp_path / "content.eml").read_bytes()

    trust = TrustStore.from_pem(files.ca_cert.read_bytes(), b"")
    # Decrypted by the card's key 0x82; make_test_pki issues no CRL, so revocation is not asked for here.
    opened = await open_message(sealed, decrypter=decrypter, trust=trust, policy=ValidationPolicy(revocation="off"))
    assert [report.failures for report in opened.reports] == [()]
    assert opened.reports[0].signer.rpps == RPPS


@pytest.fixture()
def spool(tmp_path: Path) -> Iterator[Spool]:
    engine = make_engine(DatabaseConfig(url=f"sqlite:///{tmp_path / 'gw.db'}"))
    create_tables(engine)
    yield Spool(tmp_path / "spool", engine)
    engine.dispose()


async def test_removed_card_holds_and_comes_back_once_unlocked(keys: CardKeys, stack: PcscStack,
                                                               spool: Spool) -> None:
    ready: asyncio.Queue[tuple[str, list[str]]] = asyncio.Queue()

    async def on_ready(account: str) -> None:
        await ready.put((account, await release_held(spool, account)))

    def hold(account: str, reason: str) -> str:
        """What the delivery worker does with the pipeline's HoldForCard."""
        queue_id = spool.accept(account, ["paul.testeur@autre.mssante.test"], MESSAGE, account=account)
        [msg] = spool.claim_due(1)
        signal = HoldForCard(account, reason)
        spool.hold(msg.id, signal.reason)
        return queue_id

    watcher = asyncio.create_task(keys.watch(on_ready))
    try:
        await _operator_unlock(stack)
        assert await asyncio.wait_for(ready.get(), 20) == (ACCOUNT, [])
        signer = keys.signer_for(ACCOUNT)
        assert len(await signer.sign(b"while present")) == 256

        await asyncio.to_thread(stack.remove)
        with pytest.raises((CardError, CardUnavailable)) as removed:
            await signer.sign(b"while absent")
        reason = keys.hold_reason(removed.value)
        assert reason is not None
        held = hold(ACCOUNT, reason)
        not_ours = hold("other@dev.mssante.test", "CPS card of RPPS 10009999999: not in any reader")

        await asyncio.to_thread(stack.insert)
        with pytest.raises(PinRequired) as locked:
            await signer.sign(b"reinserted, still locked")
        assert keys.hold_reason(locked.value) is not None
        assert ready.empty()  # nothing released before the operator has unlocked the card
        assert {e.id for e in spool.entries(["hold"])} == {held, not_ours}

        await _operator_unlock(stack)
        assert await asyncio.wait_for(ready.get(), 20) == (ACCOUNT, [held])
        assert [e.id for e in spool.entries(["hold"])] == [not_ours]
        assert [m.id for m in spool.claim_due(5)] == [held]
        assert len(await signer.sign(b"after the unlock")) == 256
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
