"""SMTP submission (RFC 6409) for mail clients and practice software.

STARTTLS before MAIL (RFC 3207), AUTH PLAIN/LOGIN only over TLS (RFC 4954), TLS 1.2+.
MAIL FROM must be the authenticated account's own address; each RCPT must be a local
mailbox (the directory relay comes with the secure-relay issue). DATA is refused when it
holds a bare CR or LF (SMTP smuggling; RFC 5321 §2.3.8), and otherwise written durably to
the spool before `250`. The receiver never touches a key: signing happens after the queue.

aiosmtpd gives the protocol; this module adds the policy, an asynchronous password check
(Argon2 runs in a thread, never on the loop) with limits per connection, client address and
login (gateway/auth_throttle.py), RFC 3463 enhanced status codes on aiosmtpd's stock replies,
and, in `GatewaySMTP` (the base of both listeners), the defences against hostile clients and
the resource limits of `[limits]` (what a client sends is read by gateway/smtp_input.py).
"""

from __future__ import annotations

import asyncio
import collections
import email.parser
import email.policy
import email.utils
import logging
import re
import secrets
import ssl
import unicodedata
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session, TLSSetupException, syntax

from config.schema import GatewayConfig
from directory_sync.errors import DirectoryError
from directory_sync.lookup import DirectoryLookup
from directory_sync.whitelist import TrustSpace
from gateway.accounts import AccountStore
from gateway.addresses import AddressError, Mailbox, parse_mailbox
from gateway.auth_throttle import AuthThrottle
from gateway.logsetup import conn_id, queue_id
from gateway.smtp_input import CommandLineError, DataReceiver, MemoryBudget, StrictLineReader
from gateway.spool import GroupCommitter, Incoming, QueuedMessage, new_queue_id

log = logging.getLogger(__name__)



class _DropLoginDataWarning(logging.Filter):
    """aiosmtpd sets its own deprecated Session.login_data after each AUTH and logs a warning each time."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Session.login_data is deprecated")


logging.getLogger("mail.log").addFilter(_DropLoginDataWarning())

_BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")

# aiosmtpd's own replies carry no enhanced status code (RFC 3463); these are what we send instead.
_STOCK_REPLIES = {
    "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
    "554 Command refused due to lack of security": "554 5.7.0 Command refused: TLS is required",
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long (RFC 5321 section 4.5.3.1.6)",
    "500 Command line too long": "500 5.5.2 Command line too long",
    "500 Error: bad syntax": "500 5.5.2 Syntax error",
    "503 Error: need MAIL command": "503 5.5.1 Send MAIL FROM first",
    "503 Error: need RCPT command": "503 5.5.1 Send RCPT TO first",
    "503 Error: nested MAIL command": "503 5.5.1 A MAIL FROM is already in progress",
    "503 Already authenticated": "503 5.5.1 Already authenticated",
    "454 TLS not available": "454 4.7.0 TLS not available",
    "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
    "221 Bye": "221 2.0.0 Bye",
    "250 OK": "250 2.0.0 OK",
    "501 Not enough value": "501 5.5.4 Syntax: AUTH mechanism [initial-response]",
    "501 Too many values": "501 5.5.4 Syntax: AUTH mechanism [initial-response]",
    "500 Error: strict ASCII mode": "500 5.6.7 Non-ASCII characters in a command are not accepted (no SMTPUTF8)",
    "501 Error: SMTPUTF8 disabled": "555 5.5.4 SMTPUTF8 is not offered by this server (RFC 6531)",
    "553 5.1.3 Error: malformed address": "553 5.1.3 Malformed address",
    "555 MAIL FROM parameters not recognized or not implemented": "555 5.5.4 MAIL FROM parameter not supported",
    "555 RCPT TO parameters not recognized or not implemented": "555 5.5.4 RCPT TO parameter not supported",
    "503 Error: send HELO first": "503 5.5.1 Send HELO or EHLO first",
    "503 Error: send EHLO first": "503 5.5.1 Send EHLO first",
    "501 Syntax: DATA": "501 5.5.4 Syntax: DATA (no argument)",
    "501 Syntax: STARTTLS": "501 5.5.4 Syntax: STARTTLS (no argument)",
}
# Calls of one command on one connection before `421 4.7.0` (a client looping on NOOP or VRFY).
# Practice software sends batches over one connection, so the mail commands get room.
_COMMAND_CALL_LIMITS = {"MAIL": 10_000, "RCPT": 100_000, "DATA": 10_000, "RSET": 10_000, "NOOP": 1_000, "*": 100}
_TOO_BIG = ("552 Error: Too much mail data", "552 Error: message size exceeds fixed maximum message size")
_UNKNOWN_COMMAND = re.compile(r'^500 Error: command "(.*)" not recognized$')


class ConnectionLimiter:
    """What the connections of one listener share: the cap on simultaneous connections (`limit`, and
    `limits.max_connections_per_address` from one client address), and the bytes of DATA they hold in memory
    (capped by `limits.max_buffered_data`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.by_address: collections.Counter[str] = collections.Counter()
        self.memory = MemoryBudget()

    def refusal(self, address: str, per_address: int) -> str | None:
        """The `421` for one connection too many, else None (and the connection is counted)."""
        if self.active >= self.limit:
            return "421 4.7.0 Too many connections, please try again later"
        if self.by_address[address] >= per_address:
            return "421 4.7.0 Too many connections from your address, please try again later"
        self.active += 1
        self.by_address[address] += 1
        return None

    def release(self, address: str) -> None:
        self.active -= 1
        self.by_address[address] -= 1
        if self.by_address[address] <= 0:
            del self.by_address[address]


@dataclass(frozen=True, slots=True)
class RemotePolicy:
    """What a RCPT for another gateway needs (issue 6, item 1): a directory mailbox of a trust-space
    domain with a usable encryption certificate, and a sender whose account has a signing key."""

    directory: DirectoryLookup
    trust_space: TrustSpace
    has_key: Callable[[str], bool]


class SubmissionHandler:
    """The policy of the submission port, as aiosmtpd handler hooks."""

    def __init__(self, cfg: GatewayConfig, accounts: AccountStore, spool: GroupCommitter,
                 on_queued: Callable[[QueuedMessage], None], *, remote: RemotePolicy | None = None) -> None:
        self._cfg = cfg
        self._accounts = accounts
        self._remote = remote
        self._spool = spool
        self._on_queued = on_queued

    async def check_login(self, login: bytes, password: bytes) -> str | None:
        """The account address for these credentials, or None (Argon2 in a thread)."""
        try:
            login_s, password_s = login.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            return None
        account = await asyncio.to_thread(self._accounts.authenticate, login_s, password_s)
        return None if account is None else account.address

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        account = str(session.auth_data)  # AUTH is required before MAIL: always set here
        if not address or address == "<>":
            return "553 5.7.1 A client cannot send with the null sender"
        try:
            sender = parse_mailbox(address)
        except AddressError as exc:
            return f"553 5.1.7 Bad sender address: {exc}"
        if str(sender) != account:
            log.info("MAIL FROM refused: %s is not the address of account %s", sender, account)
            return f"553 5.7.1 Sender address <{sender}> does not belong to your account"
        envelope.mail_from = str(sender)
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        rcpt = await check_recipient(self._cfg, self._accounts, envelope, address)
        if isinstance(rcpt, str):
            return rcpt
        if not self._cfg.is_local_domain(rcpt.domain):
            refusal = await self._check_remote(str(session.auth_data), str(rcpt), rcpt.domain)
            if refusal is not None:
                return refusal
        return add_recipient(envelope, rcpt, rcpt_options)

    async def _check_remote(self, account: str, rcpt: str, domain: str) -> str | None:
        """None when `rcpt` of another gateway may be written to, else the refusal (DESIGN.md flow 1)."""
        policy = self._remote
        if policy is None:
            return f"550 5.7.1 Relaying to {domain} is not allowed: this gateway delivers only to its own domains"
        if not policy.trust_space.is_trust_space_domain(domain):
            return f"550 5.7.1 {domain} is not in the MSSante trust space"
        if not policy.has_key(account):
            return "550 5.7.1 Your account has no signing key: it can write to local mailboxes only"
        try:
            entry = await policy.directory.lookup(rcpt)
        except DirectoryError as exc:
            log.warning("directory lookup failed: %s", exc)
            return "451 4.4.3 The MSSante directory cannot be read right now, please try again later"
        if entry is None:
            return f"550 5.1.1 <{rcpt}> is not in the MSSante directory"
        if not entry.certificates:
            return f"550 5.7.1 <{rcpt}> has no usable encryption certificate in the MSSante directory"
        return None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data: bytes = envelope.original_content or b""
        refusal = bare_cr_or_lf_refusal(data) or from_header_refusal(data, str(session.auth_data))
        if refusal is not None:
            return refusal
        qid = new_queue_id()
        message = received_header(session, self._cfg.hostname, qid, "ESMTPSA") + data
        return await queue_and_answer(self._spool, self._on_queued,
                                      Incoming(qid, str(envelope.mail_from), tuple(envelope.rcpt_tos), message,
                                               session.auth_data))

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # aiosmtpd closes the connection itself
            log.warning("TLS handshake with the client failed: %s", error.__cause__ or error)
            return "454 4.7.0 TLS negotiation failed"
        return session_error_reply(error)


async def check_recipient(cfg: GatewayConfig, accounts: AccountStore, envelope: Envelope,
                          address: str) -> Mailbox | str:
    """The RCPT address parsed (RFC 5321 §4.1.1.3), or the refusal: one recipient too many (§4.5.3.1.10),
    a malformed address, or a local address with no active mailbox. Other domains are the caller's policy."""
    if len(envelope.rcpt_tos) >= cfg.limits.max_recipients:
        return f"452 4.5.3 Too many recipients (at most {cfg.limits.max_recipients} per message)"
    try:
        rcpt = parse_mailbox(address)
    except AddressError as exc:
        return f"553 5.1.3 Bad recipient address: {exc}"
    if cfg.is_local_domain(rcpt.domain) and not await asyncio.to_thread(accounts.is_mailbox, str(rcpt)):
        return f"550 5.1.1 <{rcpt}>: no such mailbox here"
    return rcpt


def add_recipient(envelope: Envelope, rcpt: Mailbox, rcpt_options: list[str]) -> str:
    """Record an accepted recipient (once, however often it is given) and answer `250`."""
    if str(rcpt) not in envelope.rcpt_tos:
        envelope.rcpt_tos.append(str(rcpt))
        envelope.rcpt_options.extend(rcpt_options)
    return "250 2.1.5 Recipient OK"


def from_header_refusal(data: bytes, account: str) -> str | None:
    """The refusal of a message whose From (RFC 5322 §3.6.2) is not the account's own address, or None.

    The signature later made with the account's key vouches for the From a reader sees: it must
    be the account's (issue 6, item 1). Only the header block is parsed, never the body.
    """
    end = data.find(b"\r\n\r\n")
    header = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(
        data if end < 0 else data[: end + 4])
    try:
        values = header.get_all("From") or []
        addresses = [a.addr_spec for v in values for a in v.addresses]
    except (IndexError, ValueError, AttributeError):
        addresses = []
    if not values:
        return "550 5.6.0 The message has no From header (RFC 5322 section 3.6)"
    own = [a for a in addresses if _same_address(a, account)]
    if len(values) != 1 or len(addresses) != 1 or not own:
        shown = ", ".join(addresses) or "unreadable"
        return f"553 5.7.1 The From header ({shown[:100]}) must be your own address <{account}>"
    return None


def _same_address(address: str, account: str) -> bool:
    local, _, domain = address.rpartition("@")
    a_local, _, a_domain = account.rpartition("@")
    return local == a_local and domain.lower() == a_domain.lower()


def bare_cr_or_lf_refusal(data: bytes) -> str | None:
    """The refusal of DATA holding a bare CR or LF (SMTP smuggling, RFC 5321 §2.3.8), or None."""
    if _BARE_CR_OR_LF.search(data):
        log.warning("DATA refused: bare CR or LF")
        return "550 5.5.2 Message refused: bare CR or LF in the data (RFC 5321 section 2.3.8)"
    return None


def received_header(session: Session, by_host: str, qid: str, protocol: str, comment: str | None = None) -> bytes:
    """The trace field of RFC 5321 §4.4; `protocol` from the RFC 3848 registry (ESMTPSA, ESMTPS); `comment`
    (e.g. the TLS details, ASCII) goes between the from- and by-clauses, where §4.4's CFWS allows it."""
    peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
    helo = header_safe_host(session.host_name or "unknown")
    note = f"\r\n\t({comment})" if comment else ""
    header = (f"Received: from {helo} ([{peer}]){note}\r\n\tby {by_host} (mssgw) with {protocol}"
              f" id {qid};\r\n\t{email.utils.formatdate(localtime=False, usegmt=True)}\r\n")
    return header.encode("ascii")


def header_safe_host(name: str) -> str:
    """A host name a client or certificate supplied, reduced to host-name and address-literal characters."""
    return re.sub(r"[^A-Za-z0-9.\-\[\]:]", "?", name)[:255]


async def queue_and_answer(spool: GroupCommitter, on_queued: Callable[[QueuedMessage], None],
                           message: Incoming) -> str:
    """Make `message` durable, hand it on, and answer DATA: `250` only once it is in the spool."""
    try:
        queued = await spool.accept(message)
    except Exception:
        log.exception("the spool could not take the message")
        return "451 4.3.0 The message could not be queued; please try again later"
    queue_id.set(queued.id)
    log.info("queued: %d bytes, %d recipient(s)", len(message.data), len(message.recipients))
    on_queued(queued)
    return f"250 2.0.0 Ok: queued as {queued.id}"


def ascii_reply(text: str) -> str:
    """Reply text as SMTP carries it, in ASCII (RFC 5321 §4.2; aiosmtpd refuses to encode anything else):
    accents dropped ("MSSanté" → "MSSante"), any other non-ASCII character as "?"."""
    if text.isascii():
        return text
    folded = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return folded.encode("ascii", "replace").decode("ascii")


def session_error_reply(error: Exception) -> str:
    """An unexpected error: logged, never leaked (`451 4.3.0`)."""
    log.error("session error: %s: %s", type(error).__name__, error)
    return "451 4.3.0 Internal error, please try again later"


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with what every listener of the gateway has: STARTTLS required (RFC 3207), the
    connection cap, the idle timeout, the size limit and RFC 3463 enhanced codes on the stock replies, and
    the defences against hostile clients (docs/SECURITY.md):

    - a client that talks before the greeting (RFC 5321 §3.1) gets `554 5.5.0` and is disconnected;
    - a command line with a bare CR or LF is refused (`500 5.5.2`), overlong ones too (aiosmtpd, `500 5.5.2`);
    - commands pipelined after STARTTLS (RFC 3207 §4.2, the CVE-2011-0411 injection) are refused with the
      STARTTLS, and any plaintext that arrives while TLS starts is discarded;
    - after `limits.max_errors` error replies, `421 4.7.0` and the connection is closed; the connections
      of one listener and of one client address are capped (`421 4.7.0`);
    - DATA is read with bounded memory: past the size limit, a too-long line or the listener's memory budget,
      the rest is read and dropped, never kept, then `552 5.3.4`, `500 5.5.2` or `452 4.3.1`;
    - waiting for a command (`limits.idle_timeout`), for the next DATA line (`limits.data_timeout`) and for a
      whole DATA (`limits.max_data_duration`) are bounded; when one runs out the client gets `421 4.4.2`.
    """

    def __init__(self, handler: object, limiter: ConnectionLimiter, cfg: GatewayConfig,
                 tls_context: ssl.SSLContext, **options: Any) -> None:
        # aiosmtpd keeps these limits in a class-level dict that every EHLO raises; each connection gets its own.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(
            handler,
            hostname=cfg.hostname,
            ident="mssgw ESMTP",
            tls_context=tls_context,
            require_starttls=True,
            data_size_limit=cfg.limits.max_message_size,
            timeout=cfg.limits.idle_timeout,
            command_call_limit=_COMMAND_CALL_LIMITS,
            **options,
        )
        reader = StrictLineReader(limit=self.line_length_limit, loop=self.loop)
        self._stream_reader_wr = weakref.ref(reader)  # asyncio's StreamReaderProtocol reads into this one
        self._strong_reader = reader
        self._line_reader = reader
        self._limiter = limiter
        self._limits = cfg.limits
        self._max_message_size = cfg.limits.max_message_size
        self._counted = False
        self._refused = False
        self._address = ""
        self._closing = False
        self._errors = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # the first call; a second one follows STARTTLS
            peer = transport.get_extra_info("peername")
            self._address = str(peer[0]) if isinstance(peer, tuple) else str(peer)
            refusal = self._limiter.refusal(self._address, self._limits.max_connections_per_address)
            if refusal is not None:
                log.warning("connection from %s refused: %s", self._address, refusal[10:])
                self._refused = True
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(refusal.encode("ascii") + b"\r\n")
                transport.close()
                return
            self._counted = True
            conn_id.set(secrets.token_hex(4))
        elif self._line_reader.pending():
            log.warning("plaintext sent during the TLS handshake discarded (RFC 3207 section 4.2)")
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._counted:
            self._limiter.release(self._address)
            self._counted = False
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        """The greeting, unless the client spoke first (RFC 5321 §3.1: it waits for the greeting)."""
        if self._limits.greeting_delay > 0:
            await asyncio.sleep(self._limits.greeting_delay)
        if self._line_reader.pending():
            log.warning("client sent commands before the greeting: disconnected")
            await self._close_with("554 5.5.0 Protocol error: commands sent before the greeting (RFC 5321 section 3.1)")
            return
        await super()._handle_client()

    async def push(self, status: Any) -> None:
        if self._closing:
            return
        if isinstance(status, str):
            status = ascii_reply(self._enhance(status))
            if status[:1] in ("4", "5") and not status.startswith("421"):
                self._errors += 1
        await super().push(status)
        if self._errors >= self._limits.max_errors:
            log.warning("%d error replies on this connection: closing it", self._errors)
            await self._close_with("421 4.7.0 Too many errors on this connection, closing it")

    async def _close_with(self, reply: str) -> None:
        """Send a last reply and close; nothing the client sent after it is read or answered."""
        if self._closing:
            return
        await super().push(reply)
        self._closing = True
        self._line_reader.discard()
        if self.transport is not None:
            self.transport.close()

    def _timeout_cb(self) -> None:
        log.info("client timeout: closing the connection")
        if self.transport is not None and not self._closing:
            self._closing = True
            assert isinstance(self.transport, asyncio.WriteTransport)
            self.transport.write(b"421 4.4.2 Timeout waiting for the client, closing the connection\r\n")
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def _enhance(self, status: str) -> str:
        if status in _TOO_BIG:
            return f"552 5.3.4 Message too big: the limit is {self._max_message_size} bytes"
        m = _UNKNOWN_COMMAND.match(status)
        if m:
            return f"500 5.5.1 Command not recognised: {m.group(1)[:40]}"
        return _STOCK_REPLIES.get(status, status)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, CommandLineError):
            log.warning("command line refused: %s", error.reply)
            return error.reply
        reply: str = await super().handle_exception(error)
        return reply

    async def smtp_STARTTLS(self, arg: str) -> None:
        """Refused when commands follow it in the same write (RFC 3207 §4.2): they were sent in plaintext and
        would otherwise be read as if they came over TLS (the STARTTLS command injection, CVE-2011-0411)."""
        if self._tls_protocol is not None:  # RFC 3207 §4.2: no second TLS layer inside the first
            await self.push("554 5.5.1 TLS already active")
            return
        if self._line_reader.pending():
            log.warning("commands pipelined after STARTTLS: refused and disconnected")
            await self._close_with("554 5.5.0 Commands sent after STARTTLS in plaintext are refused"
                                   " (RFC 3207 section 4.2)")
            return
        await super().smtp_STARTTLS(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """DATA (RFC 5321 §4.1.1.4) read with bounded memory; the handler's `handle_DATA` gets what was kept."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        receiver = DataReceiver(self._line_reader, self._limits, self._limiter.memory, self._reset_timeout,
                                self.loop.time)
        try:
            content = await receiver.receive()
            self._reset_timeout()
            if isinstance(content, str):
                await self.push(content)
                return
            self.envelope.content = self.envelope.original_content = content
            del content
            status = await self._call_handler_hook("DATA")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push("250 OK" if status is MISSING else status)
        finally:
            self._set_post_data_state()  # type: ignore[no-untyped-call]  # the message leaves memory, whatever happened
            receiver.release()


class SubmissionSMTP(GatewaySMTP):
    """The submission listener: AUTH required after TLS, checked asynchronously."""

    def __init__(self, handler: SubmissionHandler, limiter: ConnectionLimiter, cfg: GatewayConfig,
                 tls_context: ssl.SSLContext, throttle: AuthThrottle | None = None) -> None:
        super().__init__(handler, limiter, cfg, tls_context, auth_required=True, auth_require_tls=True,
                         authenticator=_never_called)
        self._gw_handler = handler
        self._throttle = throttle or AuthThrottle(cfg.limits)
        self._max_auth_failures = cfg.limits.max_auth_failures
        self._auth_failure_delay = cfg.limits.auth_failure_delay
        self._auth_failures = 0

    # AUTH: aiosmtpd's PLAIN and LOGIN parse the exchange and call the synchronous
    # `_authenticate`; ours only hands the credentials back, and the check runs here,
    # asynchronously, with a delay, a cap on failures per connection, and the limits per client
    # address and per login of gateway/auth_throttle.py (RFC 4954 §4 leaves all of them to us).

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        return AuthResult(success=False, handled=False, auth_data=auth_data)

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_PLAIN(server, args))

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_LOGIN(server, args))

    async def _verify(self, pending: AuthResult) -> AuthResult:
        creds = pending.auth_data
        if pending.handled or not isinstance(creds, LoginPassword):
            return pending
        client = self._client_address()
        login = creds.login.decode("utf-8", "replace")
        locked = self._throttle.refusal(client, login)
        if locked is not None:
            log.warning("AUTH refused without a password check: %s", locked[10:])
            await asyncio.sleep(self._auth_failure_delay)
            return AuthResult(success=False, handled=False, message=locked)
        address = await self._gw_handler.check_login(creds.login, creds.password)
        if address is not None:
            self._throttle.succeeded(client, login)
            log.info("authenticated as %s", address)
            return AuthResult(success=True, auth_data=address)
        self._throttle.failed(client, login)
        self._auth_failures += 1
        log.warning("authentication failed (%d on this connection)", self._auth_failures)
        await asyncio.sleep(self._auth_failure_delay)
        if self._auth_failures >= self._max_auth_failures:
            await self._close_with("421 4.7.0 Too many authentication failures, closing the connection")
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False,
                          message="535 5.7.8 Authentication failed: wrong login or password")

    def _client_address(self) -> str:
        assert self.session is not None
        peer = self.session.peer
        return str(peer[0]) if isinstance(peer, tuple) else str(peer)


def _never_called(*_args: Any) -> AuthResult:
    # aiosmtpd wants an authenticator when AUTH is offered; ours is SubmissionSMTP._verify.
    return AuthResult(success=False)


async def start_submission(cfg: GatewayConfig, handler: SubmissionHandler,
                           tls_context: ssl.SSLContext) -> asyncio.Server:
    limiter = ConnectionLimiter(cfg.limits.max_connections)
    throttle = AuthThrottle(cfg.limits)
    loop = asyncio.get_running_loop()
    listen = cfg.submission.listen
    server = await loop.create_server(lambda: SubmissionSMTP(handler, limiter, cfg, tls_context, throttle),
                                      host=listen.host, port=listen.port, reuse_address=True)
    log.info("submission listening on %s:%d (STARTTLS, AUTH PLAIN/LOGIN after TLS)", listen.host, listen.port)
    return server
