"""The async card worker: one thread per card, one asyncio lock, timeouts, and the key objects.

Every PC/SC call for a card runs on that card's own thread (an executor of one worker), so
the event loop never waits for the card, and APDU sequences of two operations never
interleave. `CardSigner` and `CardDecrypter` satisfy smime/keys.py's `Signer` and `Decrypter`
protocols structurally (cps/ does not import smime/).

The PIN: `unlock(pin)` reads the tries counter first, refuses to send anything to a blocked
card, and sends VERIFY exactly once. The PIN is not kept: the verified state lives on the card
(as on every PC/SC card, it serves every connection until the card is reset or removed), so
`mssgw card unlock`, run by an operator in another process, unlocks the card for a running
gateway too. A card that is removed, reinserted or reset has lost that state, and the next key
operation raises `PinRequired` (the card answers 6982). A wrong PIN is reported with the tries
left and never retried.

Signatures asked for while the card is busy wait together, and the next holder of the lock makes
them in one PC/SC transaction (`MAX_BATCH` at most): one hop to the card thread and one SELECT for
the lot instead of one each, each signature keeping its own MSE SET, PSO HASH and PSO CDS. A
gateway's senders share one card, and each hop costs the card thread a wait for the GIL of a busy
event loop. An error ends the batch: every signature of it fails with that error, as it would have
alone (a card removed or locked fails them all the same).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from cps.apdu import ApduChannel
from cps.cps3 import CardIdentity, Cps3Card
from cps.errors import (
    CardError,
    CardRemoved,
    CardTimeout,
    NoCardPresent,
    PcscError,
    PinBlocked,
    PinRequired,
    SecurityStatusNotSatisfied,
    UnsupportedOperation,
)
from cps.pcsc import PcscCard, PcscContext

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BATCH = 8
"""Signatures made in one PC/SC transaction at most: a real card takes ~0.2 s each, and the batch's timeout grows
with its size."""

current_card: contextvars.ContextVar[str] = contextvars.ContextVar("current_card", default="-")


@dataclass(frozen=True, slots=True)
class CardStatus:
    """What `mssgw card list` shows. Certificates are readable without the PIN."""

    reader: str
    present: bool
    identity: CardIdentity | None = None
    sign_certificate: x509.Certificate | None = None
    auth_certificate: x509.Certificate | None = None
    pin_tries_left: int | None = None
    unlocked: bool = False

    @property
    def rpps(self) -> str | None:
        """The RPPS number: the certificate's CN minus its leading 8 (idNat_PS, mssante.md §3.4)."""
        return _rpps_of(self.sign_certificate) if self.sign_certificate is not None else None

    @property
    def holder(self) -> str | None:
        if self.sign_certificate is None:
            return None
        subject = self.sign_certificate.subject
        parts = [str(a.value) for oid in (x509.NameOID.GIVEN_NAME, x509.NameOID.SURNAME)
                 for a in subject.get_attributes_for_oid(oid)]
        return " ".join(parts) or None


@dataclass(slots=True)
class _Signature:
    """One signature waiting for the card, and where its result goes."""

    data: bytes
    result: asyncio.Future[bytes]


@functools.lru_cache(maxsize=16)
def _rpps_of(certificate: x509.Certificate) -> str | None:
    """Kept per certificate: the gateway asks for the RPPS number of the cards in its readers at every signature."""
    cns = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    return cn[1:] if cn.startswith("8") and cn[1:].isdigit() else None


class CardSession:
    """One reader and the card in it, driven from asyncio.

    `timeout` bounds each operation (seconds; a batch of n signatures gets n times as long); on expiry
    `CardTimeout` is raised while the card thread finishes what it started (the next operation queues
    behind it).
    """

    def __init__(self, reader: str, *, timeout: float = 30.0) -> None:
        self.reader = reader
        self.timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"card:{reader}")
        self._lock = asyncio.Lock()
        self._context: PcscContext | None = None
        self._card: PcscCard | None = None
        self._cps: Cps3Card | None = None
        self._status = CardStatus(reader=reader, present=False)
        self._signatures: list[_Signature] = []
        self.round_trips = 0

    # -- the asyncio side -------------------------------------------------------------------

    async def _run(self, operation: str, func: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        token = current_card.set(self.reader)
        try:
            async with self._lock:
                ctx = contextvars.copy_context()
                future = loop.run_in_executor(self._executor, functools.partial(ctx.run, func))
                try:
                    return await asyncio.wait_for(future, self.timeout)
                except TimeoutError:
                    log.warning("card %s: %s timed out after %gs", self.reader, operation, self.timeout)
                    raise CardTimeout(operation, self.timeout) from None
        finally:
            current_card.reset(token)

    async def status(self) -> CardStatus:
        """Connect if needed and describe the card (reads the tries counter, never the PIN)."""
        return await self._run("status", self._status_sync)

    async def unlock(self, pin: str) -> int:
        """Present the PIN once. Returns the tries left (the maximum on success)."""
        return await self._run("unlock", functools.partial(self._unlock_sync, pin))

    async def unblock(self, puk: str, new_pin: str) -> None:
        """RESET RETRY COUNTER with the unblocking code: sets a new PIN and the full tries count.

        The card stays locked afterwards; `unlock` with the new PIN opens it.
        """
        def run(cps: Cps3Card) -> None:
            cps.unblock_pin(puk, new_pin)

        await self._run("unblock", functools.partial(self._guarded, run))
        log.info("card %s: PIN unblocked and changed by an operator", self.reader)

    async def sign_sha256(self, data: bytes) -> bytes:
        """Sign with key 0x81, with whatever other signatures wait for the card at the same time (module doc)."""
        mine = _Signature(data, asyncio.get_running_loop().create_future())
        self._signatures.append(mine)
        token = current_card.set(self.reader)
        try:
            async with self._lock:
                while not mine.result.done():  # batches go in order: ours is in one of them
                    await self._sign_batch()
        except BaseException:  # cancelled while waiting for the card: nobody wants this signature any more
            if mine in self._signatures:
                self._signatures.remove(mine)
            mine.result.cancel()
            raise
        finally:
            current_card.reset(token)
        return await mine.result

    async def _sign_batch(self) -> None:
        """The first waiting signatures, on the card thread in one transaction; their results where they go."""
        self._signatures = [s for s in self._signatures if not s.result.done()]  # callers gone (cancelled)
        batch, self._signatures = self._signatures[:MAX_BATCH], self._signatures[MAX_BATCH:]
        timeout = self.timeout * len(batch)
        ctx = contextvars.copy_context()
        job = asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(ctx.run, self._sign_sync, [s.data for s in batch]))
        try:
            signatures = await asyncio.wait_for(job, timeout)
        except TimeoutError:
            log.warning("card %s: %d signature(s) timed out after %gs", self.reader, len(batch), timeout)
            _settle(batch, CardTimeout("sign", timeout))
        except asyncio.CancelledError:
            # Our caller went away; the others of the batch still wait: back to the front of the queue.
            self._signatures[:0] = [s for s in batch if not s.result.done()]
            raise
        except Exception as exc:  # noqa: BLE001 - the card's answer, given to every signature of the batch
            _settle(batch, exc)
        else:
            for waiting, signature in zip(batch, signatures, strict=True):
                if not waiting.result.done():
                    waiting.result.set_result(signature)

    async def decipher(self, cryptogram: bytes) -> bytes:
        return await self._run("decipher", functools.partial(self._key_operation, "decipher", cryptogram))

    async def authenticate(self, digest_info: bytes) -> bytes:
        """Raw PKCS#1 v1.5 signature of a DigestInfo with the authentication key 0x82 (TLS client auth)."""
        return await self._run("authenticate", functools.partial(self._key_operation, "authenticate", digest_info))

    async def close(self, *, reset: bool = True) -> None:
        """Disconnect and stop the thread. `reset` powers the card off, which forgets the PIN.

        The gateway resets on shutdown; `mssgw card unlock` does not, or it would undo its own work.
        """
        try:
            await self._run("close", functools.partial(self._close_sync, reset))
        finally:
            self._executor.shutdown(wait=False)

    @property
    def cached_status(self) -> CardStatus:
        """The last status seen, without touching the card."""
        return self._status

    def signer(self) -> CardSigner:
        return CardSigner(self)

    def decrypter(self) -> CardDecrypter:
        return CardDecrypter(self)

    # -- the card thread ----------------------------------------------------------------------

    def _ensure_connected(self) -> Cps3Card:
        if self._cps is not None:
            return self._cps
        if self._context is None:
            self._context = PcscContext()
        try:
            card = self._context.connect(self.reader)
        except PcscError:
            self._drop_context()
            raise
        channel = ApduChannel(card)
        cps = Cps3Card(channel)
        try:
            with card.transaction():
                identity = cps.identify(card.atr)
                auth, sign = cps.read_certificates()
        except CardError:
            card.disconnect(reset=False)
            raise
        self._card, self._cps = card, cps
        self._status = CardStatus(reader=self.reader, present=True, identity=identity, sign_certificate=sign,
                                  auth_certificate=auth)
        log.info("card %s: CPS card %s, signature certificate %s", self.reader, identity.serial,
                 sign.fingerprint(hashes.SHA256()).hex())
        return cps

    def _forget(self) -> None:
        if self._card is not None:
            self._card.disconnect(reset=False)
        self._card = self._cps = None
        self._status = CardStatus(reader=self.reader, present=False)

    def _begin(self) -> tuple[Cps3Card, PcscCard]:
        """The connected card, in a begun transaction. A card removed and reinserted since the last
        operation (no APDU lost) is reconnected once, transparently; its PIN state is gone all the same."""
        cps = self._ensure_connected()
        assert self._card is not None
        try:
            self._card.begin_transaction()
        except CardRemoved:
            log.warning("card %s was removed or reset since the last operation: PIN needed again", self.reader)
            self._forget()
            cps = self._ensure_connected()
            assert self._card is not None
            self._card.begin_transaction()
        return cps, self._card

    def _guarded(self, func: Callable[[Cps3Card], T]) -> T:
        """Run `func` in a PC/SC transaction; a card removed meanwhile is forgotten (its PIN state is gone)."""
        try:
            cps, card = self._begin()
        except PcscError:
            self._drop_context()
            raise
        try:
            return func(cps)
        except CardRemoved:
            log.warning("card %s removed or reset during an operation: PIN needed again", self.reader)
            self._forget()
            raise
        except PcscError:
            self._drop_context()
            raise
        finally:
            card.end_transaction()
            self.round_trips = cps.channel.round_trips

    def _drop_context(self) -> None:
        """pcscd went away (restart, crash): forget the handle and the context; the next call starts afresh."""
        log.warning("card %s: PC/SC service lost", self.reader)
        self._card = self._cps = None
        self._status = CardStatus(reader=self.reader, present=False)
        if self._context is not None:
            self._context.close()
            self._context = None

    def _status_sync(self) -> CardStatus:
        try:
            tries, unlocked = self._guarded(lambda cps: (cps.pin_tries_left(), cps.pin_verified()))
        except (NoCardPresent, CardRemoved):
            self._forget()
            return self._status
        self._status = CardStatus(reader=self.reader, present=True, identity=self._status.identity,
                                  sign_certificate=self._status.sign_certificate,
                                  auth_certificate=self._status.auth_certificate, pin_tries_left=tries,
                                  unlocked=unlocked)
        return self._status

    def _unlock_sync(self, pin: str) -> int:
        def verify(cps: Cps3Card) -> int:
            tries = cps.pin_tries_left()
            if tries == 0:
                raise PinBlocked()
            cps.verify_pin(pin)
            return cps.pin_tries_left()

        try:
            tries = self._guarded(verify)
        except CardError as exc:
            log.warning("card %s: PIN refused: %s", self.reader, exc)
            raise
        self._status = CardStatus(reader=self.reader, present=True, identity=self._status.identity,
                                  sign_certificate=self._status.sign_certificate,
                                  auth_certificate=self._status.auth_certificate, pin_tries_left=tries,
                                  unlocked=True)
        log.info("card %s unlocked", self.reader)
        return tries

    def _key_size(self, kind: Literal["sign", "decipher", "authenticate"]) -> int:
        self._ensure_connected()
        status = self._status
        certificate = status.sign_certificate if kind == "sign" else status.auth_certificate
        assert certificate is not None
        return (certificate.public_key().key_size + 7) // 8  # type: ignore[union-attr]

    def _sign_sync(self, items: list[bytes]) -> list[bytes]:
        key_size = self._key_size("sign")
        try:
            return self._guarded(lambda cps: cps.sign_sha256_many(items, key_size=key_size))
        except SecurityStatusNotSatisfied:
            raise PinRequired(self.reader) from None

    def _key_operation(self, kind: Literal["decipher", "authenticate"], data: bytes) -> bytes:
        key_size = self._key_size(kind)

        def run(cps: Cps3Card) -> bytes:
            if kind == "authenticate":
                return cps.internal_authenticate(data, key_size=key_size)
            return cps.decipher(data)

        try:
            return self._guarded(run)
        except SecurityStatusNotSatisfied:
            raise PinRequired(self.reader) from None

    def _close_sync(self, reset: bool) -> None:
        if self._card is not None:
            self._card.disconnect(reset=reset)
        self._card = self._cps = None
        if self._context is not None:
            self._context.close()
            self._context = None


def _settle(batch: list[_Signature], error: BaseException) -> None:
    for waiting in batch:
        if not waiting.result.done():
            waiting.result.set_exception(error)


class CardSigner:
    """A `Signer` (smime/keys.py) backed by the card's non-repudiation key 0x81.

    CPS3 signs SHA-256 with PKCS#1 v1.5 only (mssante.md §3.3); other choices raise
    `UnsupportedOperation` rather than silently using another key.
    """

    def __init__(self, session: CardSession) -> None:
        self._session = session

    @property
    def certificate(self) -> x509.Certificate:
        cert = self._session.cached_status.sign_certificate
        if cert is None:
            raise NoCardPresent(self._session.reader)
        return cert

    async def sign(self, data: bytes, *, hash_name: str = "sha256", padding: str = "pkcs1v15") -> bytes:
        if hash_name != "sha256" or padding != "pkcs1v15":
            raise UnsupportedOperation(f"CPS3 signature with {hash_name}/{padding}")
        return await self._session.sign_sha256(data)


class CardDecrypter:
    """A `Decrypter` (smime/keys.py) backed by key 0x82 (PSO DECIPHER, RSAES-PKCS1-v1_5 only)."""

    def __init__(self, session: CardSession) -> None:
        self._session = session

    @property
    def certificate(self) -> x509.Certificate:
        cert = self._session.cached_status.auth_certificate
        if cert is None:
            raise NoCardPresent(self._session.reader)
        return cert

    async def decrypt_key(self, encrypted_key: bytes, *, padding: str = "pkcs1v15",
                          oaep_hash: str = "sha256") -> bytes:
        if padding != "pkcs1v15":
            raise UnsupportedOperation(f"CPS3 key transport with {padding}")
        return await self._session.decipher(encrypted_key)
