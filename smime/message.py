"""Whole messages: sign, encrypt, sign-then-encrypt, and opening every S/MIME layer of what arrives.

RFC 8551 §3.7 lets layers nest; the Direct AS order is sign then encrypt. On receipt each layer is
peeled and reported separately, up to a depth limit, so a message built to nest without end is refused.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cryptography import x509

from smime.algorithms import CIPHERS, ContentCipher
from smime.certpath import DEFAULT_POLICY, TrustStore, ValidationPolicy
from smime.cms import load_content_info
from smime.envelope import Decrypted, decrypt_content, encrypt_content
from smime.errors import (
    DecryptionFailed,
    MalformedMessage,
    NestingTooDeep,
    SenderMismatch,
)
from smime.keys import (
    Decrypter,
    HashName,
    KeyTransportPadding,
    SignaturePadding,
    Signer,
)
from smime.limits import DEFAULT_LIMITS, ParseLimits
from smime.mime import (
    build_pkcs7_mime,
    check_structure,
    content_type,
    decode_body,
    field_name,
    field_value,
    join_message,
    split_header_body,
    split_message,
    split_multipart_signed,
    to_crlf,
)
from smime.report import Check, VerificationReport
from smime.signing import sign_entity
from smime.verify import (
    AsyncIdentityCheck,
    IdentityCheck,
    match_from_address,
    verify_signed_data,
)

log = logging.getLogger(__name__)

MAX_DEPTH = 4
PKCS7_MIME = ("application/pkcs7-mime", "application/x-pkcs7-mime")
OFFLOAD_BYTES = 256 * 1024

T = TypeVar("T")


async def _cpu(size: int, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run a CPU-bound step; on a large message, in a worker thread so the event loop stays responsive.

    `asyncio.to_thread` carries the contextvars (connection and queue ids in the logs) into the thread.
    """
    if size >= OFFLOAD_BYTES:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def encrypt_entity(entity: bytes, recipients: Sequence[x509.Certificate], *,
                   cipher: ContentCipher = "aes256-cbc", key_transport: KeyTransportPadding = "pkcs1v15",
                   oaep_hash: HashName = "sha256") -> bytes:
    """An application/pkcs7-mime entity holding `entity` (made CRLF) encrypted to `recipients` (RFC 8551 §3.3)."""
    der = encrypt_content(to_crlf(entity), recipients, cipher=cipher, key_transport=key_transport,
                          oaep_hash=oaep_hash)
    smime_type = "authEnveloped-data" if CIPHERS[cipher].mode == "gcm" else "enveloped-data"
    return build_pkcs7_mime(der, smime_type)


def encrypt_message(message: bytes, recipients: Sequence[x509.Certificate], *,
                    cipher: ContentCipher = "aes256-cbc", key_transport: KeyTransportPadding = "pkcs1v15",
                    oaep_hash: HashName = "sha256") -> bytes:
    """Encrypt the MIME entity of an RFC 5322 message; From/To/Subject stay readable to transport."""
    outer, entity = split_message(message)
    return join_message(outer, encrypt_entity(entity, recipients, cipher=cipher, key_transport=key_transport,
                                              oaep_hash=oaep_hash))


async def sign_and_encrypt(message: bytes, signer: Signer, recipients: Sequence[x509.Certificate], *,
                           sender_encryption_certificate: x509.Certificate | None = None,
                           hash_name: HashName = "sha256", padding: SignaturePadding = "pkcs1v15",
                           detached: bool = True, chain: Sequence[x509.Certificate] = (),
                           cipher: ContentCipher = "aes256-cbc", key_transport: KeyTransportPadding = "pkcs1v15",
                           oaep_hash: HashName = "sha256", signing_time: datetime.datetime | None = None,
                           limits: ParseLimits = DEFAULT_LIMITS) -> bytes:
    """Sign, then encrypt to every recipient and to the sender (DESIGN.md flow 1, the Direct AS order).

    `sender_encryption_certificate` is the sender's own encryption certificate (a CPS card's
    authentication certificate, not its non-repudiation one): it is added to the recipients, so the
    sender can read their copy, and named in SMIMEEncryptionKeyPreference (RFC 8551 §2.5.3).
    """
    outer, entity = split_message(message)
    signed = await sign_entity(entity, signer, hash_name=hash_name, padding=padding, detached=detached,
                               chain=chain, signing_time=signing_time,
                               encryption_certificate=sender_encryption_certificate, limits=limits)
    to = list(recipients)
    if sender_encryption_certificate is not None and sender_encryption_certificate not in to:
        to.append(sender_encryption_certificate)
    sealed = await _cpu(len(signed), encrypt_entity, signed, to, cipher=cipher, key_transport=key_transport,
                        oaep_hash=oaep_hash)
    return join_message(outer, sealed)


@dataclass(frozen=True, slots=True)
class Layer:
    """One S/MIME layer as found on receipt: its kind and, for encryption, how it was protected."""

    kind: str
    detail: str
    decrypted: Decrypted | None = field(default=None, repr=False)
    report: VerificationReport | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class OpenedMessage:
    """A message with every S/MIME layer removed, the layers outermost first, and the sender's address."""

    outer_fields: tuple[bytes, ...]
    entity: bytes = field(repr=False)
    layers: tuple[Layer, ...]
    sender: str | None

    @property
    def message(self) -> bytes:
        return join_message(list(self.outer_fields), self.entity)

    @property
    def reports(self) -> tuple[VerificationReport, ...]:
        return tuple(layer.report for layer in self.layers if layer.report is not None)

    @property
    def encrypted(self) -> bool:
        return any(layer.decrypted is not None for layer in self.layers)


def sender_address(outer: Sequence[bytes]) -> str | None:
    """The address of the From field (RFC 5322 §3.6.2), None when absent or unreadable."""
    for f in outer:
        if field_name(f) == "from":
            pairs = email.utils.getaddresses([field_value(f)])
            return pairs[0][1] or None if pairs else None
    return None


def smime_kind(entity: bytes, limits: ParseLimits = DEFAULT_LIMITS) -> str | None:
    """`signed`, `opaque-signed`, `enveloped` or None for a plain entity; decided by headers, then by the CMS."""
    block, body = split_header_body(entity)
    ctype = content_type(block)
    if ctype.mime_type == "multipart/signed":
        return "signed"
    if ctype.mime_type not in PKCS7_MIME and not (
            ctype.mime_type == "application/octet-stream"
            and (ctype.param("name") or "").lower().endswith(".p7m")):
        return None
    smime_type = (ctype.param("smime-type") or "").lower()
    if smime_type == "signed-data":
        return "opaque-signed"
    if smime_type in ("enveloped-data", "authenveloped-data"):
        return "enveloped"
    if smime_type == "certs-only":
        return None
    kind = load_content_info(decode_body(block, body), limits)["content_type"].native
    return "opaque-signed" if kind == "signed_data" else "enveloped"


async def _check_sender(report: VerificationReport, check: IdentityCheck | AsyncIdentityCheck | None,
                        sender: str | None) -> VerificationReport:
    """Add the `sender` check (RFC 8550 §3) to a report, awaiting the hook when it is a coroutine function."""
    if check is None:
        return report
    try:
        outcome = check(report.signer.certificate, sender)
        reason = await outcome if inspect.isawaitable(outcome) else outcome
    except SenderMismatch as exc:
        return report.with_check(Check.failed(exc, "sender"))
    return report.with_check(Check.ok("sender", reason))


async def open_message(message: bytes, *, decrypter: Decrypter | None, trust: TrustStore,
                       at: datetime.datetime | None = None, policy: ValidationPolicy = DEFAULT_POLICY,
                       identity_check: IdentityCheck | AsyncIdentityCheck | None = match_from_address,
                       max_depth: int = MAX_DEPTH, limits: ParseLimits = DEFAULT_LIMITS) -> OpenedMessage:
    """Decrypt and verify every layer of a received message; signature verdicts are in the reports.

    Raises only on what prevents reading: malformed structure, no key for us, failed decryption,
    nesting deeper than `max_depth`, a MIME tree or CMS structure past `limits` (`LimitExceeded`, checked
    on every layer before it is parsed). A failed signature is a report, never an exception.
    `identity_check` may be a coroutine function: the gateway's RPPS lookup awaits the directory.
    """
    outer, entity = split_message(message)
    sender = sender_address(outer)
    layers: list[Layer] = []
    check_structure(entity, limits)
    while (kind := smime_kind(entity, limits)) is not None:
        if len(layers) >= max_depth:
            raise NestingTooDeep(len(layers) + 1, max_depth)
        block, body = split_header_body(entity)
        if kind == "signed":
            parts = split_multipart_signed(entity)
            report = await _cpu(len(entity), verify_signed_data, parts.signature, parts.content, trust=trust, at=at,
                                policy=policy, micalg=parts.micalg, sender=sender, identity_check=None,
                                limits=limits)
            report = await _check_sender(report, identity_check, sender)
            layers.append(Layer("signed", "multipart/signed", report=report))
            entity = report.content
        elif kind == "opaque-signed":
            report = await _cpu(len(entity), verify_signed_data, decode_body(block, body), None, trust=trust, at=at,
                                policy=policy, sender=sender, identity_check=None, limits=limits)
            report = await _check_sender(report, identity_check, sender)
            layers.append(Layer("signed", "application/pkcs7-mime signed-data", report=report))
            entity = report.content
        else:
            if decrypter is None:
                raise DecryptionFailed("the message is encrypted and no decryption key was given")
            decrypted = await decrypt_content(decode_body(block, body), decrypter, limits=limits)
            layers.append(Layer("encrypted", f"{decrypted.structure} {decrypted.cipher} {decrypted.key_transport}",
                                decrypted=decrypted))
            entity = to_crlf(decrypted.content)
        if not entity.strip():
            raise MalformedMessage(f"the {layers[-1].kind} layer holds no MIME entity")
        check_structure(entity, limits)
    log.debug("opened %d S/MIME layers: %s", len(layers), ", ".join(layer.detail for layer in layers) or "none")
    return OpenedMessage(tuple(outer), entity, tuple(layers), sender)
