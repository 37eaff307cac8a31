"""DSN builder (RFC 3464 / RFC 6522): the output parsed back with the email package, field by field."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import parseaddr, parsedate_to_datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.dsn import DsnError, NullSenderError, RecipientStatus, build_dsn

NOW = datetime(2026, 11, 25, 20, 0, tzinfo=UTC)
SECRET = "CORPS-SECRET-PATIENT-7731"


def original(subject: str = "XDM/1.0/DDM+Compte rendu DUPONT Élise 01/02/1960") -> bytes:
    msg = EmailMessage()
    msg["From"] = "Jeanne Exemple <jeanne@a.mssante.test>"
    msg["To"] = "bob@b.mssante.test, carl@c.mssante.test"
    msg["Subject"] = subject
    msg["Message-ID"] = "<orig.1@a.mssante.test>"
    msg.set_content(f"Bonjour,\n{SECRET}\n")
    msg.add_attachment(SECRET.encode() * 3, maintype="application", subtype="zip", filename="IHE_XDM.ZIP")
    return msg.as_bytes(policy=policy.SMTP)


FAILED = RecipientStatus("bob@b.mssante.test", "failed", "5.1.1", "550 5.1.1 <bob@b.mssante.test>: no such user",
                         remote_mta="mx.b.mssante.test", last_attempt=NOW)
DELAYED = RecipientStatus("carl@c.mssante.test", "delayed", "4.4.1", "451 4.4.1 connection timed out",
                          remote_mta="mx.c.mssante.test", last_attempt=NOW - timedelta(minutes=5),
                          will_retry_until=NOW + timedelta(days=4))


def build(recipients: list[RecipientStatus], raw: bytes | None = None, **kw: Any) -> bytes:
    args: dict[str, Any] = {"original": original() if raw is None else raw,
                            "envelope_sender": "jeanne@a.mssante.test", "queue_id": "Q7AB12",
                            "reporting_mta": "mx.a.mssante.test", "arrival": NOW - timedelta(hours=4),
                            "recipients": recipients, "now": NOW}
    args.update(kw)
    return build_dsn(**args)


def parse(data: bytes) -> EmailMessage:
    msg = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(msg: EmailMessage) -> list[Message]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return [p for p in payload if isinstance(p, Message)]


def status_blocks(msg: EmailMessage) -> list[Message]:
    report = parts(msg)[1]
    assert report.get_content_type() == "message/delivery-status"
    blocks = report.get_payload()
    assert isinstance(blocks, list)
    return [b for b in blocks if isinstance(b, Message)]


def test_failure_and_delay_in_one_report_every_field() -> None:
    data = build([FAILED, DELAYED], original_envelope_id="ENV-42")
    msg = parse(data)
    assert not msg.defects
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    types = [p.get_content_type() for p in parts(msg)]
    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]

    name, addr = parseaddr(str(msg["From"]))
    assert (name, addr) == ("Passerelle MSSanté", "MAILER-DAEMON@mx.a.mssante.test")
    assert str(msg["To"]) == "jeanne@a.mssante.test"
    assert str(msg["Subject"]) == "Échec de remise / Delivery failure"
    assert parsedate_to_datetime(str(msg["Date"])) == NOW
    assert re.fullmatch(r"<[^<>@\s]+@mx\.a\.mssante\.test>", str(msg["Message-ID"]))
    assert str(msg["Auto-Submitted"]) == "auto-replied"
    assert str(msg["MIME-Version"]) == "1.0"

    per_message, bob, carl = status_blocks(msg)
    assert per_message["Original-Envelope-Id"] == "ENV-42"
    assert per_message["Reporting-MTA"] == "dns; mx.a.mssante.test"
    assert parsedate_to_datetime(per_message["Arrival-Date"]) == NOW - timedelta(hours=4)
    assert bob["Final-Recipient"] == "rfc822; bob@b.mssante.test"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.b.mssante.test"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@b.mssante.test>: no such user"
    assert parsedate_to_datetime(bob["Last-Attempt-Date"]) == NOW
    assert bob["Will-Retry-Until"] is None
    assert carl["Final-Recipient"] == "rfc822; carl@c.mssante.test"
    assert carl["Action"] == "delayed"
    assert carl["Status"] == "4.4.1"
    assert carl["Diagnostic-Code"] == "smtp; 451 4.4.1 connection timed out"
    assert parsedate_to_datetime(carl["Will-Retry-Until"]) == NOW + timedelta(days=4)

    text = parts(msg)[0]
    assert isinstance(text, EmailMessage)
    human = text.get_content()
    assert human.index("Votre message n'a pas pu être remis à bob@b.mssante.test") < human.index(
        "Your message could not be delivered to bob@b.mssante.test")
    assert "continue d'essayer jusqu'au 29/11/2026 20:00 UTC" in human
    assert "keeps trying until 29/11/2026 20:00 UTC" in human
    assert "Q7AB12" in human


def test_delay_only_has_the_delay_subject_and_no_envelope_id() -> None:
    msg = parse(build([DELAYED]))
    assert str(msg["Subject"]) == "Remise retardée / Delivery delayed"
    per_message, carl = status_blocks(msg)
    assert per_message["Original-Envelope-Id"] is None
    assert carl["Action"] == "delayed"


def test_crlf_everywhere_and_folded_headers() -> None:
    data = build([FAILED, DELAYED])
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    head = data.split(b"\r\n\r\n", 1)[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    assert head.isascii()
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))


def test_headers_part_keeps_the_original_headers_and_never_the_body() -> None:
    raw = original()
    data = build([FAILED], raw=raw)
    assert SECRET.encode() not in data
    assert b"Q09SUFMtU0VDUkVU" not in data  # nor the attachment (base64 of the secret)
    headers = parts(parse(data))[2]
    assert headers.get_content_type() == "text/rfc822-headers"
    block = headers.get_payload(decode=True)
    assert isinstance(block, bytes)
    assert block == raw.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    inner = parse(block)
    assert str(inner["Subject"]) == "XDM/1.0/DDM+Compte rendu DUPONT Élise 01/02/1960"
    assert str(inner["Message-ID"]) == "<orig.1@a.mssante.test>"


def test_a_body_without_blank_line_does_not_leak() -> None:
    raw = b"From: jeanne@a.mssante.test\nSubject: x\n" + SECRET.encode() + b" pas un en-tete\nTo: b@c.test\n"
    data = build([FAILED], raw=raw)
    assert SECRET.encode() not in data
    block = parts(parse(data))[2].get_payload(decode=True)
    assert block == b"From: jeanne@a.mssante.test\r\nSubject: x\r\n"


def test_injected_line_breaks_in_a_remote_reply_stay_in_one_field() -> None:
    bad = RecipientStatus("bob@b.mssante.test", "failed", "5.7.1", "550 5.7.1 no\r\nAction: delivered\r\n\r\nX: y")
    (_, bob) = status_blocks(parse(build([bad])))
    assert bob.get_all("Action") == ["failed"]
    assert bob["X"] is None
    assert bob["Diagnostic-Code"] == "smtp; 550 5.7.1 no Action: delivered X: y"


def test_non_ascii_remote_reply_keeps_the_report_7bit() -> None:
    odd = RecipientStatus("bob@b.mssante.test", "failed", "5.1.1", "550 5.1.1 boîte inconnue")
    data = build([odd])
    report = data.split(b"message/delivery-status", 1)[1].split(b"text/rfc822-headers", 1)[0]
    assert report.isascii()
    (_, bob) = status_blocks(parse(data))
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 bo\\xeete inconnue"


@pytest.mark.parametrize("sender", ["", "<>", "  "])
def test_no_dsn_for_a_null_sender(sender: str) -> None:
    with pytest.raises(NullSenderError):
        build([FAILED], envelope_sender=sender)


@pytest.mark.parametrize(("kw", "recipients"), [
    ({}, []),
    ({}, [RecipientStatus("bob@b.mssante.test", "failed", "4.4.1", "451 later")]),
    ({}, [RecipientStatus("bob@b.mssante.test", "delayed", "5.1.1", "550 no")]),
    ({}, [RecipientStatus("bob@b.mssante.test", "failed", "550", "550 no")]),
    ({}, [RecipientStatus("bob@b.mssante.test", "bounced", "5.1.1", "550 no")]),  # type: ignore[arg-type]
    ({}, [RecipientStatus("bob@b.mssante.test\r\nBcc: x@y.test", "failed", "5.1.1", "550 no")]),
    ({}, [RecipientStatus("bob@b.mssante.test", "failed", "5.1.1", "550 no", remote_mta="mx b")]),
    ({}, [RecipientStatus("bob@b.mssante.test", "failed", "5.1.1", "550 no", last_attempt=datetime(2026, 1, 1))]),
    ({"envelope_sender": "@a,@b:x@y.test"}, [FAILED]),
    ({"queue_id": "Q 1"}, [FAILED]),
    ({"reporting_mta": "mx a\r\nX: y"}, [FAILED]),
    ({"arrival": datetime(2026, 1, 1)}, [FAILED]),
    ({"original_envelope_id": "a b"}, [FAILED]),
])
def test_unusable_input_is_a_typed_error(kw: dict[str, Any], recipients: list[RecipientStatus]) -> None:
    with pytest.raises(DsnError):
        build(recipients, **kw)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(head=st.binary(max_size=400))
def test_random_header_bytes_never_crash_and_never_leak_the_body(head: bytes) -> None:
    raw = head + b"\r\n\r\n" + SECRET.encode() + b"\r\n"
    data = build([FAILED, DELAYED], raw=raw)
    msg = parse(data)
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert SECRET.encode() not in data or SECRET.encode() in head
    assert b"\n" not in data.replace(b"\r\n", b"")
