"""What the receiving gateway does to a message between its spool and the mailbox: decrypt, verify, mark.

DESIGN.md flow 2. Bytes in, bytes out: the recipient's key, the trust anchors and the identity hook are
given; no I/O but what the key (a card) and the hook (the directory) do themselves. The security-result
fields written here are documented for mail clients in docs/SECURITY-HEADERS.md:

- `MSSGW-Security`, ours: the verdict, who signed, how it was protected, and why it failed;
- `Authentication-Results` (RFC 8601) with the `smime` method registered by RFC 7281.

Any such field that arrived from outside is removed first (RFC 8601 §5), in the outer header and in the
header of the decrypted entity, so that no sender can forge a "verified". A message that cannot be
decrypted or verified is never dropped: it is delivered as received, attached whole, under a note.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import email.utils
import enum
import inspect
import logging
import quopri
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from smime.certpath import TrustStore
from smime.errors import (
    CertificateRevoked,
    DecryptionFailed,
    MalformedCms,
    MalformedMessage,
    NestingTooDeep,
    NoRecipientInfo,
    RevocationUnknown,
    SmimeError,
    UnsupportedAlgorithm,
)
from smime.keys import Decrypter, KeyTransportPadding, OaepHashName
from smime.limits import DEFAULT_LIMITS, ParseLimits
from smime.message import (
    MAX_DEPTH,
    OFFLOAD_BYTES,
    OpenedMessage,
    open_message,
    sender_address,
)
from smime.mime import (
    content_type,
    field_name,
    field_value,
    header_fields,
    join_message,
    new_boundary,
    split_header_body,
    split_message,
)
from smime.report import Check, VerificationReport
from smime.verify import AsyncIdentityCheck, IdentityCheck, match_from_address

log = logging.getLogger(__name__)

SECURITY_FIELD = "MSSGW-Security"
AUTH_RESULTS_FIELD = "Authentication-Results"
MAX_BYTES = 64 * 1024 * 1024
"""Above this, the message is not opened at all (the SMTP receivers already cap DATA lower: 25 MiB by default)."""
MAX_REASON = 300

CRLF = b"\r\n"
# RFC 5322 §3.6: the fields a message carries at most once.
SINGLE_FIELDS = frozenset({"date", "from", "sender", "reply-to", "to", "cc", "bcc", "message-id", "in-reply-to",
                           "references", "subject"})
SMIME_SIGNATURE_TYPES = ("application/pkcs7-signature", "application/x-pkcs7-signature")


class Verdict(enum.StrEnum):
    """The first word of `MSSGW-Security`. Only `verified` means a valid signature bound to the From."""

    VERIFIED = "verified"
    """Signed, every check passed (digest, signature, path, revocation, key usage, signer matches From)."""
    UNSIGNED = "unsigned"
    """Neither signed nor encrypted: delivered as it came, nothing vouched for."""
    DECRYPTED_UNSIGNED = "decrypted-unsigned"
    """Encrypted to the recipient and decrypted, but not signed: the sender is not authenticated."""
    FAILED = "failed"
    """Could not be decrypted or verified: the original is delivered as received, under a note saying why."""


class ErrorCode(enum.StrEnum):
    """Why a message failed; the code of the MSSanté error MDN (`processed/Error: <code>^<label>`, mssante.md §1.7).

    The ANS publishes no list of codes for S/MIME failures (none found): these are the gateway's own.
    """

    NO_KEY = "SMIME-NO-KEY"
    DECRYPT = "SMIME-DECRYPT"
    MALFORMED = "SMIME-MALFORMED"
    UNSUPPORTED = "SMIME-UNSUPPORTED"
    SIGNATURE = "SMIME-SIGNATURE"
    CERTIFICATE = "SMIME-CERTIFICATE"
    REVOKED = "SMIME-REVOKED"
    REVOCATION_UNKNOWN = "SMIME-REVOCATION-UNKNOWN"
    IDENTITY = "SMIME-IDENTITY"
    TOO_LARGE = "SMIME-TOO-LARGE"

    @property
    def label(self) -> str:
        """A short French label, the `<label>` of the error MDN."""
        return _LABELS[self]

    @property
    def undecrypted(self) -> bool:
        """True when the content could not be read at all (as opposed to read but not verified)."""
        return self in (ErrorCode.NO_KEY, ErrorCode.DECRYPT, ErrorCode.MALFORMED, ErrorCode.UNSUPPORTED,
                        ErrorCode.TOO_LARGE)


_LABELS = {
    ErrorCode.NO_KEY: "Message non chiffré pour la clé du destinataire",
    ErrorCode.DECRYPT: "Déchiffrement impossible",
    ErrorCode.MALFORMED: "Structure S/MIME invalide",
    ErrorCode.UNSUPPORTED: "Algorithme non pris en charge",
    ErrorCode.SIGNATURE: "Signature invalide",
    ErrorCode.CERTIFICATE: "Certificat du signataire non valide",
    ErrorCode.REVOKED: "Certificat du signataire révoqué",
    ErrorCode.REVOCATION_UNKNOWN: "Statut de révocation inconnu",
    ErrorCode.IDENTITY: "Signataire différent de l'expéditeur",
    ErrorCode.TOO_LARGE: "Message trop volumineux",
}

# RFC 7281 §3.1 result values of the `smime` method.
_AR_RESULT = {
    ErrorCode.NO_KEY: "permerror",
    ErrorCode.DECRYPT: "permerror",
    ErrorCode.MALFORMED: "permerror",
    ErrorCode.UNSUPPORTED: "permerror",
    ErrorCode.TOO_LARGE: "permerror",
    ErrorCode.SIGNATURE: "fail",
    ErrorCode.CERTIFICATE: "fail",
    ErrorCode.REVOKED: "fail",
    ErrorCode.REVOCATION_UNKNOWN: "temperror",
    ErrorCode.IDENTITY: "policy",
}


@dataclass(frozen=True, slots=True)
class InboundResult:
    """What to deliver to one recipient, and the verdict the delivery and MDN steps act on."""

    message: bytes = field(repr=False)
    verdict: Verdict
    reason: str | None
    signer_rpps: str | None = None
    signer_subject: str | None = None
    signer_fingerprint: str | None = None
    sender: str | None = None
    encrypted: bool = False
    cipher: str | None = None
    error_code: ErrorCode | None = None
    transient: bool = False
    """True when trying later could change the verdict (no current CRL yet): the worker may defer first."""
    stripped: int = 0
    """How many security-result fields from outside were removed (a forgery attempt, or a relaying peer)."""

    @property
    def error_label(self) -> str | None:
        return self.error_code.label if self.error_code else None


# --- removing what came from outside -------------------------------------------------------------------------------

_COMMENT = re.compile(r"\([^()]*\)")


def authserv_id(value: str) -> str:
    """The authserv-id of an Authentication-Results value (RFC 8601 §2.2), lower case, comments removed."""
    text = value
    for _ in range(4):  # nested comments, a few levels deep
        text = _COMMENT.sub(" ", text)
    first = text.split(";", 1)[0].strip().split()
    return first[0].strip('"').rstrip(".").lower() if first else ""


def _is_ours(raw_field: bytes, hostname: str) -> bool:
    name = field_name(raw_field)
    if name == SECURITY_FIELD.lower():
        return True
    return name == AUTH_RESULTS_FIELD.lower() and authserv_id(field_value(raw_field)) == hostname


def strip_security_fields(message: bytes, hostname: str) -> tuple[bytes, int]:
    """The message without any MSSGW-Security field nor Authentication-Results naming `hostname` (RFC 8601 §5).

    Only the top-level header block is touched, wherever the fields sit in it, folded or not; the body and
    every other field keep their bytes. A leading continuation line with no field goes too (it is counted). When the body is a message/rfc822 (Direct-style wrapping, RFC 8551
    §3.1), its own header block is cleaned too, since a client shows it as the message.
    """
    host = hostname.rstrip(".").lower()
    block, body = split_header_body(message)
    fields = header_fields(block)
    # A continuation line with no field above it (RFC 5322 §2.2.3 forbids it) would fold into the field
    # written above the message: into our Authentication-Results, adding a forged result to it.
    orphan = 1 if fields and fields[0][:1] in (b" ", b"\t") else 0
    kept = [f for f in fields[orphan:] if not _is_ours(f, host)]
    removed = len(fields) - len(kept)
    if content_type(block).mime_type == "message/rfc822" and body:
        body, inner_removed = strip_security_fields(body, hostname)
        removed += inner_removed
    if not removed:
        return message, 0
    return b"".join([*kept, CRLF, body]), removed


# --- writing our fields --------------------------------------------------------------------------------------------

def _ascii(text: str, limit: int = MAX_REASON) -> str:
    """Printable US-ASCII for a header value (RFC 5322 §2.2): accents dropped, controls and the rest as '?'."""
    if text.isascii() and text.isprintable():  # the usual case (names, addresses): nothing to drop or replace
        plain = " ".join(text.split())
    else:
        plain = unicodedata.normalize("NFKD", text)
        plain = "".join(c for c in plain if not unicodedata.combining(c))
        plain = "".join(c if 32 <= ord(c) < 127 else "?" for c in " ".join(plain.split()))
    return plain if len(plain) <= limit else plain[:limit - 3] + "..."


def _quoted(text: str, limit: int = MAX_REASON) -> str:
    """An RFC 5322 §3.2.4 quoted-string."""
    return '"' + _ascii(text, limit).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _token(text: str) -> str:
    value = _ascii(text, 200)
    return value if re.fullmatch(r"[A-Za-z0-9.@+_:-]+", value) else _quoted(value)


def _fold(name: str, items: list[str], sep: str) -> bytes:
    """One field, one item per line (RFC 5322 §2.2.3 folding), so that no line nears the 998 limit."""
    return (f"{name}: " + f"{sep}\r\n\t".join(items) + "\r\n").encode("ascii")


def security_field(result: InboundResult, hostname: str) -> bytes:
    """The `MSSGW-Security` field for `result` (docs/SECURITY-HEADERS.md)."""
    items = [result.verdict.value, f"by={_token(hostname)}"]
    if result.error_code is not None:
        items.append(f"code={result.error_code.value}")
    items.append("encrypted=" + ("yes" if result.encrypted else
                                 "unknown" if result.error_code is not None and result.error_code.undecrypted
                                 else "no"))
    if result.cipher:
        items.append(f"cipher={_token(result.cipher)}")
    if result.sender:
        items.append(f"from={_token(result.sender)}")
    if result.signer_subject:
        items.append(f"signer={_quoted(result.signer_subject)}")
    if result.signer_rpps:
        items.append(f"rpps={_token(result.signer_rpps)}")
    if result.signer_fingerprint:
        items.append(f"cert-sha256={_token(result.signer_fingerprint)}")
    if result.reason:
        items.append(f"reason={_quoted(result.reason)}")
    return _fold(SECURITY_FIELD, items, ";")


def authentication_results_field(result: InboundResult, report: VerificationReport | None, hostname: str) -> bytes:
    """`Authentication-Results: <hostname>; smime=<result> ...` (RFC 8601 §2.2, method and properties of RFC 7281).

    RFC 7281 §3.2 properties: body.smime-identifier (the signer's address), body.smime-serial and
    body.smime-issuer (the certificate, always as a pair, §3.2.3).
    """
    if result.verdict is Verdict.VERIFIED:
        value = "pass"
    elif result.error_code is not None:
        value = _AR_RESULT[result.error_code]
    else:
        value = "none"
    words = [f"smime={value}"]
    if result.reason and result.verdict is Verdict.FAILED:
        words.append(f"reason={_quoted(result.reason, 200)}")
    if report is not None:
        cert = report.signer.certificate
        addresses = report.signer.email_addresses
        identifier = next((a for a in addresses if result.sender and a.lower() == result.sender.lower()),
                          addresses[0] if addresses else None)
        if identifier:
            words.append(f"body.smime-identifier={_token(identifier)}")
        words.append(f"body.smime-serial={cert.serial_number:X}")
        words.append(f"body.smime-issuer={_quoted(cert.issuer.rfc4514_string(), 400)}")
    return _fold(AUTH_RESULTS_FIELD, [f"{_token(hostname)};", *words], "")


def _note(result: InboundResult, hostname: str) -> bytes:
    """The note the reader sees above the attached original: French first, then English."""
    reason = result.reason or ""
    if result.error_code is not None and result.error_code.undecrypted:
        fr = "Ce message n'a pas pu être déchiffré par la passerelle de messagerie sécurisée"
        en = "This message could not be decrypted by the secure mail gateway"
    else:
        fr = "La signature de ce message n'a pas pu être vérifiée par la passerelle de messagerie sécurisée"
        en = "The signature of this message could not be verified by the secure mail gateway"
    text = (f"{fr} {hostname}.\n"
            f"Motif : {reason}\n"
            "Le message d'origine est joint tel qu'il a été reçu. Son expéditeur n'est pas authentifié :\n"
            "ne vous fiez pas à son contenu sans le vérifier auprès de lui.\n"
            "\n"
            f"{en} {hostname}.\n"
            f"Reason: {reason}\n"
            "The original message is attached exactly as received. Its sender is not authenticated:\n"
            "do not rely on its content without checking with them.\n")
    return quopri.encodestring(text.encode("utf-8")).replace(b"\r\n", b"\n").replace(b"\n", CRLF)


def _wrap_original(raw: bytes, ours: list[bytes], result: InboundResult, hostname: str) -> bytes:
    """multipart/mixed: our fields, the original's outer fields, a note, and the original as message/rfc822.

    The original keeps every byte (RFC 2046 §5.2.1: message/rfc822 takes no base64, so 7bit or 8bit is
    declared); it is evidence, what the error MDN sends back, and what a client holding the key may open.
    """
    cleaned, _ = strip_security_fields(raw, hostname)
    block, _body = split_header_body(cleaned)
    outer = [f if f.endswith((b"\n", b"\r")) else f + CRLF for f in header_fields(block)
             if not field_name(f).startswith("content-") and field_name(f) != "mime-version"]
    b = new_boundary(raw).encode()
    cte = b"7bit" if raw.isascii() else b"8bit"
    tail = b"" if raw.endswith((b"\n", b"\r")) else CRLF
    return b"".join([
        *ours, *outer,
        b"MIME-Version: 1.0\r\n",
        b'Content-Type: multipart/mixed; boundary="', b, b'"\r\n', CRLF,
        b"--", b, CRLF,
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Transfer-Encoding: quoted-printable\r\n",
        b"Content-Disposition: inline\r\n", CRLF,
        _note(result, hostname), CRLF,
        b"--", b, CRLF,
        b"Content-Type: message/rfc822\r\n",
        b"Content-Transfer-Encoding: ", cte, CRLF,
        b'Content-Disposition: attachment; filename="original.eml"\r\n',
        b"Content-Description: Message d'origine, tel que recu / original message, as received\r\n", CRLF,
        raw, tail,
        b"--", b, b"--", CRLF,
    ])


# --- the verdict ---------------------------------------------------------------------------------------------------

def _code_of_error(exc: SmimeError, decrypter: Decrypter | None) -> ErrorCode:
    if isinstance(exc, NoRecipientInfo):
        return ErrorCode.NO_KEY
    if isinstance(exc, DecryptionFailed):
        return ErrorCode.NO_KEY if decrypter is None else ErrorCode.DECRYPT
    if isinstance(exc, UnsupportedAlgorithm):
        return ErrorCode.UNSUPPORTED
    if isinstance(exc, MalformedMessage | MalformedCms | NestingTooDeep):
        return ErrorCode.MALFORMED
    return ErrorCode.MALFORMED


def _code_of_check(check: Check) -> ErrorCode:
    if isinstance(check.error, CertificateRevoked):
        return ErrorCode.REVOKED
    if isinstance(check.error, RevocationUnknown):
        return ErrorCode.REVOCATION_UNKNOWN
    if check.name == "sender":
        return ErrorCode.IDENTITY
    if check.name in ("path", "key-usage"):
        return ErrorCode.CERTIFICATE
    return ErrorCode.SIGNATURE


def _judge(opened: OpenedMessage) -> tuple[Verdict, VerificationReport | None, Check | None]:
    """Every signed layer must be valid; the innermost signer (the author, RFC 2634 §1.1) is named."""
    reports = opened.reports
    if not reports:
        return (Verdict.DECRYPTED_UNSIGNED if opened.encrypted else Verdict.UNSIGNED), None, None
    for report in reports:
        if not report.valid:
            return Verdict.FAILED, report, report.failures[0]
    return Verdict.VERIFIED, reports[-1], None


class _KeyOnLoop:
    """A `Decrypter` for an `open_message` running in a worker thread: the RSA step goes back to the gateway's loop.

    A card is driven by one thread behind an asyncio lock of the gateway's loop (DESIGN.md "The card"),
    so its key must be used from that loop, whatever thread does the MIME and AES work.
    """

    def __init__(self, key: Decrypter, loop: asyncio.AbstractEventLoop) -> None:
        self._key = key
        self._loop = loop

    @property
    def certificate(self) -> x509.Certificate:
        return self._key.certificate

    async def decrypt_key(self, encrypted_key: bytes, *, padding: KeyTransportPadding = "pkcs1v15",
                          oaep_hash: OaepHashName = "sha256") -> bytes:
        call = self._key.decrypt_key(encrypted_key, padding=padding, oaep_hash=oaep_hash)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call, self._loop))


def _hook_on_loop(check: IdentityCheck | AsyncIdentityCheck, loop: asyncio.AbstractEventLoop) -> AsyncIdentityCheck:
    """The identity hook for a worker thread: an awaitable outcome (the directory lookup) is awaited on `loop`."""

    async def on_loop(cert: x509.Certificate, sender: str | None) -> str:
        outcome = check(cert, sender)
        if not inspect.isawaitable(outcome):
            return outcome

        async def wait() -> str:
            return await outcome

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(wait(), loop))

    return on_loop


async def _open(raw: bytes, *, decrypter: Decrypter | None, trust: TrustStore,
                check: IdentityCheck | AsyncIdentityCheck, now: datetime.datetime | None,
                max_depth: int, limits: ParseLimits) -> OpenedMessage:
    """`open_message`, in a worker thread with its own loop when the message is big.

    smime/ moves only signature verification of a big message to a thread; base64, AES and the MIME
    splitting would stay on the gateway's loop (0.6 s for 28 MB measured). Here the whole opening leaves
    it; only the key and the directory hook are called back on it. What remains is the GIL held by single
    long C calls in smime/ (one base64 decode, one boundary regex over the body): 0.15 to 0.25 s for 28 MB.
    """
    if len(raw) < OFFLOAD_BYTES:
        return await open_message(raw, decrypter=decrypter, trust=trust, at=now, identity_check=check,
                                  max_depth=max_depth, limits=limits)
    loop = asyncio.get_running_loop()
    key = _KeyOnLoop(decrypter, loop) if decrypter is not None else None
    coro = open_message(raw, decrypter=key, trust=trust, at=now, identity_check=_hook_on_loop(check, loop),
                        max_depth=max_depth, limits=limits)
    return await asyncio.to_thread(asyncio.run, coro)


async def secure_inbound(raw: bytes, *, recipient: str, decrypter: Decrypter | None, trust: TrustStore,
                         identity_check: IdentityCheck | AsyncIdentityCheck | None, hostname: str,
                         now: datetime.datetime | None = None, max_bytes: int = MAX_BYTES,
                         max_depth: int = MAX_DEPTH, limits: ParseLimits = DEFAULT_LIMITS) -> InboundResult:
    """Decrypt and verify a received message for `recipient`, and mark it; never raises on what the sender sent.

    `decrypter` is the recipient's key (a card or a key file), None when the recipient has none.
    `identity_check` binds the signer to the From (RFC 8550 §3): the gateway's hook matches the RPPS
    number of the certificate with the directory entry of the From address; None means the default
    of smime/ (the From must be an address of the certificate), never "no check". Errors of the hook
    other than `SenderMismatch` (the directory is unreachable) propagate: the worker retries later.
    Every `SmimeError` becomes a `failed` verdict and the original is delivered as received.
    A big message is opened and marked in worker threads (see `_open`).
    """
    host = hostname.rstrip(".").lower()
    check = identity_check if identity_check is not None else match_from_address
    if len(raw) > max_bytes:
        reason = f"{len(raw)} bytes, more than the {max_bytes} this gateway opens"
        failed = InboundResult(b"", Verdict.FAILED, reason, error_code=ErrorCode.TOO_LARGE)
        return await _cpu(len(raw), _deliver_original, raw, failed, None, host, recipient)
    foreign = _foreign_signature(raw)
    if foreign is not None:
        outer, entity = split_message(raw)
        plain = OpenedMessage(tuple(outer), entity, (), sender_address(outer))
        return await _cpu(len(raw), _mark_opened, raw, plain, host, recipient,
                          f"signed with {foreign}, which this gateway does not check: sender not authenticated")
    try:
        opened = await _open(raw, decrypter=decrypter, trust=trust, check=check, now=now, max_depth=max_depth,
                             limits=limits)
    except SmimeError as exc:
        failed = InboundResult(b"", Verdict.FAILED, str(exc), error_code=_code_of_error(exc, decrypter))
        return await _cpu(len(raw), _deliver_original, raw, failed, None, host, recipient)
    return await _cpu(len(raw), _mark_opened, raw, opened, host, recipient)


async def _cpu(size: int, fn: Callable[..., InboundResult], /, *args: Any) -> InboundResult:
    """Formatting is linear in the size (a few copies): a big message's goes to a worker thread."""
    if size >= OFFLOAD_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def _foreign_signature(raw: bytes) -> str | None:
    """The protocol of a multipart/signed that is not S/MIME (RFC 3156 OpenPGP, ...): not ours to judge."""
    ctype = content_type(split_header_body(raw)[0])
    protocol = (ctype.param("protocol") or "").lower()
    if ctype.mime_type == "multipart/signed" and protocol and protocol not in SMIME_SIGNATURE_TYPES:
        return protocol
    return None


def _ambiguous_from(outer: Sequence[bytes], inner: Sequence[bytes], checked: str | None) -> str | None:
    """Why a client could show another From than the one checked against the signer (RFC 5322 §3.6.2), if so."""
    for where, fields in (("message header", outer), ("signed content", inner)):
        froms = [field_value(f) for f in fields if field_name(f) == "from"]
        if len(froms) > 1:
            return f"the {where} has {len(froms)} From fields"
        addresses = [a for _, a in email.utils.getaddresses(froms)]
        if len(addresses) > 1:
            return f"the From of the {where} names {len(addresses)} mailboxes"
        if addresses and addresses[0].lower() != (checked or "").lower():
            return f"the {where} names From {addresses[0]}, the signer was checked against {checked}"
    return None


def _mark_opened(raw: bytes, opened: OpenedMessage, host: str, recipient: str,
                 reason: str | None = None) -> InboundResult:
    verdict, report, failed_check = _judge(opened)
    decrypted = next((layer.decrypted for layer in opened.layers if layer.decrypted is not None), None)
    signer = report.signer if report is not None else None
    result = InboundResult(
        b"", verdict, reason or _REASONS.get(verdict),
        signer_rpps=signer.rpps if signer else None,
        signer_subject=signer.subject if signer else None,
        signer_fingerprint=signer.fingerprint_sha256 if signer else None,
        sender=opened.sender,
        encrypted=opened.encrypted,
        cipher=decrypted.cipher if decrypted else None,
    )
    inner = header_fields(split_header_body(opened.entity)[0]) if opened.layers else []
    if failed_check is not None:
        code = _code_of_check(failed_check)
        result = dataclasses.replace(result, reason=f"{failed_check.name}: {failed_check.reason}", error_code=code,
                                     transient=code is ErrorCode.REVOCATION_UNKNOWN)
        return _deliver_original(raw, result, report, host, recipient)
    if verdict is Verdict.VERIFIED:
        why = _ambiguous_from(opened.outer_fields, inner, opened.sender)
        if why is not None:
            result = dataclasses.replace(result, verdict=Verdict.FAILED, reason=f"sender: {why}",
                                         error_code=ErrorCode.IDENTITY)
            return _deliver_original(raw, result, report, host, recipient)

    # A plain message keeps its bytes; an opened one is the decrypted entity under the outer fields, where a
    # field the entity carries itself (RFC 9788 header protection: From, Subject...) replaces the outer one.
    if opened.layers:
        protected = {field_name(f) for f in inner} & SINGLE_FIELDS
        outer = [f for f in opened.outer_fields if field_name(f) not in protected]
        content = join_message(outer, opened.entity)
    else:
        content = raw
    cleaned, removed = strip_security_fields(content, host)
    ours = [security_field(result, host), authentication_results_field(result, report, host)]
    log.info("inbound for %s: %s%s (layers: %s)", recipient, verdict.value,
             f", signer sha256 {signer.fingerprint_sha256[:16]}" if signer else "",
             ", ".join(layer.detail for layer in opened.layers) or "none")
    if removed:
        log.warning("removed %d security-result field(s) that came from outside", removed)
    return dataclasses.replace(result, message=b"".join([*ours, cleaned]), stripped=removed)


_REASONS = {
    Verdict.UNSIGNED: "the message is neither signed nor encrypted",
    Verdict.DECRYPTED_UNSIGNED: "the message was encrypted but not signed: its sender is not authenticated",
}


def _deliver_original(raw: bytes, result: InboundResult, report: VerificationReport | None, host: str,
                      recipient: str) -> InboundResult:
    ours = [security_field(result, host), authentication_results_field(result, report, host)]
    _, removed = strip_security_fields(raw, host)
    log.warning("inbound for %s: failed (%s): %s; delivered as received", recipient,
                result.error_code.value if result.error_code else "?", result.reason)
    if removed:
        log.warning("the original carries %d security-result field(s) from outside; kept inside the attachment",
                    removed)
    return dataclasses.replace(result, message=_wrap_original(raw, ours, result, host), stripped=removed)
