"""What the worker does with one queued message (DESIGN.md, flows 1 and 2).

Submitted mail: local recipients get it as it is, over LMTP (it never left this gateway);
recipients of other gateways get it signed with the sender's key and encrypted to each of
them and to the sender (smime.sign_and_encrypt), relayed over mutually authenticated TLS.
Inbound mail: decrypted with the recipient's key, verified, marked (gateway.inbound_security),
then delivered over LMTP; a message that cannot be opened is still delivered, marked.

Keys are organisation key files for now; CPS cards plug in through the same `Signer` /
`Decrypter` protocols (smime/keys.py) when the card worker is wired.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from config.schema import GatewayConfig, SmimeConfig
from directory_sync.errors import DirectoryError
from directory_sync.lookup import DirectoryLookup
from gateway.cards import CardKeys, HoldForCard
from gateway.dsn import RecipientStatus, build_dsn
from gateway.inbound_security import InboundResult, secure_inbound
from gateway.lmtp import LmtpError, LmtpPool
from gateway.mdn import build_mdn, mdn_requested
from gateway.relay import OutboundRelay
from gateway.spool import (
    MAX_QUEUE_LIFETIME,
    Incoming,
    QueuedMessage,
    RecipientResult,
    new_queue_id,
)
from smime.certpath import TrustStore
from smime.errors import SenderMismatch, SmimeError
from smime.filekeys import FileKey
from smime.keys import Decrypter, Signer
from smime.limits import limits_from_config
from smime.message import sign_and_encrypt
from smime.mime import split_header_body
from smime.verify import AsyncIdentityCheck, match_from_address

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The private keys of local accounts, by account address."""

    keys: dict[str, FileKey]

    @classmethod
    def load(cls, cfg: SmimeConfig | None) -> KeyRing:
        """Read the configured key files (blocking: call from a thread)."""
        keys: dict[str, FileKey] = {}
        for entry in cfg.keys if cfg is not None else ():
            keys[entry.account.lower()] = FileKey.from_pem(Path(entry.key).read_bytes(), Path(entry.cert).read_bytes())
        return cls(keys)

    def key_for(self, account: str | None) -> FileKey | None:
        return self.keys.get(account.lower()) if account else None


class AccountKeys:
    """Which key signs and decrypts for an account: its CPS card when it is bound to one, else its key file."""

    def __init__(self, files: KeyRing, cards: CardKeys | None = None) -> None:
        self._files = files
        self._cards = cards

    def has_key(self, account: str | None) -> bool:
        return self._files.key_for(account) is not None or (self._cards is not None and self._cards.binds(account))

    def signing(self, account: str) -> tuple[Signer, x509.Certificate, tuple[x509.Certificate, ...]]:
        """The signer, the account's own encryption certificate and the chain to send. A card's
        certificates are read from the card: an absent or locked card raises what `hold_reason` knows."""
        if self._cards is not None and self._cards.binds(account):
            return self._cards.signer_for(account), self._cards.decrypter_for(account).certificate, ()
        key = self._files.key_for(account)
        if key is None:
            raise LookupError(account)
        return key, key.certificate, key.chain

    def decrypter(self, account: str) -> Decrypter | None:
        if self._cards is not None and self._cards.binds(account):
            return self._cards.decrypter_for(account)
        return self._files.key_for(account)

    @staticmethod
    def hold(account: str, exc: BaseException) -> HoldForCard | None:
        """The hold signal for an error that means "the card is not there or not unlocked", else None."""
        reason = CardKeys.hold_reason(exc)
        return HoldForCard(account, reason) if reason is not None else None


def load_trust(cfg: SmimeConfig | None) -> TrustStore | None:
    """The trust anchors and CRLs (blocking: call from a thread)."""
    if cfg is None:
        return None
    crls = cfg.crls.read_bytes() if cfg.crls is not None else b""
    return TrustStore.from_pem(cfg.trust_anchors.read_bytes(), crls)


# Opens an inbound message for a recipient whose key is a key file somewhere else than on the event loop
# (gateway.inbound_workers.InboundWorkers.open): what secure_inbound would return.
OpenElsewhere = Callable[[bytes, str], Awaitable[InboundResult]]

# Queues a message the gateway writes itself (an MDN), for the worker to sign, encrypt and relay.
Submit = Callable[[Incoming], Awaitable[None]]
# holds(address, queue id): whether the mailbox already has the copy of a delivery a crash interrupted
# (gateway.redelivery.DoveadmCopies.holds).
HasCopy = Callable[[str, str], Awaitable[bool]]


class Pipeline:
    def __init__(self, cfg: GatewayConfig, lmtp: LmtpPool, *, relay: OutboundRelay | None = None,
                 keys: AccountKeys | None = None, directory: DirectoryLookup | None = None,
                 trust: TrustStore | None = None, submit: Submit | None = None, has_copy: HasCopy | None = None,
                 open_elsewhere: OpenElsewhere | None = None) -> None:
        self._cfg = cfg
        self._lmtp = lmtp
        self._relay = relay
        self._keys = keys or AccountKeys(KeyRing({}))
        self._directory = directory
        self._trust = trust
        self._submit = submit
        self._has_copy = has_copy
        self._open_elsewhere = open_elsewhere
        self._identity = signer_identity(directory)
        self._parse_limits = limits_from_config(cfg.limits)
        self._plain_domains = frozenset(d.lower().rstrip(".") for d in cfg.relay.plain_domains)

    async def process(self, msg: QueuedMessage, data: bytes) -> list[RecipientResult]:
        if msg.direction == "inbound":
            return await self._inbound(msg, data)
        local = [r for r in msg.pending if self._cfg.is_local_domain(_domain(r))]
        plain = [r for r in msg.pending if r not in local and _domain(r) in self._plain_domains]
        secure = [r for r in msg.pending if r not in local and r not in plain]
        results: list[RecipientResult] = []
        if secure:  # first: a card that is not there holds the whole message before any copy is delivered
            results += await self._outbound(msg, secure, data)
        if plain:
            results += await self._relay_plain(msg, plain, data)
        if local:
            results += await self._to_mailboxes(msg.sender, local, data, msg)
        return results

    async def _to_mailboxes(self, sender: str, recipients: Sequence[str], data: bytes,
                            msg: QueuedMessage | None = None) -> list[RecipientResult]:
        if msg is not None and msg.interrupted and self._has_copy is not None:
            there = [r for r in recipients if await self._has_copy(r, msg.id)]
            if there:  # delivered just before a crash, its result never recorded (gateway/redelivery.py)
                rest = [r for r in recipients if r not in there]
                return [RecipientResult(r, "done", "250 2.0.0 Already in the mailbox (delivered before a restart)")
                        for r in there] + (await self._to_mailboxes(sender, rest, data) if rest else [])
        try:
            replies = await self._lmtp.deliver(sender, recipients, data)
        except (LmtpError, OSError) as exc:
            return [RecipientResult(r, "retry", f"451 4.4.1 {exc}") for r in recipients]
        return [_result(r, replies[r].code, " ".join(p for p in (replies[r].enhanced, replies[r].text) if p))
                for r in recipients]

    async def _relay_plain(self, msg: QueuedMessage, recipients: list[str], data: bytes) -> list[RecipientResult]:
        """Relay as submitted, neither signed nor encrypted: only to the domains the configuration names in
        `relay.plain_domains` (benchmarks and tests; MSSanté wants S/MIME between gateways)."""
        if self._relay is None:
            return [RecipientResult(r, "failed", "554 5.7.1 Cannot send to another gateway: no relay configured")
                    for r in recipients]
        replies = await self._relay.send(data, msg.sender, recipients)
        return [_result(r, *replies[r]) for r in recipients]

    async def _outbound(self, msg: QueuedMessage, recipients: list[str], data: bytes) -> list[RecipientResult]:
        account = msg.account or ""
        if self._relay is None or self._directory is None or not self._keys.has_key(account):
            why = "no relay configured" if self._relay is None else "no directory" if self._directory is None \
                else f"no signing key for account {account}"
            return [RecipientResult(r, "failed", f"554 5.7.1 Cannot send to another gateway: {why}")
                    for r in recipients]
        results: list[RecipientResult] = []
        certificates: list[x509.Certificate] = []
        sendable: list[str] = []
        for rcpt in recipients:
            try:
                entry = await self._directory.lookup(rcpt)
            except DirectoryError as exc:
                results.append(RecipientResult(rcpt, "retry", f"451 4.4.3 Directory unavailable: {exc}"))
                continue
            certs = [recipient_certificate(c.der) for c in entry.certificates] if entry else []
            if not certs:
                results.append(RecipientResult(rcpt, "failed",
                                               "550 5.7.1 No usable encryption certificate in the directory"))
                continue
            certificates += certs
            sendable.append(rcpt)
        if not sendable:
            return results
        try:
            signer, own_certificate, chain = self._keys.signing(account)
            sealed = await sign_and_encrypt(data, signer, certificates, sender_encryption_certificate=own_certificate,
                                            chain=chain, limits=self._parse_limits)
        except Exception as exc:
            hold = self._keys.hold(account, exc)
            if hold is not None:
                raise hold from exc
            if not isinstance(exc, SmimeError):
                raise
            log.error("cannot sign and encrypt: %s", exc)
            return results + [RecipientResult(r, "failed", f"554 5.7.0 Cannot sign and encrypt: {exc}")
                              for r in sendable]
        replies = await self._relay.send(sealed, msg.sender, sendable)
        return results + [_result(r, *replies[r]) for r in sendable]

    async def _inbound(self, msg: QueuedMessage, data: bytes) -> list[RecipientResult]:
        """Open and deliver for each pending recipient, with the recipient's own key.

        Each recipient is delivered as soon as it is opened, so when one of them cannot be served now (its card
        is absent or locked: a hold; the directory is unreachable) others may already have their copy. Those
        answers are kept: the message is recorded with them, and the recipients left get a transient answer, so
        that neither a later attempt nor a release after a hold delivers a second copy (or sends a second MDN)
        to the recipients already served. Only when nobody has been served yet does the error go up (a hold
        parks the whole message until the card is back)."""
        if self._trust is None:
            return [RecipientResult(r, "retry", "451 4.7.5 No trust anchors configured") for r in msg.pending]
        results: list[RecipientResult] = []
        for rcpt in msg.pending:
            try:
                results.append(await self._inbound_one(msg, rcpt, data, self._trust))
            except Exception as exc:
                if not any(r.state != "retry" for r in results):
                    raise
                hold = exc if isinstance(exc, HoldForCard) else None
                if hold is None:
                    log.warning("to=<%s> cannot be delivered now: %s", rcpt, exc)
                why = f"451 4.7.0 Waiting for the recipient's key: {hold.reason}" if hold is not None \
                    else f"451 4.3.0 Temporary local problem: {exc}"
                served = {r.address for r in results}
                return results + [RecipientResult(r, "retry", why) for r in msg.pending if r not in served]
        return results

    async def _inbound_one(self, msg: QueuedMessage, rcpt: str, data: bytes, trust: TrustStore) -> RecipientResult:
        try:
            decrypter = self._keys.decrypter(rcpt)
            if self._open_elsewhere is not None and isinstance(decrypter, FileKey):
                opened = await self._open_elsewhere(data, rcpt)  # off the event loop (gateway.inbound_workers)
            else:
                opened = await secure_inbound(data, recipient=rcpt, decrypter=decrypter, trust=trust,
                                              identity_check=self._identity, hostname=self._cfg.hostname,
                                              limits=self._parse_limits)
        except Exception as exc:
            hold = self._keys.hold(rcpt, exc)
            if hold is not None:
                raise hold from exc
            raise
        log.info("to=<%s> security verdict %s%s", rcpt, opened.verdict, f" ({opened.reason})" if opened.reason else "")
        if opened.transient:
            return RecipientResult(rcpt, "retry", f"451 4.7.5 {opened.reason}")
        [delivered] = await self._to_mailboxes(msg.sender, [rcpt], opened.message, msg)
        if delivered.state == "done":
            try:
                await self._acknowledge(msg, rcpt, data, opened)
            except Exception:  # the copy is delivered: a lost MDN must not bring a second one (RFC 8098 §2.1)
                log.exception("to=<%s> the MDN could not be queued", rcpt)
        return delivered

    async def _acknowledge(self, msg: QueuedMessage, rcpt: str, data: bytes, opened: InboundResult) -> None:
        """The MSSanté MDN (RFC 8098, mssante.md §1.7): `processed`, or its error form when the message could not be
        opened; sent from the recipient's account, so signed and encrypted like any mail, with a null sender."""
        # Only the header block decides (Disposition-Notification-To, and whether it is an MDN itself), and without
        # that field there is nothing to parse: parsing every delivered message cost about as much as opening it.
        header = split_header_body(data)[0]
        if not msg.sender or self._submit is None or not _ASKS_FOR_MDN.search(header):
            return
        to = mdn_requested(header + b"\r\n", return_path=msg.sender)
        if to is None:
            return
        error = (str(opened.error_code), opened.error_label or "") if opened.verdict == "failed" and \
            opened.error_code is not None else None
        mdn = await asyncio.to_thread(build_mdn, data, reporting_ua=self._cfg.hostname, final_recipient=rcpt,
                                      original_recipient=rcpt, error=error)
        await self._submit(Incoming(new_queue_id(), "", (to,), mdn, rcpt))
        log.info("MDN (%s) queued for <%s>", "error" if error else "processed", to)

    async def notify(self, msg: QueuedMessage, recipients: Sequence[RecipientResult], data: bytes,
                     action: str) -> None:
        """A failure or delay DSN (RFC 3464) straight into the sender's local mailbox, one status per recipient."""
        if msg.direction == "inbound" or not msg.sender or not self._cfg.is_local_domain(_domain(msg.sender)):
            return
        now = datetime.now(UTC)
        if action == "delayed":
            statuses = [RecipientStatus(r.address, "delayed", _status(r.reply, "4"), r.reply, last_attempt=now,
                                        will_retry_until=msg.created_at + MAX_QUEUE_LIFETIME) for r in recipients]
        else:
            statuses = [RecipientStatus(r.address, "failed", _status(r.reply, "5"), r.reply, last_attempt=now)
                        for r in recipients]
        dsn = await asyncio.to_thread(build_dsn, original=data, envelope_sender=msg.sender, queue_id=msg.id,
                                      reporting_mta=self._cfg.hostname, arrival=msg.created_at,
                                      recipients=statuses)
        replies = await self._lmtp.deliver("", [msg.sender], dsn)
        log.info("failure notice to <%s>: %s", msg.sender, replies[msg.sender].code)


# A Disposition-Notification-To field (RFC 8098 §2.1) at the start of a header line; WSP before the colon is the
# obsolete syntax of RFC 5322 §4.5.3, still read.
_ASKS_FOR_MDN = re.compile(rb"(?im)^disposition-notification-to[ \t]*:")


def signer_identity(directory: DirectoryLookup | None) -> AsyncIdentityCheck | None:
    """The identity hook of `secure_inbound`: the signer's RPPS number must own the From address in the directory
    (mssante.md §5, item 11); an organisation certificate (no RPPS) must carry the address itself (RFC 8550 §3).
    None without a directory (smime/'s default check then applies)."""
    if directory is None:
        return None

    async def check(cert: x509.Certificate, sender: str | None) -> str:
        rpps = _rpps_of(cert)
        if rpps is None:
            return match_from_address(cert, sender)
        if sender is None:
            raise SenderMismatch(None, "no From address to compare with the signer's RPPS number")
        entry = await directory.lookup(sender)
        owner = entry.rpps if entry is not None else None
        if owner != rpps:
            raise SenderMismatch(sender, f"the MSSanté directory gives {sender} to RPPS {owner or 'nobody'}, "
                                         f"the signer is RPPS {rpps}")
        return f"From {sender} belongs to RPPS {rpps} in the MSSanté directory"

    return check


@functools.lru_cache(maxsize=256)
def recipient_certificate(der: bytes) -> x509.Certificate:
    """A recipient's certificate from the directory, parsed once per distinct DER (kept for the 256 last): the
    same few certificates come back with every message to their owners. Keyed by the whole encoding, so a
    certificate changed in the directory is a new entry; a certificate is immutable, so sharing it is safe."""
    return x509.load_der_x509_certificate(der)


def _rpps_of(cert: x509.Certificate) -> str | None:
    """The RPPS number of a CPS certificate: its CN is `8` + the 11-digit RPPS (mssante.md §3.4)."""
    for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = str(attr.value)
        if len(value) == 12 and value.startswith("8") and value.isdigit():
            return value[1:]
    return None


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _result(rcpt: str, code: int, text: str) -> RecipientResult:
    state = "done" if 200 <= code < 300 else "retry" if code < 500 else "failed"
    return RecipientResult(rcpt, state, f"{code} {text}")  # type: ignore[arg-type]


def _status(reply: str, klass: str) -> str:
    """The RFC 3463 status for a DSN of class `klass` ("5" failed, "4" delayed): the reply's own when it is of
    that class, else 5.4.7 (delivery time expired) for a failure, 4.4.7 (message delayed) for a delay."""
    parts = reply.split()
    if len(parts) > 1 and parts[1][:1] == klass and parts[1].count(".") == 2:
        return parts[1]
    return "5.4.7" if klass == "5" else "4.4.7"
