"""The CPS cards of local accounts: which reader holds whose card, and the keys they lend the pipeline.

An account bound to an RPPS number (issue 6 §1) signs with the non-repudiation key 0x81 of the card whose
signature certificate CN is `8` + that number (mssante.md §3.4), and decrypts with its authentication key
0x82, whose certificate is the account's encryption certificate. Every PC/SC call goes through cps/: one
`CardSession` (one thread) per reader holding a bound card, kept open so that the PIN an operator presents
with `mssgw card unlock` keeps serving it (cps/README.md). The gateway never holds, logs or retries a PIN.

A card that is absent, removed or locked makes the key operation raise an error whose `hold` is true; the
pipeline asks `CardKeys.hold_reason` and parks the message in state `hold` (DESIGN.md). `watch` follows
insertions (cps.presence) and, once a bound card is present *and* unlocked again, calls `on_ready(account)`
so the gateway can release that account's held messages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cps.errors import CardError
from cps.pcsc import PcscContext
from cps.presence import PresenceMonitor
from cps.worker import CardSession, CardStatus
from gateway.errors import GatewayError, HoldMessage
from gateway.spool import QueueEntry, Spool
from smime.keys import HashName, KeyTransportPadding, OaepHashName, SignaturePadding

log = logging.getLogger(__name__)

OnReady = Callable[[str], Awaitable[None]]


class CardUnavailable(GatewayError):
    """No reader holds the card bound to an account, or the card changed under an operation: hold the message."""

    hold = True

    def __init__(self, account: str, rpps: str, why: str) -> None:
        self.account = account
        self.rpps = rpps
        super().__init__(f"CPS card of RPPS {rpps} (account {account}): {why}")


class HoldForCard(HoldMessage):
    """The pipeline's signal: park this message in state `hold` (DESIGN.md) until its card is back and unlocked.

    Raised by the pipeline from an exception `CardKeys.hold_reason` recognises; the delivery worker calls
    `Spool.hold(queue_id, reason)` on it instead of recording a retry.
    """

    def __init__(self, account: str, reason: str) -> None:
        self.account = account
        super().__init__(reason)


async def release_held(spool: Spool, account: str) -> list[str]:
    """Put back in the queue the held messages waiting for `account`'s card: those it sends (signed by the card)
    and those for it still pending (decrypted by the card). An `on_ready` for `CardKeys.watch`, with
    `functools.partial(release_held, spool)`; returns their queue ids."""
    account = account.lower()

    def waits_for_card(entry: QueueEntry) -> bool:
        return (entry.account or "").lower() == account or any(
            address.lower() == account and state == "pending" for address, state, _ in entry.recipients)

    def run() -> list[str]:
        return [entry.id for entry in spool.entries(["hold"]) if waits_for_card(entry) and spool.release(entry.id)]

    released = await asyncio.to_thread(run)
    if released:
        log.info("account %s: %d held message(s) released: %s", account, len(released), " ".join(released))
    return released


class CardKeys:
    """The card-backed `Signer`s and `Decrypter`s of the accounts in `bindings` ({address: RPPS number}).

    `readers` None searches every reader pcscd knows. `poll` is how often (seconds) a present but locked card
    is asked whether an operator has unlocked it; `timeout` bounds each card operation.
    """

    def __init__(self, bindings: Mapping[str, str], *, readers: Sequence[str] | None = None,
                 timeout: float = 30.0, poll: float = 1.0) -> None:
        self._rpps = {account.lower(): rpps for account, rpps in bindings.items()}
        self._accounts = {rpps: account for account, rpps in self._rpps.items()}
        self._readers = list(readers) if readers is not None else None
        self._timeout = timeout
        self._poll = poll
        self._sessions: dict[str, CardSession] = {}
        self._probing: dict[str, asyncio.Lock] = {}
        self._waiters: dict[str, asyncio.Task[None]] = {}
        self._on_ready: OnReady | None = None

    @property
    def accounts(self) -> frozenset[str]:
        return frozenset(self._rpps)

    def binds(self, account: str | None) -> bool:
        return account is not None and account.lower() in self._rpps

    # -- the composition root ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Look at every reader once, so that cards already in place serve at once (PC/SC errors are logged:
        pcscd may come later, and `watch` finds the cards then)."""
        try:
            names = self._readers if self._readers is not None else await asyncio.to_thread(_list_readers)
        except CardError as exc:
            log.warning("cannot list the smart-card readers: %s", exc)
            return
        for name in names:
            await self._probe(name)

    async def close(self) -> None:
        """Stop the watchers and disconnect; bound cards are reset, which forgets their PIN (cps/README.md)."""
        waiters = list(self._waiters.values())
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        self._waiters.clear()
        sessions = list(self._sessions.values())
        self._sessions.clear()
        for session in sessions:
            await _close(session, reset=True)

    async def watch(self, on_ready: OnReady) -> None:
        """Follow insertions and removals until cancelled; `on_ready(account)` once a bound card is present and
        unlocked (at start too, for the cards already unlocked, so messages held before a restart go on)."""
        self._on_ready = on_ready
        async with PresenceMonitor(self._readers, poll=self._poll) as monitor:
            async for event in monitor:
                if event.present:
                    account = await self._probe(event.reader)
                    if account is not None:
                        self._wait_for_unlock(event.reader)
                else:
                    waiter = self._waiters.pop(event.reader, None)
                    if waiter is not None:
                        waiter.cancel()
                    session = self._sessions.get(event.reader)
                    if session is not None:
                        await _refresh(session)

    # -- the pipeline ----------------------------------------------------------------------------------------

    def signer_for(self, account: str) -> CardSigner:
        """The signing key 0x81 of the account's card (KeyError if the account is bound to no card)."""
        return CardSigner(self, account.lower(), self._rpps[account.lower()])

    def decrypter_for(self, account: str) -> CardDecrypter:
        """The decryption key 0x82 of the account's card (KeyError if the account is bound to no card)."""
        return CardDecrypter(self, account.lower(), self._rpps[account.lower()])

    @staticmethod
    def hold_reason(exc: BaseException) -> str | None:
        """A one-line reason when `exc` (or what caused it) means "hold the message until the card is back",
        else None."""
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            if isinstance(current, (CardError, CardUnavailable)) and current.hold:
                return " ".join(str(current).split())
            current = current.__cause__ or current.__context__
        return None

    # -- inside ------------------------------------------------------------------------------------------------

    def _session_for(self, account: str, rpps: str) -> CardSession:
        for session in self._sessions.values():
            if session.cached_status.rpps == rpps:
                return session
        raise CardUnavailable(account, rpps, "not in any reader")

    async def _locate(self, account: str, rpps: str) -> CardSession:
        """As `_session_for`, but first looks again at the readers whose card was last seen gone (an insertion
        the presence watcher has not reported yet)."""
        try:
            return self._session_for(account, rpps)
        except CardUnavailable:
            for reader, session in list(self._sessions.items()):
                if not session.cached_status.present:
                    await self._probe(reader)
            return self._session_for(account, rpps)

    def _operation_failed(self, session: CardSession, exc: BaseException) -> None:
        """A hold on a card still in its reader (locked, reset): watch for the operator's unlock."""
        if self.hold_reason(exc) is not None and self._on_ready is not None:
            self._wait_for_unlock(session.reader)

    async def _probe(self, reader: str) -> str | None:
        """Read the card in `reader`; keep its session if the card is bound to an account (returned)."""
        lock = self._probing.setdefault(reader, asyncio.Lock())
        async with lock:
            session = self._sessions.get(reader)
            if session is None:
                session = CardSession(reader, timeout=self._timeout)
            status = await _refresh(session)
            account = self._accounts.get(status.rpps or "")
            if account is None and not status.present and reader in self._sessions:
                return None  # a bound card's reader, empty for now: keep it for the card's return
            if account is None:
                self._sessions.pop(reader, None)
                await _close(session, reset=False)  # not ours: leave its PIN state alone
                return None
            for other in self._sessions.values():
                if other is not session and other.cached_status.rpps == status.rpps:
                    log.warning("the card of RPPS %s is in readers %s and %s; using %s", status.rpps,
                                other.reader, reader, other.reader)
            self._sessions[reader] = session
            log.info("reader %s: CPS card of RPPS %s for account %s (%s)", reader, status.rpps, account,
                     "unlocked" if status.unlocked else "locked")
            return account

    def _wait_for_unlock(self, reader: str) -> None:
        running = self._waiters.get(reader)
        if running is None or running.done():
            self._waiters[reader] = asyncio.create_task(self._until_unlocked(reader), name=f"card-unlock:{reader}")

    async def _until_unlocked(self, reader: str) -> None:
        """Ask the card every `poll` seconds whether an operator has presented its PIN (VERIFY without data
        only reads the state, cps3.py); give up when it leaves the reader (the next insertion starts again)."""
        while True:
            session = self._sessions.get(reader)
            if session is None:
                return
            status = await _refresh(session)
            if not status.present:
                return
            account = self._accounts.get(status.rpps or "")
            if account is None:
                return
            if status.unlocked:
                log.info("reader %s: the card of account %s is unlocked: its held messages go on", reader, account)
                if self._on_ready is not None:
                    try:
                        await self._on_ready(account)
                    except Exception:
                        log.exception("releasing the held messages of %s failed", account)
                return
            await asyncio.sleep(self._poll)


T = TypeVar("T")


class _CardKey:
    """What the card signer and decrypter share: the account, its RPPS number, and running one key
    operation on whichever reader holds that card now, a failure reported to `CardKeys`."""

    def __init__(self, keys: CardKeys, account: str, rpps: str) -> None:
        self._keys = keys
        self.account = account
        self.rpps = rpps

    async def _run(self, operation: Callable[[CardSession], Awaitable[T]]) -> tuple[CardSession, T]:
        session = await self._keys._locate(self.account, self.rpps)
        try:
            return session, await operation(session)
        except CardError as exc:
            self._keys._operation_failed(session, exc)
            raise


class CardSigner(_CardKey):
    """A `Signer` (smime/keys.py) for an account: the key 0x81 of whichever reader holds its card right now."""

    @property
    def certificate(self) -> x509.Certificate:
        return self._keys._session_for(self.account, self.rpps).signer().certificate

    async def sign(self, data: bytes, *, hash_name: HashName = "sha256",
                   padding: SignaturePadding = "pkcs1v15") -> bytes:
        session, signature = await self._run(
            lambda s: s.signer().sign(data, hash_name=hash_name, padding=padding))
        _check_signature(session.cached_status, self.account, self.rpps, signature, data)
        return signature


class CardDecrypter(_CardKey):
    """A `Decrypter` (smime/keys.py) for an account: the key 0x82 of whichever reader holds its card."""

    @property
    def certificate(self) -> x509.Certificate:
        return self._keys._session_for(self.account, self.rpps).decrypter().certificate

    async def decrypt_key(self, encrypted_key: bytes, *, padding: KeyTransportPadding = "pkcs1v15",
                          oaep_hash: OaepHashName = "sha256") -> bytes:
        session, key = await self._run(
            lambda s: s.decrypter().decrypt_key(encrypted_key, padding=padding, oaep_hash=oaep_hash))
        if session.cached_status.rpps != self.rpps:
            raise CardUnavailable(self.account, self.rpps, f"another card was put in reader {session.reader}")
        return key


def _check_signature(status: CardStatus, account: str, rpps: str, signature: bytes, data: bytes) -> None:
    """A card swapped during the operation would sign with another practitioner's key: check the signature
    against the certificate the card had (cheap next to the card's own RSA) and hold if it does not match."""
    cert = status.sign_certificate
    public = cert.public_key() if cert is not None else None
    if status.rpps != rpps or not isinstance(public, rsa.RSAPublicKey):
        raise CardUnavailable(account, rpps, f"another card was put in reader {status.reader}")
    try:
        public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    except Exception as exc:
        raise CardUnavailable(account, rpps, f"the card in {status.reader} changed during the signature") from exc


async def _refresh(session: CardSession) -> CardStatus:
    """The card's state now; a PC/SC failure reads as "no card" (logged), never as an exception."""
    try:
        return await session.status()
    except CardError as exc:
        log.warning("reader %s: %s", session.reader, exc)
        return CardStatus(reader=session.reader, present=False)


async def _close(session: CardSession, *, reset: bool) -> None:
    try:
        await session.close(reset=reset)
    except CardError as exc:
        log.warning("reader %s: closing: %s", session.reader, exc)


def _list_readers() -> list[str]:
    with PcscContext() as context:
        return context.readers()
