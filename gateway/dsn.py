"""Delivery status notifications (RFC 3464) in a `multipart/report` (RFC 6522): pure bytes in, bytes out.

The delivery worker puts what `build_dsn` returns straight into the sender's own mailbox, when a
recipient has failed for good or is still waiting after the delay threshold (DESIGN.md, the spool).
The report carries only the original's header block (`text/rfc822-headers`), never its body: a
body may hold patient data, and the sender already has it.

The small helpers below that assemble a report (header folding, the original's header block,
boundaries, 7-bit field values) are shared with `gateway.mdn`.
"""

from __future__ import annotations

import email.policy
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import MIMEPart
from email.utils import format_datetime
from typing import Literal

from gateway.addresses import AddressError, parse_mailbox
from gateway.errors import GatewayError

log = logging.getLogger(__name__)

POLICY = email.policy.SMTP
"""CRLF line ends, RFC 2047 for non-ASCII header text, lines folded at 78."""

GATEWAY_NAME = "Passerelle MSSanté"

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_TOKEN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HEADER_LINE = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")
_MAX_TEXT = 900
_MSGID_FIELDS = ("message-id", "in-reply-to", "references")


class DsnError(GatewayError):
    """A DSN that cannot be built from what was given; the message says which input is wrong."""


class NullSenderError(DsnError):
    """The envelope sender is null (`MAIL FROM:<>`): a bounce is never answered by a bounce (RFC 3464 §2)."""

    def __init__(self) -> None:
        super().__init__("no DSN for a null envelope sender (RFC 3464 §2, RFC 5321 §4.5.5)")


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    """One recipient's line in the report (RFC 3464 §2.3)."""

    address: str
    action: Literal["failed", "delayed"]
    status: str
    """Enhanced status code (RFC 3463), e.g. "5.1.1"; 5.x.x with "failed", 4.x.x with "delayed"."""
    diagnostic: str
    """The remote reply as received, e.g. "550 5.1.1 no such user" (becomes `Diagnostic-Code: smtp; ...`)."""
    remote_mta: str | None = None
    last_attempt: datetime | None = None
    will_retry_until: datetime | None = None
    """Only meaningful for "delayed" (RFC 3464 §2.3.7); ignored for "failed"."""


def build_dsn(
    *,
    original: bytes,
    envelope_sender: str,
    queue_id: str,
    reporting_mta: str,
    arrival: datetime,
    recipients: Sequence[RecipientStatus],
    now: datetime | None = None,
    original_envelope_id: str | None = None,
) -> bytes:
    """Return a complete CRLF message: `multipart/report; report-type=delivery-status` (RFC 3464, RFC 6522).

    Parts: (1) text/plain, French then English, one paragraph per recipient; (2) message/delivery-status
    with the per-message fields (§2.2: Original-Envelope-Id when given, Reporting-MTA, Arrival-Date) and one
    block per recipient (§2.3: Final-Recipient, Action, Status, Remote-MTA, Diagnostic-Code,
    Last-Attempt-Date, Will-Retry-Until); (3) text/rfc822-headers with the original's header block only.
    Raises `NullSenderError` for a null envelope sender and `DsnError` for any other unusable input.
    """
    if envelope_sender.strip() in ("", "<>"):
        raise NullSenderError()
    try:
        sender = str(parse_mailbox(envelope_sender.strip().removeprefix("<").removesuffix(">")))
    except AddressError as exc:
        raise DsnError(f"envelope sender not usable for a DSN: {exc}") from exc
    if not _TOKEN.match(queue_id):
        raise DsnError("queue id must be 1-64 characters of [A-Za-z0-9._-]")
    if not _HOST.match(reporting_mta):
        raise DsnError("reporting MTA must be a host name")
    if original_envelope_id is not None and not _is_printable_ascii(original_envelope_id):
        raise DsnError("original envelope id must be printable ASCII")
    if not recipients:
        raise DsnError("a DSN reports on at least one recipient")
    now = require_aware(now if now is not None else datetime.now(UTC), "now")
    require_aware(arrival, "arrival")
    checked = [_check_recipient(r) for r in recipients]

    failed = any(r.action == "failed" for r in checked)
    if failed:
        subject = "Échec de remise / Delivery failure"
    else:
        subject = "Remise retardée / Delivery delayed"

    human = _human_text(checked, queue_id, reporting_mta)
    status = _status_part(checked, reporting_mta, arrival, original_envelope_id)
    block = original_header_block(original)
    headers_part = (
        b"Content-Type: text/rfc822-headers\r\n"
        + (b"" if block.isascii() else b"Content-Transfer-Encoding: 8bit\r\n")
        + b"Content-Description: Original message headers\r\n\r\n"
        + block
    )
    top = [
        ("From", f"{GATEWAY_NAME} <MAILER-DAEMON@{reporting_mta}>"),
        ("To", sender),
        ("Subject", subject),
        ("Date", format_datetime(now)),
        ("Message-ID", new_message_id("dsn", reporting_mta)),
        ("Auto-Submitted", "auto-replied"),
    ]
    log.info("DSN built for queue id %s: %d recipient(s), %s", queue_id, len(checked),
             "failure" if failed else "delay")
    return assemble_report(top, "delivery-status", [text_part(human), status, headers_part])


def _check_recipient(r: RecipientStatus) -> RecipientStatus:
    try:
        parse_mailbox(r.address)
    except AddressError as exc:
        raise DsnError(f"recipient address not usable in a DSN: {exc}") from exc
    m = _STATUS.match(r.status)
    if m is None:
        raise DsnError(f"status must be an enhanced status code like 5.1.1 (RFC 3463), got {r.status!r}")
    expected = {"failed": "5", "delayed": "4"}.get(r.action)
    if expected is None:
        raise DsnError(f"action must be 'failed' or 'delayed', got {r.action!r}")
    if m.group(1) != expected:
        raise DsnError(f"action {r.action!r} goes with a {expected}.x.x status (RFC 3464 §2.3.4), got {r.status}")
    if r.remote_mta is not None and not _HOST.match(r.remote_mta):
        raise DsnError("remote MTA must be a host name")
    for name in ("last_attempt", "will_retry_until"):
        value = getattr(r, name)
        if value is not None:
            require_aware(value, name)
    return r


def _human_text(recipients: Sequence[RecipientStatus], queue_id: str, reporting_mta: str) -> str:
    fr = [f"Ceci est un message automatique de la passerelle {reporting_mta}.", ""]
    en = [f"This is an automatic message from the gateway {reporting_mta}.", ""]
    for r in recipients:
        reply = clean_text(r.diagnostic)
        if r.action == "failed":
            fr.append(f"Votre message n'a pas pu être remis à {r.address}, et il ne le sera pas.")
            en.append(f"Your message could not be delivered to {r.address}, and will not be.")
        else:
            until_fr = f" jusqu'au {_human_date(r.will_retry_until)}" if r.will_retry_until else ""
            until_en = f" until {_human_date(r.will_retry_until)}" if r.will_retry_until else ""
            fr.append(f"Votre message n'a pas encore pu être remis à {r.address}. Rien n'est à faire de votre "
                      f"côté : la passerelle continue d'essayer{until_fr}, et vous préviendra si elle renonce.")
            en.append(f"Your message has not yet been delivered to {r.address}. Nothing needs to be done: the "
                      f"gateway keeps trying{until_en} and will tell you if it gives up.")
        fr.append(f"  Code : {r.status}. Réponse du serveur distant : {reply}")
        en.append(f"  Status: {r.status}. Remote server reply: {reply}")
        fr.append("")
        en.append("")
    fr.append(f"Identifiant dans la file d'attente : {queue_id}. Les en-têtes du message sont joints.")
    en.append(f"Queue id: {queue_id}. The message headers are attached.")
    return "\n".join([*fr, "", "-" * 20, "", *en]) + "\n"


def _status_part(recipients: Sequence[RecipientStatus], reporting_mta: str, arrival: datetime,
                 envelope_id: str | None) -> bytes:
    """The machine-readable part, 7-bit (RFC 3464 §2.1): per-message fields, then one block per recipient."""
    out = [b"Content-Type: message/delivery-status\r\nContent-Description: Delivery report\r\n\r\n"]
    if envelope_id is not None:
        out.append(field("Original-Envelope-Id", envelope_id))
    out.append(field("Reporting-MTA", f"dns; {reporting_mta}"))
    out.append(field("Arrival-Date", format_datetime(arrival)))
    for r in recipients:
        out.append(b"\r\n")
        out.append(field("Final-Recipient", f"rfc822; {r.address}"))
        out.append(field("Action", r.action))
        out.append(field("Status", r.status))
        if r.remote_mta is not None:
            out.append(field("Remote-MTA", f"dns; {r.remote_mta}"))
        out.append(field("Diagnostic-Code", f"smtp; {_ascii(clean_text(r.diagnostic))}"))
        if r.last_attempt is not None:
            out.append(field("Last-Attempt-Date", format_datetime(r.last_attempt)))
        if r.action == "delayed" and r.will_retry_until is not None:
            out.append(field("Will-Retry-Until", format_datetime(r.will_retry_until)))
    return b"".join(out)


def _human_date(value: datetime | None) -> str:
    assert value is not None
    return value.astimezone(UTC).strftime("%d/%m/%Y %H:%M UTC")


def _ascii(text: str) -> str:
    """Remote replies are ASCII (RFC 5321 §2.4); anything else is escaped, the field stays 7-bit."""
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _is_printable_ascii(text: str) -> bool:
    return bool(text) and all(0x21 <= ord(c) <= 0x7E for c in text)


# Helpers shared with gateway.mdn: assembling a multipart/report.


def new_message_id(kind: str, domain: str) -> str:
    """A fresh Message-ID (RFC 5322 §3.6.4): 128 random bits, short enough never to be folded."""
    return f"<{kind}.{secrets.token_hex(16)}@{domain}>"


def require_aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise DsnError(f"{name} must be a timezone-aware datetime")
    return value


def clean_text(text: str, limit: int = _MAX_TEXT) -> str:
    """One line of text: no control characters (no header injection), no lone surrogates, bounded length."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    text = " ".join(_CONTROLS.sub(" ", text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encoded_text(text: str) -> str:
    """7-bit text for a report field: ASCII as is, other words as RFC 2047 encoded-words, on one line.

    The machine-readable parts are 7-bit (the IANA registrations in RFC 8098 and RFC 3464); the email package chooses which
    words to encode, and `field` folds the result again.
    """
    text = clean_text(text)
    if text.isascii():
        return text
    folded: str = POLICY.header_factory("X", text).fold(policy=POLICY)
    return folded.removeprefix("X:").replace("\r\n", "").strip()


def field(name: str, value: str) -> bytes:
    """One `Name: value` field of a report part, folded at white space near 78 columns (RFC 5322 §2.2.3)."""
    words = value.split(" ")
    lines: list[str] = []
    line = f"{name}:"
    for word in words:
        if len(line) + 1 + len(word) > 78 and line.strip() and not line.endswith(":"):
            lines.append(line)
            line = " "
        else:
            line += " "
        line += word
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def header(name: str, value: str) -> bytes:
    """A top-level header, folded and RFC 2047-encoded by the email package's SMTP policy."""
    if name.lower() in _MSGID_FIELDS:
        return field(name, clean_text(value))  # folded only between ids: parsers keep ids whole
    h = POLICY.header_factory(name, clean_text(value))
    folded: str = h.fold(policy=POLICY)
    return folded.encode("ascii")


def text_part(text: str) -> bytes:
    """A text/plain UTF-8 part in quoted-printable: 7-bit safe, so it survives relays and S/MIME signing."""
    part = MIMEPart(policy=POLICY)
    part.set_content(text, charset="utf-8", cte="quoted-printable")
    return part.as_bytes(policy=POLICY)


def to_crlf(data: bytes) -> bytes:
    """Every line end (CRLF, bare LF, bare CR) made CRLF (RFC 5322 §2.1)."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def original_header_block(original: bytes) -> bytes:
    """The original's header fields and nothing else, CRLF, ending with CRLF.

    Reading stops at the empty line, or at the first line that is neither a field (`name:`) nor a
    continuation (leading white space): a malformed message never lets its body into a report.
    NUL bytes are dropped and lines over 998 octets are cut (RFC 5322 §2.1.1).
    """
    out: list[bytes] = []
    for line in to_crlf(original).split(b"\r\n"):
        if not line:
            break
        if _HEADER_LINE.match(line) or (out and line[:1] in (b" ", b"\t")):
            out.append(line.replace(b"\x00", b"")[:998])
        else:
            break
    return b"".join(line + b"\r\n" for line in out)


def assemble_report(top: Sequence[tuple[str, str]], report_type: str, parts: Sequence[bytes]) -> bytes:
    """A complete `multipart/report` message (RFC 6522 §3) from top headers and already-encoded parts."""
    while True:
        boundary = f"=_report_{secrets.token_hex(12)}"
        if not any(boundary.encode() in p for p in parts):
            break
    head = b"".join(header(name, value) for name, value in top)
    head += b"MIME-Version: 1.0\r\n"
    head += (f"Content-Type: multipart/report; report-type={report_type};\r\n"
             f' boundary="{boundary}"\r\n').encode("ascii")
    delimiter = f"--{boundary}\r\n".encode("ascii")
    body = b"This is a MIME-formatted report (RFC 6522).\r\n\r\n"
    for p in parts:
        body += delimiter + p + b"\r\n"  # this CRLF belongs to the next delimiter (RFC 2046 §5.1.1)
    body += f"--{boundary}--\r\n".encode("ascii")
    return head + b"\r\n" + body
