"""The outbound relay client: one queued message to the next hop, answered per recipient (RFC 5321 §3.3, §4.5.4).

TLS is required, never opportunistic: a peer that does not offer STARTTLS (RFC 3207) gets nothing, the peer's
certificate must chain to the configured trust anchors (IGC-Santé in production, mssante.md §1.2) and carry the
hop's host name (RFC 6125 via OpenSSL's check), and our own certificate is presented as a TLS client
certificate, since MSSanté operators authenticate each other by certificate. On TLS 1.2 only the MSSanté suites
are offered (gateway/tls.py). The name checked for an MX-derived hop is the MX host's, which unsigned DNS
supplies: what binds it to the recipient's domain is that only the trust space's CA issues the certificate;
checking the peer certificate's DN against the whitelist entry of the domain (mssante.md §1.3) would bind it
more tightly.

The SMTP dialogue uses aiosmtplib rather than a client of our own: it already does reply parsing (multi-line,
RFC 5321 §4.2.1), dot-stuffing (§4.5.2), STARTTLS on the open transport with RFC 3207 §4.2's discard of
pre-TLS state and buffered bytes, and per-command timeouts. What is ours, and lives here, is the policy:
which hop to try next, TLS required, and the mapping of every outcome to a per-recipient reply.

Sessions are reused (gateway.relay_sessions): a handshake per message cost more than a small message's
transaction. A reused session that turns out dead at MAIL, before any recipient, is replaced by a new one,
which cannot duplicate anything; once a recipient is accepted, a failure is answered per recipient as above.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from gateway.errors import GatewayError, SmtpReplyError
from gateway.nexthop import Hop, NextHopError, NextHopResolver
from gateway.relay_sessions import PeerSession, RelayLimiter, SessionCache
from gateway.tls import MSSANTE_TLS12_CIPHERS, TLSSetupError

__all__ = ["BadRecipientAddress", "ConnectFailed", "ConnectionLost", "OutboundRelay", "PeerUnusable", "RelayConfigError",
           "RelayError", "RelayLimiter", "RelayTLSContext", "TlsFailed", "TlsRequired", "answers_for",
           "client_tls_context", "relay"]

log = logging.getLogger(__name__)

Reply = tuple[int, str]

#: RFC 5321 §4.5.3.2.6: wait at least 10 minutes for the reply to the final dot.
DATA_END_TIMEOUT = 600.0
#: The answer to MAIL on a session taken from the cache: past this, the session is taken for dead.
REUSED_MAIL_TIMEOUT = 30.0


class RelayTLSContext(ssl.SSLContext):
    """A verifying client context that also carries `chain_only`, its twin without the host-name check.

    A static route written as an address (`[192.0.2.1]:25`) has no name to check: the operator chose the
    address, and a peer's IGC-Santé certificate names its host, not its address, so only the chain is checked
    there. Python sets `check_hostname` per context, not per connection, hence the twin.
    """

    chain_only: ssl.SSLContext | None = None


def _tls_context(cls: type[ssl.SSLContext], cert: Path, key: Path, ca: Path, *, check_hostname: bool) -> ssl.SSLContext:
    ctx = cls(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(MSSANTE_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError(f"cannot load the relay trust anchors {ca}: {exc}") from exc
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError(f"cannot load the relay client certificate {cert} / key {key}: {exc}") from exc
    return ctx


def client_tls_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """The relay's TLS client context: TLS 1.2+ (MSSanté suites on 1.2), peers verified against `ca` with their
    host name, `cert` (leaf, then its chain) and `key` presented as our client certificate."""
    ctx = _tls_context(RelayTLSContext, cert, key, ca, check_hostname=True)
    assert isinstance(ctx, RelayTLSContext)
    ctx.chain_only = _tls_context(ssl.SSLContext, cert, key, ca, check_hostname=False)
    return ctx


class RelayError(SmtpReplyError):
    """A hop could not be used; the text names the hop. All of these are transient: another hop or a later
    attempt may work."""

    def __init__(self, hop: Hop, detail: str, *, cause: str | None = None) -> None:
        self.hop = hop
        super().__init__(f"{self.text}: {hop}: {detail}", cause=cause or detail)


class ConnectFailed(RelayError):
    code = 451
    enhanced = "4.4.1"  # RFC 3463: no answer from host
    text = "Cannot connect to the next hop"


class TlsRequired(RelayError):
    code = 451
    enhanced = "4.7.0"
    text = "TLS required"


class TlsFailed(RelayError):
    code = 451
    enhanced = "4.7.5"  # RFC 3463: cryptographic failure
    text = "TLS with the next hop failed"


class ConnectionLost(RelayError):
    code = 451
    enhanced = "4.4.2"  # RFC 3463: bad connection
    text = "Connection to the next hop lost"


class PeerUnusable(RelayError):
    """The peer refused the session itself (greeting, EHLO, STARTTLS). Like Postfix's smtp_skip_5xx_greeting,
    even a 5xx there only means "try another hop": it says nothing about the recipients."""

    code = 451
    enhanced = "4.4.0"
    text = "The next hop refused the session"


class RelayConfigError(GatewayError):
    """The relay was called with arguments it cannot honour (a programming or configuration error)."""


def _peer_reply(code: int, message: str) -> Reply:
    """A peer's reply as (code, text with an enhanced code): the peer's own, else the class's X.0.0 (RFC 3463)."""
    text = " ".join(message.split())
    first = text.split(" ", 1)[0]
    parts = first.split(".")
    if not (len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] in "245"):
        text = f"{code // 100}.0.0 {text}".rstrip()
    return code, text


def _error_reply(exc: SmtpReplyError) -> Reply:
    return exc.code, f"{exc.enhanced} {exc.text}"


class _NextHop(Exception):
    """Internal: this hop gave nothing to any recipient; try the next one with `error` as the answer so far."""

    def __init__(self, error: Reply) -> None:
        self.error = error


def _context_for(hop: Hop, tls: ssl.SSLContext) -> tuple[ssl.SSLContext, str]:
    """The context and the server_hostname for `hop`: the name checked, except on an address route."""
    if hop.is_address_literal and isinstance(tls, RelayTLSContext) and tls.chain_only is not None:
        return tls.chain_only, hop.host
    # A plain context on an address route still checks the address against the certificate's IP SANs
    # (stricter, never weaker).
    return tls, hop.host


async def relay(message: bytes, sender: str, recipients: Sequence[str], hops: Sequence[Hop], *,
                tls: ssl.SSLContext, helo: str, timeout: float = 120,
                sessions: SessionCache | None = None) -> dict[str, Reply]:
    """Send `message` to `recipients` through the first usable hop; every recipient gets an answer.

    The next hop is tried (RFC 5321 §5.1) only while no recipient has been accepted: when a hop cannot be
    reached, does not offer or complete TLS, refuses the session, or answers 4xx to MAIL or to every RCPT.
    Once a recipient is accepted the session's outcome is final for this attempt: the answer to the final
    dot applies to every accepted recipient (§4.5.4; §3.3 for one DATA per transaction), and a connection
    lost before that answer leaves them transient (4.4.2), never delivered. With `sessions`, a hop's idle
    session is reused when there is one, and a session that ended its transaction cleanly is kept for the
    next message (gateway.relay_sessions).
    """
    if tls.verify_mode != ssl.CERT_REQUIRED or not tls.check_hostname:
        raise RelayConfigError("the relay needs a verifying TLS context (CERT_REQUIRED, check_hostname)")
    if not hops:
        raise RelayConfigError("no hop to relay to")
    results: dict[str, Reply] = {}
    pending = list(dict.fromkeys(recipients))
    if not pending:
        return results
    last: Reply | None = None
    for hop in hops:
        try:
            answers, accepted = await _session(hop, message, sender, pending, tls=tls, helo=helo, timeout=timeout,
                                               sessions=sessions)
        except _NextHop as skip:
            last = skip.error
            log.info("relay: hop %s unusable (%d %s), %d recipient(s) pending", hop, *skip.error, len(pending))
            continue
        except Exception:
            # A bug of ours, not an answer of the peer: transient, no further hop (the peer may hold a copy).
            log.exception("relay: unexpected error with hop %s", hop)
            last = _error_reply(SmtpReplyError())
            break
        retry = [r for r in pending if 400 <= answers[r][0] < 500]
        if accepted or not retry:
            results.update(answers)
            pending = []
            break
        # Nothing accepted, some refused temporarily: keep the permanent answers, try those elsewhere.
        for rcpt in pending:
            if rcpt not in retry:
                results[rcpt] = answers[rcpt]
        pending = retry
        last = answers[retry[0]]
    if pending:
        assert last is not None
        for rcpt in pending:
            results[rcpt] = last
    return results


class _Stale(Exception):
    """Internal: a cached session was found dead (or closing) at MAIL, before it carried anything."""


async def _session(hop: Hop, message: bytes, sender: str, recipients: Sequence[str], *, tls: ssl.SSLContext,
                   helo: str, timeout: float, sessions: SessionCache | None) -> tuple[dict[str, Reply], bool]:
    """One SMTP transaction with `hop`, on a cached session or a new one: the answers, and whether any RCPT was
    accepted (after which the outcome is final for this attempt). Raises `_NextHop` when nothing was said about
    any recipient."""
    cached = sessions.take(hop) if sessions is not None else None
    if cached is not None:
        try:
            return await _use(cached, message, sender, recipients, timeout, sessions, reused=True)
        except _Stale as stale:
            # The peer closed it while it was idle (its own idle timeout, a restart): nothing was sent, so a
            # new session is no duplicate.
            log.info("relay: idle session with %s closed by the peer (%s); opening a new one", hop, stale)
    ctx, server_hostname = _context_for(hop, tls)
    session = await _open(hop, ctx, server_hostname, helo, timeout)
    return await _use(session, message, sender, recipients, timeout, sessions, reused=False)


async def _use(session: PeerSession, message: bytes, sender: str, recipients: Sequence[str], timeout: float,
               sessions: SessionCache | None, *, reused: bool) -> tuple[dict[str, Reply], bool]:
    """Run one transaction on `session`; then keep it (clean end, cache given) or close it."""
    clean = False
    try:
        answers, accepted, clean = await _transaction(session, message, sender, recipients, timeout, reused=reused)
        return answers, accepted
    finally:
        if clean and sessions is not None:
            sessions.give_back(session)
        else:
            await _close_politely(session, timeout)


async def _open(hop: Hop, ctx: ssl.SSLContext, server_hostname: str, helo: str, timeout: float) -> PeerSession:
    """Connection, greeting, EHLO, STARTTLS, EHLO again (RFC 3207 §4.2): any failure here → next hop."""
    smtp = aiosmtplib.SMTP(hostname=hop.connect_to, port=hop.port, local_hostname=helo, timeout=timeout,
                           use_tls=False, start_tls=False)
    try:
        await smtp.connect()
    except aiosmtplib.SMTPConnectResponseError as exc:
        smtp.close()
        raise _NextHop(_error_reply(PeerUnusable(hop, f"greeting {exc.code} {exc.message}"))) from exc
    except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPTimeoutError, OSError) as exc:
        smtp.close()
        raise _NextHop(_error_reply(ConnectFailed(hop, str(exc)))) from exc
    session = PeerSession(hop, smtp)
    negotiating = False
    try:
        await smtp.ehlo()
        if not smtp.supports_extension("starttls"):
            raise _NextHop(_error_reply(TlsRequired(hop, "the peer does not offer STARTTLS")))
        negotiating = True
        await smtp.starttls(tls_context=ctx, server_hostname=server_hostname)
        # With TLS 1.3 a peer refusing our certificate says so only after our side of the handshake is done:
        # the first EHLO over TLS still counts as negotiation.
        await smtp.ehlo()
    except _NextHop:
        await _close_politely(session, timeout)
        raise
    except ssl.SSLCertVerificationError as exc:
        session.abort()
        raise _NextHop(_error_reply(TlsFailed(hop, f"certificate not accepted: {exc.verify_message}"))) from exc
    except ssl.SSLError as exc:
        session.abort()
        raise _NextHop(_error_reply(TlsFailed(hop, exc.reason or str(exc)))) from exc
    except aiosmtplib.SMTPResponseException as exc:
        await _close_politely(session, timeout)
        raise _NextHop(_error_reply(PeerUnusable(hop, f"{exc.code} {exc.message}"))) from exc
    except (aiosmtplib.SMTPException, OSError) as exc:
        session.abort()
        if negotiating:
            raise _NextHop(_error_reply(TlsFailed(hop, f"connection closed during TLS negotiation: {exc}"))) from exc
        raise _NextHop(_error_reply(ConnectionLost(hop, str(exc)))) from exc
    except BaseException:
        session.abort()
        raise
    _log_tls(smtp, hop)
    return session


async def _close_politely(session: PeerSession, timeout: float) -> None:
    if session.usable:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await session.smtp.quit(timeout=min(timeout, 10))
    session.abort()


async def _transaction(session: PeerSession, message: bytes, sender: str, recipients: Sequence[str],
                       timeout: float, *, reused: bool) -> tuple[dict[str, Reply], bool, bool]:
    """MAIL, RCPT..., DATA on an open session: (answers, whether any RCPT was accepted, whether the session
    ended in a known state and may carry another transaction)."""
    smtp, hop = session.smtp, session.hop
    options = []
    if smtp.supports_extension("size"):
        options.append(f"SIZE={len(message)}")  # RFC 1870 §6
    if smtp.supports_extension("8bitmime") and not message.isascii():
        options.append("BODY=8BITMIME")  # RFC 6152 §3
    encoding = "ascii"
    answers: dict[str, Reply] = {}
    if not all(a.isascii() for a in (sender, *recipients)):
        if smtp.supports_extension("smtputf8"):
            options.append("SMTPUTF8")  # RFC 6531 §3.4
            encoding = "utf-8"
        else:
            # RFC 6531 §3.2: without SMTPUTF8 at the peer, a non-ASCII address cannot be sent (X.6.7, §3.5).
            refused = (553, f"5.6.7 The next hop {hop} does not support internationalised addresses (SMTPUTF8)")
            if not sender.isascii():
                return dict.fromkeys(recipients, refused), False, True
            answers = {r: refused for r in recipients if not r.isascii()}
            recipients = [r for r in recipients if r.isascii()]
            if not recipients:
                return answers, False, True
    try:
        # A reused session the peer silently lost would hold MAIL for the whole timeout: a shorter one there.
        await smtp.mail(sender, options=options, encoding=encoding,
                        timeout=min(timeout, REUSED_MAIL_TIMEOUT) if reused else timeout)
    except aiosmtplib.SMTPSenderRefused as exc:
        if reused and exc.code == 421:
            raise _Stale(f"{exc.code} {exc.message}") from exc  # RFC 5321 §3.8: the peer is closing the session
        reply = _peer_reply(exc.code, exc.message)
        if 400 <= exc.code < 500:
            raise _NextHop(reply) from exc
        return {**answers, **dict.fromkeys(recipients, reply)}, False, True
    except (aiosmtplib.SMTPException, OSError) as exc:
        if reused:
            raise _Stale(str(exc)) from exc
        raise _NextHop(_error_reply(ConnectionLost(hop, str(exc)))) from exc

    accepted: list[str] = []
    for rcpt in recipients:
        try:
            response = await smtp.rcpt(rcpt, encoding=encoding)
        except aiosmtplib.SMTPRecipientRefused as exc:
            answers[rcpt] = _peer_reply(exc.code, exc.message)
            continue
        except (aiosmtplib.SMTPException, OSError) as exc:
            lost = _error_reply(ConnectionLost(hop, f"during RCPT: {exc}"))
            if not accepted:
                raise _NextHop(lost) from exc
            # Accepted ones included: without the answer to the final dot nothing was delivered.
            every = [*answers, *(r for r in recipients if r not in answers)]
            return {r: answers[r] if r in answers and r not in accepted else lost for r in every}, True, False
        answers[rcpt] = _peer_reply(response.code, response.message)
        accepted.append(rcpt)
    if not accepted:
        return answers, False, await _reset(smtp)

    clean = True
    try:
        response = await smtp.data(message, timeout=max(timeout, DATA_END_TIMEOUT))
    except aiosmtplib.SMTPDataError as exc:
        final = _peer_reply(exc.code, exc.message)
    except (aiosmtplib.SMTPException, OSError) as exc:
        # Lost before the answer to the final dot: the peer may or may not have the message, so it is not
        # delivered; a retry may duplicate it, which RFC 5321 §6.1 prefers to losing it.
        final = _error_reply(ConnectionLost(hop, f"during DATA, delivery not confirmed: {exc}"))
        clean = False
    else:
        final = _peer_reply(response.code, response.message)
    log.info("relay: %s answered %d to DATA for %d recipient(s)%s", hop, final[0], len(accepted),
             " (session reused)" if reused else "")
    for rcpt in accepted:
        answers[rcpt] = final
    return answers, True, clean


async def _reset(smtp: aiosmtplib.SMTP) -> bool:
    """RSET after a transaction that carried no data (RFC 5321 §4.1.1.5): whether the session is clean again."""
    try:
        await smtp.rset()
    except (aiosmtplib.SMTPException, OSError):
        return False
    return True


def _log_tls(smtp: aiosmtplib.SMTP, hop: Hop) -> None:
    ssl_object = smtp.get_transport_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject):
        return
    der = ssl_object.getpeercert(binary_form=True)
    fingerprint = hashlib.sha256(der).hexdigest() if der else "none"
    log.info("relay: TLS with %s: %s %s, peer certificate sha256 %s", hop, ssl_object.version(),
             (ssl_object.cipher() or ("?",))[0], fingerprint)


def answers_for(recipients: Sequence[str], error: SmtpReplyError) -> dict[str, Reply]:
    """The same answer for every recipient, from one of our typed errors (e.g. a `NextHopError`)."""
    return dict.fromkeys(recipients, _error_reply(error))


class BadRecipientAddress(SmtpReplyError):
    code = 553
    enhanced = "5.1.3"  # RFC 3463: bad destination mailbox address syntax
    text = "Recipient address has no domain"


@dataclass(frozen=True, slots=True)
class OutboundRelay:
    """One message to all its recipients: grouped by domain (RFC 5321 §5.1 resolves per domain), each domain's
    next hops resolved, then relayed under that domain's limiter slot, on a cached session to the hop when
    `sessions` keeps one. Domains are served concurrently."""

    resolver: NextHopResolver
    limiter: RelayLimiter
    tls: ssl.SSLContext
    helo: str
    timeout: float = 120
    sessions: SessionCache | None = None

    async def close(self) -> None:
        """End the idle sessions (gateway shutdown)."""
        if self.sessions is not None:
            await self.sessions.aclose()

    async def send(self, message: bytes, sender: str, recipients: Sequence[str]) -> dict[str, Reply]:
        by_domain: dict[str, list[str]] = {}
        results: dict[str, Reply] = {}
        for rcpt in dict.fromkeys(recipients):
            local, at, domain = rcpt.rpartition("@")
            if not at or not local or not domain:
                results.update(answers_for([rcpt], BadRecipientAddress()))
                continue
            by_domain.setdefault(domain.lower().rstrip("."), []).append(rcpt)
        for answers in await asyncio.gather(*(self._send_domain(d, message, sender, rcpts)
                                              for d, rcpts in by_domain.items())):
            results.update(answers)
        return results

    async def _send_domain(self, domain: str, message: bytes, sender: str, recipients: list[str]
                           ) -> dict[str, Reply]:
        try:
            hops = await self.resolver.resolve(domain)  # outside the slot: a slow DNS holds no session
        except NextHopError as exc:
            log.info("relay: no next hop for %s: %s (%s)", domain, exc.reply(), exc.cause)
            return answers_for(recipients, exc)
        async with self.limiter.slot(domain):
            return await relay(message, sender, recipients, hops, tls=self.tls, helo=self.helo, timeout=self.timeout,
                               sessions=self.sessions)
