"""MDN builder (RFC 8098, MSSanté volet "Structure du MDN"): the output parsed back with the email package."""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.dsn import RecipientStatus, build_dsn
from gateway.mdn import MdnError, build_mdn, mdn_requested

NOW = datetime(2026, 11, 25, 20, 0, tzinfo=UTC)
SUBJECT = "XDM/1.0/DDM+Compte rendu DUPONT Élise 01/02/1960"
ZIP = b"PK\x03\x04" + hashlib.sha256(b"xdm").digest() * 50 + bytes(range(256))
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 3 + b"\n%%EOF\n"


def xdm_message(dnt: str | None = "Service Y <servicey@a.mssante.test>", **extra: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Service Y <servicey@a.mssante.test>"
    msg["To"] = "pfi@b.mssante.test"
    msg["Subject"] = SUBJECT
    msg["Message-ID"] = "<orig.1@a.mssante.test>"
    msg["References"] = "<older.0@a.mssante.test>"
    if dnt is not None:
        msg["Disposition-Notification-To"] = dnt
    for name, value in extra.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("Bonjour, veuillez trouver le compte rendu.\n")
    msg.add_attachment(ZIP, maintype="application", subtype="zip", filename="IHE_XDM.ZIP")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="20260531_CR_d imagerie médicale.pdf")
    return msg.as_bytes(policy=policy.SMTP)


def build(raw: bytes | None = None, **kw: Any) -> bytes:
    args: dict[str, Any] = {"reporting_ua": "pfi.b.mssante.test; Passerelle MSSanté",
                            "final_recipient": "pfi@b.mssante.test", "original_recipient": "pfi@b.mssante.test",
                            "now": NOW}
    args.update(kw)
    return build_mdn(xdm_message() if raw is None else raw, **args)


def parse(data: bytes) -> EmailMessage:
    msg = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(msg: Message) -> list[EmailMessage]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return [p for p in payload if isinstance(p, EmailMessage)]


def report_fields(msg: EmailMessage) -> Message:
    report = parts(msg)[1]
    assert report.get_content_type() == "message/disposition-notification"
    blocks = report.get_payload()
    assert isinstance(blocks, list) and len(blocks) == 1 and isinstance(blocks[0], Message)
    return blocks[0]


def attachments(msg: Message) -> dict[str, bytes]:
    found = {}
    for part in msg.walk():
        name = part.get_filename()
        if name and part.get_content_maintype() != "message":
            data = part.get_payload(decode=True)
            assert isinstance(data, bytes)
            found[name] = data
    return found


def enclosed(msg: EmailMessage) -> EmailMessage:
    """The original, from the third part (message/rfc822)."""
    third = parts(msg)[2]
    assert third.get_content_type() == "message/rfc822"
    inner = third.get_content()
    assert isinstance(inner, EmailMessage)
    return inner


# mdn_requested (RFC 8098 §2.1)

def test_requested_address_is_the_dnt_mailbox() -> None:
    assert mdn_requested(xdm_message()) == "servicey@a.mssante.test"


@pytest.mark.parametrize("raw", [
    xdm_message(dnt=None),
    xdm_message(dnt="not an address"),
    xdm_message(dnt="a@a.mssante.test, b@a.mssante.test"),
    xdm_message(dnt="<@evil.test:victim@a.mssante.test>"),
    xdm_message(dnt='"two words"@a.mssante.test'),
    b"Disposition-Notification-To: a@a.mssante.test\r\nDisposition-Notification-To: b@a.mssante.test\r\n\r\nx",
    b"Disposition-Notification-To: =?utf-8?q?=00?= <\x80\xff@>\r\n\r\nx",
    b"",
])
def test_absent_or_malformed_dnt_asks_for_nothing(raw: bytes) -> None:
    assert mdn_requested(raw) is None


def test_an_mdn_never_asks_for_an_mdn() -> None:
    mdn = build()
    dressed = b"Disposition-Notification-To: servicey@a.mssante.test\r\n" + mdn
    assert mdn_requested(dressed) is None


def test_return_path_must_match_the_dnt_address() -> None:
    raw = xdm_message()
    assert mdn_requested(raw, return_path="servicey@A.MSSANTE.TEST") == "servicey@a.mssante.test"
    assert mdn_requested(raw, return_path="<servicey@a.mssante.test>") == "servicey@a.mssante.test"
    assert mdn_requested(raw, return_path="ServiceY@a.mssante.test") is None  # local part is exact
    assert mdn_requested(raw, return_path="other@a.mssante.test") is None
    assert mdn_requested(b"Return-Path: <other@a.mssante.test>\r\n" + raw) is None
    assert mdn_requested(b"Return-Path: <servicey@a.mssante.test>\r\n" + raw) == "servicey@a.mssante.test"


# build_mdn, success form

def test_processed_mdn_every_field() -> None:
    msg = parse(build())
    assert not msg.defects
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "disposition-notification"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain", "message/disposition-notification", "message/rfc822"]
    assert str(msg["From"]) == "pfi@b.mssante.test"
    assert str(msg["To"]) == "servicey@a.mssante.test"
    assert str(msg["Subject"]) == SUBJECT
    assert parsedate_to_datetime(str(msg["Date"])) == NOW
    assert str(msg["Message-ID"]).startswith("<mdn.") and str(msg["Message-ID"]).endswith("@b.mssante.test>")
    assert str(msg["In-Reply-To"]) == "<orig.1@a.mssante.test>"
    assert str(msg["References"]).split() == ["<older.0@a.mssante.test>", "<orig.1@a.mssante.test>"]
    assert str(msg["Auto-Submitted"]) == "auto-replied"
    assert msg["Disposition-Notification-To"] is None

    fields = report_fields(msg)
    assert fields["Reporting-UA"] == "pfi.b.mssante.test; Passerelle MSSanté"
    assert fields["Original-Recipient"] == "rfc822;pfi@b.mssante.test"
    assert fields["Final-Recipient"] == "rfc822;pfi@b.mssante.test"
    assert fields["Original-Message-ID"] == "<orig.1@a.mssante.test>"
    assert fields["Disposition"] == "automatic-action/MDN-sent-automatically; processed"
    assert fields["Error"] is None
    human = parts(msg)[0].get_content()
    assert "reçu et traité automatiquement par pfi@b.mssante.test" in human
    assert "received and processed automatically" in human


def test_processed_mdn_returns_the_original_and_its_attachments_inside_part_three_only() -> None:
    raw = xdm_message()
    data = build(raw)
    msg = parse(data)
    assert raw in data  # the original, byte for byte
    inner = enclosed(msg)
    assert str(inner["Subject"]) == SUBJECT
    assert attachments(inner) == {"IHE_XDM.ZIP": ZIP, "20260531_CR_d imagerie médicale.pdf": PDF}
    assert len(parts(msg)) == 3


def test_original_recipient_defaults_to_the_field_the_mta_added() -> None:
    raw = b"Original-Recipient: rfc822;boite@b.mssante.test\r\n" + xdm_message()
    assert report_fields(parse(build(raw, original_recipient=None)))["Original-Recipient"] == \
        "rfc822;boite@b.mssante.test"
    assert report_fields(parse(build(xdm_message(), original_recipient=None)))["Original-Recipient"] is None


# build_mdn, error form

def test_error_mdn_subject_disposition_and_text() -> None:
    data = build(error=("902", "Identifiant de patient inconnu"))
    msg = parse(data)
    assert str(msg["Subject"]) == f"[KO Intégration système !][902] {SUBJECT}"
    fields = report_fields(msg)
    assert fields["Disposition"] == \
        "automatic-action/MDN-sent-automatically; processed/Error: 902^Identifiant de patient inconnu"
    assert fields["Error"] == "902^Identifiant de patient inconnu"
    assert fields["Final-Recipient"] == "rfc822;pfi@b.mssante.test"
    human = parts(msg)[0].get_content()
    assert "n'a pas pu être intégré automatiquement" in human
    assert "902 Identifiant de patient inconnu" in human


def test_error_mdn_gives_the_xdm_attachment_back_byte_identical() -> None:
    raw = xdm_message()
    msg = parse(build(raw, error=("902", "Identifiant de patient inconnu")))
    top = parts(msg)
    assert [p.get_content_type() for p in top] == [
        "text/plain", "message/disposition-notification", "message/rfc822", "application/zip", "application/pdf"]
    assert top[3].get_filename() == "IHE_XDM.ZIP"
    assert top[3].get_content_disposition() == "attachment"
    assert top[3].get_payload(decode=True) == ZIP
    assert top[4].get_filename() == "20260531_CR_d imagerie médicale.pdf"
    assert top[4].get_payload(decode=True) == PDF
    assert attachments(enclosed(msg)) == {"IHE_XDM.ZIP": ZIP, "20260531_CR_d imagerie médicale.pdf": PDF}


def test_reattach_overrides_the_default() -> None:
    assert len(parts(parse(build(reattach=True)))) == 5
    assert len(parts(parse(build(error=("906", "Autre"), reattach=False)))) == 3


def test_non_ascii_error_label_stays_7bit_in_the_report_and_decodes() -> None:
    data = build(error=("903", "Identité du patient incohérente"))
    report = data.split(b"message/disposition-notification", 1)[1].split(b"message/rfc822", 1)[0]
    assert report.isascii()
    fields = report_fields(parse(data))
    assert str(fields["Error"]) == "903^Identité du patient incohérente"
    assert str(parse(data)["Subject"]).startswith("[KO Intégration système !][903] XDM/1.0/DDM+")


def test_crlf_and_folded_headers() -> None:
    data = build(error=("902", "Identifiant de patient inconnu " * 5))
    assert b"\n" not in data.replace(b"\r\n", b"")
    head = data.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))


def test_lf_original_is_enclosed_with_crlf() -> None:
    raw = xdm_message().replace(b"\r\n", b"\n")
    data = build(raw)
    assert raw.replace(b"\n", b"\r\n") in data
    assert attachments(enclosed(parse(data)))["IHE_XDM.ZIP"] == ZIP


# degraded input

def test_no_message_id_means_no_original_message_id_and_no_threading() -> None:
    raw = xdm_message().replace(b"Message-ID: <orig.1@a.mssante.test>\r\n", b"")
    msg = parse(build(raw))
    assert report_fields(msg)["Original-Message-ID"] is None
    assert msg["In-Reply-To"] is None and msg["References"] is None
    assert str(msg["Subject"]) == SUBJECT


def test_garbage_message_id_is_left_out() -> None:
    raw = xdm_message().replace(b"<orig.1@a.mssante.test>", b"<orig 1@a>\r\n X-Evil: <x@y>")
    msg = parse(build(raw))
    assert report_fields(msg)["Original-Message-ID"] is None
    assert msg["X-Evil"] is None


def test_no_subject_gets_a_plain_one() -> None:
    raw = xdm_message().replace(f"Subject: {SUBJECT}\r\n".encode(), b"")
    raw = b"\r\n".join(line for line in raw.split(b"\r\n") if not line.startswith(b"Subject:")
                       and not line.startswith(b" =?utf-8?"))
    assert str(parse(build(raw))["Subject"]) == "Accusé de traitement / Disposition notification"
    assert str(parse(build(raw, error=("902", "x")))["Subject"]) == "[KO Intégration système !][902]"


@pytest.mark.parametrize("kw", [
    {"final_recipient": "not an address"},
    {"original_recipient": "a@b\r\nBcc: x@y.test"},
    {"error": ("9 02", "label")},
    {"error": ("", "label")},
    {"reporting_ua": "\r\n"},
    {"now": datetime(2026, 1, 1)},
])
def test_unusable_arguments_are_typed_errors(kw: dict[str, Any]) -> None:
    with pytest.raises(MdnError):
        build(**kw)


def test_a_message_without_dnt_gets_no_mdn() -> None:
    with pytest.raises(MdnError):
        build(xdm_message(dnt=None))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(head=st.binary(max_size=400), error=st.booleans())
def test_random_header_bytes_give_an_mdn_or_a_typed_error(head: bytes, error: bool) -> None:
    raw = b"Disposition-Notification-To: servicey@a.mssante.test\r\n" + head + b"\r\n\r\nbody\r\n"
    try:
        data = build(raw, error=("902", "x") if error else None)
    except MdnError:
        return
    msg = parse(data)
    assert [p.get_content_type() for p in parts(msg)][:3] == [
        "text/plain", "message/disposition-notification", "message/rfc822"]
    assert b"\n" not in data.split(b"\r\n\r\n", 1)[0].replace(b"\r\n", b"")
    mdn_requested(head)  # never raises either


@settings(max_examples=100, deadline=None)
@given(value=st.binary(max_size=120))
def test_random_dnt_values_never_crash(value: bytes) -> None:
    raw = b"Disposition-Notification-To: " + value.replace(b"\r", b"").replace(b"\n", b"") + b"\r\n\r\nx"
    result = mdn_requested(raw)
    assert result is None or "@" in result


# an external parser: Dovecot's own MIME parser, through its imap binary in PREAUTH mode

DOVECOT_IMAP = Path("/usr/lib/dovecot/imap")


def dovecot_fetch(messages: list[bytes], items: str) -> bytes:
    """Put the messages in a maildir and FETCH them through Dovecot (run as nobody: it refuses root)."""
    if not DOVECOT_IMAP.exists() or shutil.which("runuser") is None:
        pytest.skip("Dovecot's imap binary or runuser is missing")
    root = Path(tempfile.mkdtemp(prefix="mssgw-report-"))
    try:
        for sub in ("new", "cur", "tmp"):
            (root / "mail" / sub).mkdir(parents=True)
        for i, message in enumerate(messages, 1):
            (root / "mail" / "new" / f"{i}.eml").write_bytes(message)
        conf = root / "dovecot.conf"
        conf.write_text(f"base_dir = {root}/run\nstate_dir = {root}/state\nlog_path = /dev/stderr\n"
                        f"mail_location = maildir:{root}/mail:INDEX=MEMORY\n")
        cmd = ["env", "USER=tester", f"HOME={root}", str(DOVECOT_IMAP), "-c", str(conf)]
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            root.chmod(0o755)
            for path in [root, *root.rglob("*")]:
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
            cmd = ["runuser", "-u", "nobody", "--", *cmd]
        script = f"a SELECT INBOX\r\nb FETCH 1:* ({items})\r\nc LOGOUT\r\n".encode()
        proc = subprocess.run(cmd, input=script, capture_output=True, timeout=60, check=False)
        assert b"\r\nb OK" in proc.stdout, (proc.stdout[-2000:], proc.stderr[-2000:])
        return proc.stdout
    finally:
        shutil.rmtree(root)


def literal_after(out: bytes, item: bytes) -> bytes:
    """The (literal8 or literal) value that follows `item` in a FETCH response (RFC 3516, RFC 3501)."""
    m = re.search(re.escape(item) + rb" ~?\{(\d+)\}\r\n", out)
    assert m is not None, out[:2000]
    return out[m.end():m.end() + int(m.group(1))]


@pytest.mark.dovecot
def test_dovecot_parses_the_dsn_and_both_mdn_forms() -> None:
    now = NOW
    dsn = build_dsn(original=xdm_message(), envelope_sender="servicey@a.mssante.test", queue_id="Q1",
                    reporting_mta="mx.a.mssante.test", arrival=now - timedelta(hours=4), now=now,
                    recipients=[RecipientStatus("bob@b.mssante.test", "failed", "5.1.1", "550 5.1.1 no such user"),
                                RecipientStatus("carl@c.mssante.test", "delayed", "4.4.1", "451 4.4.1 timeout",
                                                will_retry_until=now + timedelta(days=4))])
    processed = build()
    ko = build(error=("902", "Identifiant de patient inconnu"))
    out = dovecot_fetch([dsn, processed, ko], "BODYSTRUCTURE")
    lines = out.decode("utf-8", "replace").lower().split("\r\n")
    structures = [line for line in lines if line.startswith("* ") and "fetch (bodystructure" in line]
    assert len(structures) == 3
    s_dsn, s_ok, s_ko = structures
    assert '("text" "plain"' in s_dsn and '("message" "delivery-status"' in s_dsn
    assert '("text" "rfc822-headers"' in s_dsn
    assert re.search(r'\) "report" \("report-type" "delivery-status" "boundary" "[^"]+"\) nil nil nil\)\)$', s_dsn)
    assert '"zip"' not in s_dsn
    for s in (s_ok, s_ko):
        assert '"report" ("report-type" "disposition-notification"' in s
        assert '("message" "disposition-notification"' in s
        assert '("message" "rfc822"' in s
    assert s_ok.count('"application" "zip"') == 1  # inside the enclosed original only
    assert s_ko.count('"application" "zip"') == 2  # and again at the top level

    out = dovecot_fetch([ko], "BINARY.PEEK[4] BINARY.PEEK[5] BINARY.PEEK[3.2]")
    assert literal_after(out, b"BINARY[4]") == ZIP
    assert literal_after(out, b"BINARY[5]") == PDF
    assert literal_after(out, b"BINARY[3.2]") == ZIP
