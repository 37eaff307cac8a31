"""Message disposition notifications (RFC 8098) the MSSanté way: pure bytes in, bytes out.

The rules come from the ANS "Volet Transmission au LPS de documents CDA provenant d'un courriel
MSSanté" (annex "Structure du MDN", published v1.1.3; reference/mssante.md §1.7): an MDN only when
the message asks for one (`Disposition-Notification-To`), `multipart/report;
report-type=disposition-notification` with three parts in the RFC 6522 order, the fields
Disposition, Final-Recipient, Original-Message-ID and Original-Recipient, and the error form
`processed/Error: <code>^<label>` with the subject `[KO Intégration système !][<code>] <subject>`.

Where the original and its attachments go (the volet: "the attachments sent with the original
(IHE_XDM.zip and the PDF) must be given back as attachments of the MDN"):

- in both forms, the third part is `message/rfc822` holding the original byte for byte (line ends
  made CRLF), with all its attachments: the volet requires that part for every MDN, and it is what
  lets the receiving platform tie the MDN to the document;
- in the error form only, each attachment of the original is *also* attached at the top level,
  after the three report parts, decoded bytes unchanged: that is where the published volet's text
  and example (an error MDN) put them, because after an error the sender must be able to correct
  and resubmit the documents; receiving platforms built to that version look for them there;
- the success form carries no top-level copies: nothing is to be resubmitted, and copies would
  double the size of every acknowledged exchange in parts RFC 6522 §3 does not define.

`reattach=` overrides that choice (ANS has a pending change proposal that drops the top-level
copies and moves the error text to the `Error:` field: this module already writes that `Error:`
field, RFC 8098 §3.2.7, beside the published `Disposition` form, so both readings find it).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from email import policy
from email.headerregistry import AddressHeader, HeaderRegistry
from email.message import EmailMessage, Message, MIMEPart
from email.parser import BytesParser
from email.utils import format_datetime
from typing import Any, cast

from gateway.addresses import AddressError, parse_mailbox
from gateway.dsn import assemble_report, clean_text, encoded_text, field, new_message_id, text_part, to_crlf
from gateway.errors import GatewayError

log = logging.getLogger(__name__)

_MSGID = re.compile(r"^<[\x21-\x3b\x3d\x3f-\x7e]{1,250}@[\x21-\x3b\x3d\x3f-\x5a\x5e-\x7e]{1,250}>$")
_CODE = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
_ADDRESS_FIELD = re.compile(r"^\s*rfc822\s*;\s*(\S+)\s*$", re.IGNORECASE)
_MAX_REFERENCES = 20
_HEADERS = HeaderRegistry()
_HEADERS.map_to_type("disposition-notification-to", cast(Any, AddressHeader))  # a mixin in typeshed
_PARSE_POLICY = policy.default.clone(header_factory=_HEADERS)
"""The email package's RFC 5322 address parser for `Disposition-Notification-To` (mailbox-list, RFC 8098 §2.1)."""
KO_PREFIX = "[KO Intégration système !]"
DISPOSITION = "automatic-action/MDN-sent-automatically; processed"


class MdnError(GatewayError):
    """An MDN that cannot (or must not) be built; the message says why."""


def mdn_requested(message: bytes, *, return_path: str | None = None) -> str | None:
    """The address an MDN must go to, or None when none may be sent automatically (RFC 8098 §2.1).

    None when `Disposition-Notification-To` is absent, appears more than once, holds other than
    exactly one mailbox, or holds an address the gateway would not accept (addresses.parse_mailbox);
    None as well when the message is itself an MDN (an MDN is never answered by an MDN, §2.1).
    When `return_path` is given (the envelope sender), or the message carries a `Return-Path`, the
    DNT address must be that address (addr-spec only, domain case-insensitive, local part exact):
    otherwise §2.1 wants the user's consent, which an automatic gateway cannot ask for, so None.
    The caller should pass the envelope sender: §2.1 also wants consent when no return path is known
    at all, and a message taken from the spool has no `Return-Path` field yet. Sending at most one MDN
    per message and recipient (§2.1) is the caller's bookkeeping.
    """
    msg = _parse(message)
    if msg is None:
        return None
    try:
        report_type = msg.get_param("report-type")
        if msg.get_content_type() == "multipart/report" and isinstance(report_type, str) \
                and report_type.lower() == "disposition-notification":
            return None
        values = msg.get_all("Disposition-Notification-To") or []
        if len(values) != 1:
            return None
        addresses: tuple[Any, ...] = getattr(values[0], "addresses", ())
        if len(addresses) != 1 or getattr(values[0], "defects", None):
            return None
        dnt = parse_mailbox(addresses[0].addr_spec)
        if return_path is None:
            rp = msg.get("Return-Path")
            return_path = str(rp) if rp is not None else None
        if return_path is not None:
            rp_box = parse_mailbox(return_path.strip().removeprefix("<").removesuffix(">"))
            if rp_box != dnt:
                log.info("no automatic MDN: Disposition-Notification-To differs from the return path")
                return None
        return str(dnt)
    except AddressError:
        return None
    except Exception:  # the email package's header parsers have known crashes on garbage
        log.debug("unparsable Disposition-Notification-To treated as absent", exc_info=True)
        return None


def build_mdn(
    original: bytes,
    *,
    reporting_ua: str,
    final_recipient: str,
    original_recipient: str | None,
    error: tuple[str, str] | None = None,
    now: datetime | None = None,
    reattach: bool | None = None,
) -> bytes:
    """Return a complete CRLF MDN: `multipart/report; report-type=disposition-notification` (RFC 8098 §3).

    Parts: text/plain (French then English; the error code and label in the error form, as the volet
    asks), message/disposition-notification (Reporting-UA §3.2.1, Original-Recipient §3.2.3 when known,
    Final-Recipient §3.2.4, Original-Message-ID §3.2.5, Disposition §3.2.6, Error §3.2.7), message/rfc822
    with the original; then, in the error form (or when `reattach` is true), the original's attachments
    (see the module docstring). From is `final_recipient` (the mailbox the MDN speaks for), To the DNT
    address, Subject the original's (success) or `[KO Intégration système !][<code>] <original subject>`.
    `original_recipient` None means: take the original's `Original-Recipient` field when it has a usable one.
    Raises `MdnError` when the original asks for no MDN, or an argument is unusable.
    """
    to = mdn_requested(original)
    if to is None:
        raise MdnError("the message does not ask for an MDN that may be sent automatically (RFC 8098 §2.1)")
    try:
        final = str(parse_mailbox(final_recipient))
        orig_rcpt = str(parse_mailbox(original_recipient)) if original_recipient is not None else None
    except AddressError as exc:
        raise MdnError(f"recipient address not usable in an MDN: {exc}") from exc
    if error is not None and not _CODE.match(error[0]):
        raise MdnError("the error code must be 1-32 characters of [A-Za-z0-9._-]")
    ua = clean_text(reporting_ua, 200)
    if not ua:
        raise MdnError("reporting_ua must name the agent (RFC 8098 §3.2.1)")
    now = now if now is not None else datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise MdnError("now must be a timezone-aware datetime")

    msg = _parse(original)
    message_id = _message_id(msg, "Message-ID")
    if orig_rcpt is None:
        orig_rcpt = _original_recipient_field(msg)
    subject = clean_text(_header_text(msg, "Subject") or "")
    if error is not None:
        code, label = error[0], clean_text(error[1])
        subject = f"{KO_PREFIX}[{code}] {subject}".rstrip()
    else:
        code, label = "", ""
        subject = subject or "Accusé de traitement / Disposition notification"

    report = [b"Content-Type: message/disposition-notification\r\n\r\n", field("Reporting-UA", encoded_text(ua))]
    if orig_rcpt is not None:
        report.append(field("Original-Recipient", f"rfc822;{orig_rcpt}"))
    report.append(field("Final-Recipient", f"rfc822;{final}"))
    if message_id is not None:
        report.append(field("Original-Message-ID", message_id))
    if error is None:
        report.append(field("Disposition", DISPOSITION))
    else:
        error_text = encoded_text(f"{code}^{label}") if label else code
        report.append(field("Disposition", f"{DISPOSITION}/Error: {error_text}"))
        report.append(field("Error", error_text))

    parts = [text_part(_human_text(final, error is not None, code, label)), b"".join(report),
             _rfc822_part(original)]
    if reattach if reattach is not None else error is not None:
        parts.extend(_reattached(msg))

    top = [("From", final), ("To", to), ("Subject", subject), ("Date", format_datetime(now)),
           ("Message-ID", new_message_id("mdn", final.rpartition("@")[2]))]
    if message_id is not None:
        refs = [r for r in (_header_text(msg, "References") or "").split() if _MSGID.match(r)]
        refs = [r for r in refs if r != message_id][-(_MAX_REFERENCES - 1):] + [message_id]
        top += [("In-Reply-To", message_id), ("References", " ".join(refs))]
    top.append(("Auto-Submitted", "auto-replied"))
    log.info("MDN built (%s) for a message %s", "error" if error is not None else "processed",
             "with a Message-ID" if message_id else "without a usable Message-ID")
    return assemble_report(top, "disposition-notification", parts)


def _human_text(final: str, is_error: bool, code: str, label: str) -> str:
    if is_error:
        fr = (f"Le message ci-dessous n'a pas pu être intégré automatiquement par {final} pour la raison "
              f"suivante : {code} {label}".rstrip())
        en = f"The message below could not be processed automatically by {final}, for this reason: {code} {label}"
        fr += "\nLe message d'origine et ses pièces jointes sont joints, pour correction et nouvel envoi."
        en = en.rstrip() + "\nThe original message and its attachments are enclosed, to correct and send again."
    else:
        fr = f"Le message ci-dessous a été reçu et traité automatiquement par {final}."
        en = f"The message below was received and processed automatically by {final}."
    return f"{fr}\n\n{en}\n"


def _rfc822_part(original: bytes) -> bytes:
    """The original as a message/rfc822 part: never re-encoded (RFC 2046 §5.2.1 allows 7bit/8bit/binary only)."""
    body = to_crlf(original)
    if b"\x00" in body or any(len(line) > 998 for line in body.split(b"\r\n")):
        cte = b"Content-Transfer-Encoding: binary\r\n"
    elif not body.isascii():
        cte = b"Content-Transfer-Encoding: 8bit\r\n"
    else:
        cte = b""
    return b"Content-Type: message/rfc822\r\n" + cte + b"\r\n" + body


def _reattached(msg: EmailMessage | None) -> Iterator[bytes]:
    """The original's attachments as new top-level parts: same type and name, decoded bytes unchanged."""
    if msg is None:
        return
    try:
        parts = list(_leaf_attachments(msg))
    except Exception:  # a damaged structure: the attachments stay inside the message/rfc822 part
        log.debug("attachments not listed", exc_info=True)
        return
    for part in parts:
        try:
            data = part.get_payload(decode=True)
            if not isinstance(data, bytes):
                continue
            name = part.get_filename()
            new = MIMEPart(policy=policy.SMTP)
            new.set_content(data, part.get_content_maintype(), part.get_content_subtype(),
                            disposition="attachment", filename=clean_text(name, 200) if name else None)
            yield new.as_bytes(policy=policy.SMTP)
        except Exception:  # a damaged attachment stays inside the message/rfc822 part
            log.debug("attachment not re-attached", exc_info=True)


def _leaf_attachments(part: Message) -> Iterator[Message]:
    if part.get_content_maintype() == "multipart":
        payload = part.get_payload()
        if isinstance(payload, list):
            for sub in payload:
                if isinstance(sub, Message):
                    yield from _leaf_attachments(sub)
    elif part.get_content_maintype() != "message" and (
            part.get_content_disposition() == "attachment" or part.get_filename()):
        yield part


def _parse(message: bytes) -> EmailMessage | None:
    try:
        msg = BytesParser(policy=_PARSE_POLICY).parsebytes(message)
    except Exception:
        log.debug("unparsable message", exc_info=True)
        return None
    assert isinstance(msg, EmailMessage)
    return msg


def _header_text(msg: EmailMessage | None, name: str) -> str | None:
    if msg is None:
        return None
    try:
        value = msg.get(name)
        return None if value is None else str(value)
    except Exception:  # known crashes of the header parsers on garbage
        log.debug("unparsable %s treated as absent", name, exc_info=True)
        return None


def _message_id(msg: EmailMessage | None, name: str) -> str | None:
    value = (_header_text(msg, name) or "").strip()
    return value if _MSGID.match(value) else None


def _original_recipient_field(msg: EmailMessage | None) -> str | None:
    """The `Original-Recipient` field the receiving MTA added (RFC 8098 §2.3), when it is a usable address."""
    m = _ADDRESS_FIELD.match(_header_text(msg, "Original-Recipient") or "")
    if m is None:
        return None
    try:
        return str(parse_mailbox(m.group(1)))
    except AddressError:
        return None
