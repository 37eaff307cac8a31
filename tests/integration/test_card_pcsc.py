"""The card through the real PC/SC stack: pcscd + vpcd + the virtual CPS card, keys from the dev PKI.

Covers issue 4 §6-7: certificates, signature, decipher, PIN counter, blocked PIN, removal in the
middle of an operation, reinsertion, presence events, the event loop staying responsive while
the card works, and CMS made with the card checked by `openssl cms` (and the reverse).
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for pcsc_support

from pcsc_support import PcscStack, PracticeCardFiles

from cps.errors import (
    CardRemoved,
    CardTimeout,
    MalformedResponse,
    NoCardPresent,
    PinBlocked,
    PinIncorrect,
    PinRequired,
    UnsupportedOperation,
)
from cps.presence import PresenceMonitor
from cps.worker import CardSession
from gateway.devpki import DevPki, create_dev_pki
from smime.envelope import decrypt_content
from smime.keys import Decrypter, Signer
from smime.signing import sign_message

pytestmark = pytest.mark.pcsc

RPPS = "10001234567"
PIN = "1234"
PUK = "12345678"


@pytest.fixture(scope="module")
def dev_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return create_dev_pki(tmp_path_factory.mktemp("card-pki") / "pki")


@pytest.fixture(scope="module")
def stack(dev_pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PcscStack]:
    files = PracticeCardFiles(pki=dev_pki.directory, rpps=RPPS, ca_cert=dev_pki.directory / "ca-bundle.pem")
    pcsc = PcscStack(tmp_path_factory.mktemp("pcsc"), files, pin=PIN)
    try:
        pcsc.start()
        yield pcsc
    finally:
        pcsc.stop()


@pytest.fixture(autouse=True)
def card_in_reader(stack: PcscStack) -> None:
    """Each test starts with the card in the reader and answering at full speed, whatever the last one left."""
    stack.set_latency(0)
    stack.insert()


@pytest.fixture()
async def session(stack: PcscStack) -> AsyncIterator[CardSession]:
    card = CardSession(stack.reader, timeout=10)
    try:
        yield card
    finally:
        await card.close()


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


async def test_status_reads_identity_and_certificates(session: CardSession, dev_pki: DevPki) -> None:
    status = await session.status()
    practitioner = dev_pki.practitioner(RPPS)
    assert status.present
    assert status.identity is not None and status.identity.kind == "CPS3 contact"
    assert status.sign_certificate == _cert(practitioner.sign_cert)
    assert status.auth_certificate == _cert(practitioner.auth_cert)
    assert status.rpps == RPPS
    assert status.holder == "Jeanne EXEMPLE"
    assert status.pin_tries_left == 3
    assert not status.unlocked


async def test_signature_verifies_with_the_certificate(session: CardSession) -> None:
    await session.status()
    signer: Signer = session.signer()  # mypy checks the protocol statically, isinstance at run time
    assert isinstance(signer, Signer)
    with pytest.raises(PinRequired):
        await signer.sign(b"too early")
    assert await session.unlock(PIN) == 3
    assert (await session.status()).unlocked
    data = b"signed attributes " * 20
    signature = await signer.sign(data)
    public = signer.certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(UnsupportedOperation):
        await signer.sign(data, padding="pss")


async def test_unlock_by_another_connection_serves_the_gateway(session: CardSession, stack: PcscStack) -> None:
    """What `mssgw card unlock` does: VERIFY on its own connection, leave the card powered."""
    await session.status()
    operator = CardSession(stack.reader, timeout=10)
    try:
        await operator.unlock(PIN)
    finally:
        await operator.close(reset=False)
    signature = await session.signer().sign(b"after an operator unlock")
    assert len(signature) == 256


async def test_decipher_unwraps_a_key(session: CardSession) -> None:
    await session.status()
    decrypter: Decrypter = session.decrypter()
    assert isinstance(decrypter, Decrypter)
    await session.unlock(PIN)
    public = decrypter.certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    key = bytes(range(32))
    assert await decrypter.decrypt_key(public.encrypt(key, padding.PKCS1v15())) == key


async def test_internal_authenticate_with_the_auth_key(session: CardSession) -> None:
    await session.status()
    await session.unlock(PIN)
    digest = hashlib.sha256(b"TLS CertificateVerify").digest()
    signature = await session.authenticate(bytes.fromhex("3031300d060960864801650304020105000420") + digest)
    public = session.decrypter().certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


async def test_wrong_pin_decrements_the_counter(session: CardSession) -> None:
    with pytest.raises(PinIncorrect) as info:
        await session.unlock("0000")
    assert info.value.tries_left == 2
    assert (await session.status()).pin_tries_left == 2
    assert await session.unlock(PIN) == 3


async def test_blocked_pin_is_not_tried_then_unblocked(session: CardSession) -> None:
    for left in (2, 1, 0):
        with pytest.raises(PinIncorrect) as info:
            await session.unlock("0000")
        assert info.value.tries_left == left
    with pytest.raises(PinBlocked):
        await session.unlock(PIN)
    assert (await session.status()).pin_tries_left == 0
    await session.unblock(PUK, PIN)
    assert (await session.status()).pin_tries_left == 3
    assert await session.unlock(PIN) == 3


async def test_removal_during_a_signature_then_reinsertion(session: CardSession, stack: PcscStack) -> None:
    await session.status()
    await session.unlock(PIN)
    signer = session.signer()
    stack.set_latency(1.0)
    pending = asyncio.create_task(signer.sign(b"interrupted"))
    await asyncio.sleep(0.3)
    await asyncio.to_thread(stack.remove)
    with pytest.raises(CardRemoved) as removed:
        await pending
    assert removed.value.hold
    with pytest.raises(NoCardPresent):
        await signer.sign(b"while absent")
    assert not (await session.status()).present
    stack.set_latency(0)
    await asyncio.to_thread(stack.insert)
    with pytest.raises(PinRequired):
        await signer.sign(b"after reinsertion")
    await session.unlock(PIN)
    signature = await signer.sign(b"after reinsertion")
    public = signer.certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(signature, b"after reinsertion", padding.PKCS1v15(), hashes.SHA256())


async def test_a_short_answer_from_a_card_still_in_the_reader_is_malformed(session: CardSession,
                                                                           stack: PcscStack) -> None:
    """A short R-APDU is not taken for a removal while the card stays in the reader: after the time pcscd
    takes to notice a removal, it is a malformed answer, and the card, still unlocked, serves the next one."""
    await session.status()
    await session.unlock(PIN)
    signer = session.signer()
    stack.control("truncate")
    started = time.monotonic()
    with pytest.raises(MalformedResponse, match="R-APDU of 1 bytes"):
        await signer.sign(b"answered with one byte")
    assert time.monotonic() - started >= 1.5  # it waited for pcscd to see whether the card had gone
    assert (await session.status()).unlocked
    assert _verifies(signer, await signer.sign(b"next"), b"next")


async def test_card_swapped_between_operations_asks_for_the_pin(session: CardSession, stack: PcscStack) -> None:
    await session.status()
    await session.unlock(PIN)
    await asyncio.to_thread(stack.remove)
    await asyncio.to_thread(stack.insert)
    with pytest.raises(PinRequired):
        await session.signer().sign(b"after a swap")
    status = await session.status()
    assert status.present and not status.unlocked


async def test_slow_card_times_out_then_serves_the_next_operation(stack: PcscStack) -> None:
    session = CardSession(stack.reader, timeout=0.5)
    try:
        await session.status()
        await session.unlock(PIN)
        stack.set_latency(1.5)
        with pytest.raises(CardTimeout) as info:
            await session.signer().sign(b"slow")
        assert info.value.hold and info.value.operation == "sign"
        stack.set_latency(0)
        session.timeout = 10
        assert len(await session.signer().sign(b"next")) == 256  # queued behind the slow one on the card thread
    finally:
        await session.close()


async def test_presence_events(stack: PcscStack) -> None:
    async with PresenceMonitor([stack.reader], poll=0.5) as monitor:
        events = aiter(monitor)
        first = await asyncio.wait_for(anext(events), 10)
        assert (first.reader, first.present) == (stack.reader, True)
        await asyncio.to_thread(stack.remove, False)
        assert not (await asyncio.wait_for(anext(events), 10)).present
        await asyncio.to_thread(stack.insert, False)
        back = await asyncio.wait_for(anext(events), 10)
        assert back.present and back.atr.hex().upper().startswith("3BAC")


async def test_event_loop_stays_responsive_while_the_card_signs(session: CardSession, stack: PcscStack) -> None:
    """Issue 4: while a 200 ms card signs 10 messages, a heartbeat never waits more than 20 ms."""
    await session.status()
    await session.unlock(PIN)
    stack.set_latency(0.2)
    signer = session.signer()
    worst = 0.0
    done = asyncio.Event()

    async def heartbeat() -> None:
        nonlocal worst
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            worst = max(worst, time.perf_counter() - before - 0.005)

    beat = asyncio.create_task(heartbeat())
    started = time.perf_counter()
    for i in range(10):
        await signer.sign(b"message %d" % i)
    elapsed = time.perf_counter() - started
    done.set()
    await beat
    assert elapsed >= 2.0  # the card really took its 200 ms each time
    assert worst < 0.020, f"event loop blocked for {worst * 1000:.1f} ms"


async def test_cms_signed_by_the_card_verifies_with_openssl(session: CardSession, dev_pki: DevPki,
                                                             tmp_path: Path) -> None:
    await session.status()
    await session.unlock(PIN)
    message = (b"From: jeanne.exemple@dev.mssante.test\r\nTo: paul.testeur@dev.mssante.test\r\n"
               b"Subject: compte rendu\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nBonjour,\r\n")
    signed = await sign_message(message, session.signer())
    (tmp_path / "signed.eml").write_bytes(signed)
    result = await asyncio.to_thread(
        subprocess.run,
        ["openssl", "cms", "-verify", "-in", str(tmp_path / "signed.eml"), "-CAfile",
         str(dev_pki.directory / "ca-bundle.pem"), "-purpose", "any", "-out", str(tmp_path / "content.txt")],
        capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "Verification successful" in result.stderr
    assert b"Bonjour," in (tmp_path / "content.txt").read_bytes()


async def test_openssl_encrypted_cms_decrypts_with_the_card(session: CardSession, tmp_path: Path) -> None:
    await session.status()
    await session.unlock(PIN)
    decrypter = session.decrypter()
    (tmp_path / "recipient.pem").write_bytes(decrypter.certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "plain.txt").write_bytes(b"resultats d'analyse\r\n")
    await asyncio.to_thread(
        subprocess.run,
        ["openssl", "cms", "-encrypt", "-aes256", "-binary", "-outform", "DER", "-in", str(tmp_path / "plain.txt"),
         "-out", str(tmp_path / "enveloped.der"), str(tmp_path / "recipient.pem")], check=True, capture_output=True)
    decrypted = await decrypt_content((tmp_path / "enveloped.der").read_bytes(), decrypter)
    assert decrypted.content == b"resultats d'analyse\r\n"


def _verifies(signer: Signer, signature: bytes, data: bytes) -> bool:
    public = signer.certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    try:
        public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    except Exception:  # noqa: BLE001 - any failure is "does not verify"
        return False
    return True


async def test_signatures_asked_together_share_a_transaction(session: CardSession, stack: PcscStack) -> None:
    """Senders sharing the card: what waits behind a signature goes in one batch, each result to its sender."""
    await session.status()
    await session.unlock(PIN)
    signer = session.signer()
    before = session.round_trips
    await signer.sign(b"alone")
    alone = session.round_trips - before  # SELECT, MSE HT, MSE DST, PSO HASH, PSO CDS, GET RESPONSE
    stack.set_latency(0.1)  # the first one keeps the card busy while the others queue behind it
    data = [b"signed attributes of message %d" % i for i in range(6)]
    before = session.round_trips
    signatures = await asyncio.gather(*(signer.sign(d) for d in data))
    assert all(_verifies(signer, s, d) for s, d in zip(signatures, data, strict=True))
    # The first alone, the five others after one SELECT: 6 + 1 + 5 x 5 exchanges instead of 6 x 6.
    assert session.round_trips - before == alone + 1 + 5 * (alone - 1)


async def test_a_locked_card_fails_every_signature_of_a_batch_without_a_pin_try(session: CardSession,
                                                                                stack: PcscStack) -> None:
    await session.status()
    signer = session.signer()
    outcomes = await asyncio.gather(*(signer.sign(b"%d" % i) for i in range(4)), return_exceptions=True)
    assert all(isinstance(o, PinRequired) and o.hold for o in outcomes)
    assert (await session.status()).pin_tries_left == 3


async def test_a_sender_that_goes_away_leaves_the_batch_to_the_others(session: CardSession,
                                                                       stack: PcscStack) -> None:
    await session.status()
    await session.unlock(PIN)
    signer = session.signer()
    stack.set_latency(0.2)
    first = asyncio.create_task(signer.sign(b"first"))
    await asyncio.sleep(0.05)  # the card is busy with the first: the next ones wait for the lock
    waiting = [asyncio.create_task(signer.sign(b"next %d" % i)) for i in range(3)]
    await asyncio.sleep(0.05)
    waiting[1].cancel()
    first.cancel()  # the one whose task drives the card goes away too
    signatures = await asyncio.wait_for(asyncio.gather(waiting[0], waiting[2]), 10)
    assert _verifies(signer, signatures[0], b"next 0") and _verifies(signer, signatures[1], b"next 2")
    for gone in (first, waiting[1]):
        with pytest.raises(asyncio.CancelledError):
            await gone
