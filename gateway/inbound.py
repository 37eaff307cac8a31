"""SMTP on port 25 for the peer gateways of the MSSanté trust space (DESIGN.md flow 2, the receiving side).

A peer must start TLS (RFC 3207) and present a client certificate that chains to the trust anchors
before MAIL; the sender's domain must be in the trust space; each RCPT must be an active local
mailbox. There is no AUTH on this port: peers are known by their certificate. DATA with a bare CR
or LF is refused (RFC 5321 §2.3.8); otherwise a `Received:` field naming the peer's certificate
host and the TLS parameters is added and the message is made durable in the spool, direction
"inbound", before `250`. Decryption and verification happen after the queue, never here.

The connection cap, the idle timeout, the size limit, the enhanced codes on aiosmtpd's stock
replies, the bare CR/LF check, the trace field and the spooling are the submission server's
(gateway/submission.py); this module adds the peer policy.

Where the trust-space list gives the operator certificate's DN for the sender's domain
(`DNCertificatOperateur`, mssante.md §1.3), the peer's certificate subject must be that DN (`550 5.7.1`
otherwise): a certificate of the trust space does not let one operator send for another's domains.

Known gaps: a null sender (DSN, MDN) names no domain, so its peer is checked against the trust anchors
only; revocation of TLS certificates (CRLs) is not checked here.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException
from cryptography import x509
from cryptography.x509.oid import NameOID

from config.schema import GatewayConfig, Listener, TLSConfig
from gateway.accounts import AccountStore
from gateway.addresses import AddressError, parse_mailbox
from gateway.spool import GroupCommitter, Incoming, QueuedMessage, new_queue_id
from gateway.submission import (
    ConnectionLimiter,
    GatewaySMTP,
    add_recipient,
    bare_cr_or_lf_refusal,
    check_recipient,
    header_safe_host,
    queue_and_answer,
    received_header,
    session_error_reply,
)
from gateway.tls import TLSSetupError, server_context

log = logging.getLogger(__name__)

TrustSpaceCheck = Callable[[str], Awaitable[bool]]
"""Whether a domain is in the trust space (the directory's whitelist)."""

OperatorDnLookup = Callable[[str], str | None]
"""The operator certificate DN the trust-space list gives for a domain, None when it gives none."""

NULL_SENDER = "<>"

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$)(?:{_LABEL}\.)+{_LABEL}$")
"""A fully qualified host name (RFC 1123 §2.1): what a gateway's certificate names; a CPS card's CN (`8` + RPPS)
is not one."""


def peer_tls_context(cfg: TLSConfig) -> ssl.SSLContext:
    """The port-25 server context: the gateway's certificate, TLS 1.2+ with the MSSanté suites, and the
    trust anchors that a peer's client certificate must chain to (RFC 5246 §7.4.4 / RFC 8446 §4.3.2).

    `CERT_OPTIONAL`, not `CERT_REQUIRED`: a presented certificate that does not verify still fails the
    handshake, but a peer without one gets a sentence at MAIL (`530 5.7.0`) rather than a bare TLS alert.
    """
    if cfg.ca is None:
        raise TLSSetupError("the inbound listener needs tls.ca: the trust anchors peers' certificates chain to")
    ctx = server_context(cfg)
    try:
        ctx.load_verify_locations(cafile=cfg.ca)
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError(f"cannot load the trust anchors {cfg.ca}: {exc}") from exc
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def _ssl_object(session: Session) -> ssl.SSLObject | None:
    info: dict[str, Any] | None = session.ssl
    obj = None if info is None else info.get("ssl_object")
    return obj if isinstance(obj, ssl.SSLObject) else None


def peer_certificate_host(session: Session) -> str | None:
    """The host the peer's verified certificate names: its first dNSName that is a host name (RFC 5280
    §4.2.1.6; no wildcard), else its CN if that is one.

    None when no certificate was presented (with `CERT_OPTIONAL` one that did not verify never gets
    this far) or when it names no host (a practitioner's card certificate, for one).
    """
    obj = _ssl_object(session)
    cert: dict[str, Any] | None = None if obj is None else obj.getpeercert()
    if not cert:
        return None
    names = [str(value) for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    names += [str(value) for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    return next((name.lower() for name in names if _HOST_NAME.match(name)), None)


_DN_SEPARATOR = re.compile(r"\s*(?<!\\)([,+])\s*")
"""An unescaped RDN (`,`) or attribute (`+`) separator, with any white space around it."""

_DN_NAMES = {"SN": NameOID.SURNAME, "SURNAME": NameOID.SURNAME, "GN": NameOID.GIVEN_NAME,
             "GIVENNAME": NameOID.GIVEN_NAME, "TITLE": NameOID.TITLE, "SERIALNUMBER": NameOID.SERIAL_NUMBER,
             "E": NameOID.EMAIL_ADDRESS, "EMAILADDRESS": NameOID.EMAIL_ADDRESS,
             "ORGANIZATIONIDENTIFIER": NameOID.ORGANIZATION_IDENTIFIER}
"""Attribute type names that certificates of the trust space use beyond RFC 4514 §3's short list."""


def _parse_dn(dn: str) -> x509.Name:
    """A DN string as the list or a person writes it: white space around separators and the attribute type
    names' case do not matter (RFC 4512 §1.4: descriptors are case-insensitive). ValueError if unreadable."""
    pieces = _DN_SEPARATOR.split(dn.strip())
    for i in range(0, len(pieces), 2):  # the odd ones are the separators split() keeps
        kind, eq, value = pieces[i].partition("=")
        if eq:
            pieces[i] = f"{kind.strip().upper()}={value.lstrip()}"
    return x509.Name.from_rfc4514_string("".join(pieces), _DN_NAMES)


def _comparable(name: x509.Name) -> list[frozenset[tuple[str, str]]]:
    """A DN as its RDNs in order, each a set of (attribute type OID, value): values compared case-insensitively
    with inner white space collapsed (the spirit of RFC 4518's caseIgnoreMatch for DirectoryString)."""
    return [frozenset((attr.oid.dotted_string, " ".join(str(attr.value).split()).casefold()) for attr in rdn)
            for rdn in name.rdns]


def subject_matches_dn(cert: x509.Certificate, dn: str) -> bool:
    """Whether the certificate's subject is the DN written in the trust-space list.

    The list writes DNs as strings (`CN=…,OU=…,O=…,ST=…,C=FR`, RFC 4514 order, most specific first); a
    string in the opposite order (`C=FR,…,CN=…`, as OpenSSL prints) is accepted too, since both name the
    same sequence of RDNs, and so are white space after the separators (`C=FR, ST=…`) and lower-case type
    names, which RFC 4514 does not write but hand-made lists do. A DN that cannot be read raises ValueError.
    """
    listed = _comparable(_parse_dn(dn))
    subject = _comparable(cert.subject)
    return subject in (listed, listed[::-1])


class InboundHandler:
    """The policy of the port-25 listener, as aiosmtpd handler hooks."""

    def __init__(self, cfg: GatewayConfig, accounts: AccountStore, spool: GroupCommitter,
                 on_queued: Callable[[QueuedMessage], None], is_trust_space_domain: TrustSpaceCheck,
                 operator_dn: OperatorDnLookup | None = None) -> None:
        self._cfg = cfg
        self._accounts = accounts
        self._spool = spool
        self._on_queued = on_queued
        self._is_trust_space_domain = is_trust_space_domain
        self._operator_dn = operator_dn

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        """No AUTH in the EHLO keywords (RFC 4954 §3): a peer is identified by its certificate."""
        session.host_name = hostname
        return [r for r in responses if not r.startswith("250-AUTH")]

    def handle_STARTTLS(self, server: SMTP, session: Session, envelope: Envelope) -> bool:
        """Log who completed the handshake (certificate fingerprint, never the certificate). The refusal of a
        peer without a certificate comes at MAIL, with a sentence (RFC 3207 §4.1 leaves the decision to us)."""
        obj = _ssl_object(session)
        der = None if obj is None else obj.getpeercert(binary_form=True)
        if obj is not None and der:
            log.info("TLS %s: peer certificate for %s, sha256 %s", obj.version(),
                     peer_certificate_host(session), hashlib.sha256(der).hexdigest())
        else:
            log.info("TLS: the peer presented no client certificate")
        return True

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        obj = _ssl_object(session)
        if obj is None or not obj.getpeercert():
            return "530 5.7.0 A client certificate from the MSSante trust space is required"
        if peer_certificate_host(session) is None:
            return "530 5.7.0 Your client certificate names no host (neither a DNS name nor a common name)"
        if address == NULL_SENDER:  # DSNs and MDNs between gateways (RFC 5321 §4.5.5)
            envelope.mail_from = NULL_SENDER
            envelope.mail_options.extend(mail_options)
            return "250 2.1.0 Sender OK (null sender: one recipient only)"
        try:
            sender = parse_mailbox(address)
        except AddressError as exc:
            return f"553 5.1.7 Bad sender address: {exc}"
        try:
            trusted = await self._is_trust_space_domain(sender.domain)
        except Exception:
            log.exception("the trust-space list could not be read")
            return "451 4.4.3 The MSSante trust-space list cannot be read right now, please try again later"
        if not trusted:
            log.info("MAIL FROM refused: %s is outside the trust space", sender.domain)
            return f"550 5.7.1 {sender.domain} is not in the MSSante trust space"
        refusal = self._operator_refusal(session, sender.domain)
        if refusal is not None:
            return refusal
        envelope.mail_from = str(sender)
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    def _operator_refusal(self, session: Session, domain: str) -> str | None:
        """`550 5.7.1` when the trust-space list gives the operator DN of `domain` and the peer's certificate
        is not that one (mssante.md §1.3); None when it matches or the list gives no DN."""
        dn = None if self._operator_dn is None else self._operator_dn(domain)
        if dn is None:
            return None
        obj = _ssl_object(session)
        der = None if obj is None else obj.getpeercert(binary_form=True)
        if not der:
            return "530 5.7.0 A client certificate from the MSSante trust space is required"
        cert = x509.load_der_x509_certificate(der)
        try:
            matches = subject_matches_dn(cert, dn)
        except ValueError:
            log.warning("the trust-space list gives %s an operator DN that cannot be parsed: %r", domain, dn)
            return (f"550 5.7.1 The MSSante trust-space list gives {domain} an operator certificate DN this"
                    " gateway cannot read; mail for that domain is refused until the list is corrected")
        if matches:
            return None
        log.info("MAIL FROM refused: the peer certificate (sha256 %s, subject %s) is not the operator certificate"
                 " %s of %s", hashlib.sha256(der).hexdigest(), cert.subject.rfc4514_string(), dn, domain)
        return (f"550 5.7.1 Your client certificate is not the operator certificate the MSSante trust-space list"
                f" gives for {domain}")

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if envelope.mail_from == NULL_SENDER and envelope.rcpt_tos:
            return ("452 4.5.3 A message with the null sender (a DSN or MDN) goes to one recipient only;"
                    " send it to the others separately")
        rcpt = await check_recipient(self._cfg, self._accounts, envelope, address)
        if isinstance(rcpt, str):
            return rcpt
        if not self._cfg.is_local_domain(rcpt.domain):
            return f"550 5.7.1 Relaying denied: {rcpt.domain} is not a domain of this gateway"
        return add_recipient(envelope, rcpt, rcpt_options)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data: bytes = envelope.original_content or b""
        refusal = bare_cr_or_lf_refusal(data)
        if refusal is not None:
            return refusal
        qid = new_queue_id()
        message = received_header(session, self._cfg.hostname, qid, "ESMTPS", _tls_comment(session)) + data
        sender = "" if envelope.mail_from == NULL_SENDER else str(envelope.mail_from)
        return await queue_and_answer(self._spool, self._on_queued,
                                      Incoming(qid, sender, tuple(envelope.rcpt_tos), message, account=None,
                                               direction="inbound"))

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # aiosmtpd closes the connection itself
            log.warning("TLS handshake with the peer failed: %s", error.__cause__ or error)
            return "454 4.7.0 TLS negotiation failed"
        return session_error_reply(error)


def _tls_comment(session: Session) -> str:
    """`using TLSv1.3 with cipher X; client certificate for host` for the trace field."""
    obj = _ssl_object(session)
    cipher = None if obj is None else obj.cipher()
    version = (obj.version() if obj else None) or "TLS"
    host = header_safe_host(peer_certificate_host(session) or "unknown")
    suite = header_safe_host(cipher[0]) if cipher else "unknown"
    return f"using {version} with cipher {suite}; client certificate for {host}"


class InboundSMTP(GatewaySMTP):
    """The port-25 listener: STARTTLS required, no AUTH."""

    def __init__(self, handler: InboundHandler, limiter: ConnectionLimiter, cfg: GatewayConfig,
                 tls_context: ssl.SSLContext) -> None:
        super().__init__(handler, limiter, cfg, tls_context, auth_required=False, auth_require_tls=True)

    async def smtp_AUTH(self, arg: str) -> None:
        await self.push("502 5.5.1 AUTH is not offered here: peer gateways are identified by their TLS certificate")


async def start_inbound(cfg: GatewayConfig, listen: Listener, handler: InboundHandler,
                        tls_context: ssl.SSLContext) -> asyncio.Server:
    limiter = ConnectionLimiter(cfg.limits.max_connections)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: InboundSMTP(handler, limiter, cfg, tls_context),
                                      host=listen.host, port=listen.port, reuse_address=True)
    log.info("inbound listening on %s:%d (STARTTLS and a trust-space client certificate required)",
             listen.host, listen.port)
    return server
