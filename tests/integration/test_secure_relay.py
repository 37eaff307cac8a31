"""Two gateways on loopback, one domain each, each with its own PKI, directory and keys (issue 6, item 7):
alice on A writes to bob on B through SMTP submission; A signs with alice's organisation key, encrypts
to bob (certificate from A's directory) and relays over mutually authenticated TLS to B's port-25
listener; B decrypts with bob's key, verifies, marks and delivers; bob reads it over IMAP.
A capturing peer shows what crosses between gateways: S/MIME enveloped data, never the body.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.integration.gateway_support import (
    A,
    B,
    GatewayProcess,
    dev_pkis,
    free_port,
    inbox_messages,
    short_tmpdir,
    two_gateways,
)

C = "c.mssante.test"
PLAIN = "plain.b.mssante.test"  # B's second domain, which A's configuration names in relay.plain_domains
MARKER = "Compte rendu confidentiel 7f3a9c"


@dataclass
class Capture:
    messages: list[bytes]


class _Capturing:
    """A peer gateway that keeps what it receives, and refuses the mailbox `refused@...` (RFC 5321 §4.2.2)."""

    def __init__(self, into: Capture) -> None:
        self.into = into

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address.startswith("refused@"):
            return "550 5.1.1 <refused@c.mssante.test>: no such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.into.messages.append(envelope.original_content or b"")
        return "250 2.0.0 captured"


@dataclass
class World:
    a: GatewayProcess
    b: GatewayProcess
    alice: str
    bob: str
    capture: Capture
    plain_bob: str


@pytest.fixture(scope="module")
def world(dovecot_binary: Path) -> Iterator[World]:
    root = short_tmpdir()
    pki_a, pki_b = dev_pkis(root)
    # The capturing peer for domain C presents B's certificate (a trust-space certificate).
    capture = Capture([])
    peer_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    peer_tls.load_cert_chain(pki_b.tls_server_chain, pki_b.tls_server_key)
    capture_port = free_port()
    peer = Controller(_Capturing(capture), hostname="127.0.0.1", port=capture_port, tls_context=peer_tls,
                      require_starttls=True)
    peer.start()
    # C's certificates are others of PKI B's (nobody decrypts there).
    gws = two_gateways(root, pki_a, pki_b, routes={C: f"[127.0.0.1]:{capture_port}"},
                       mailboxes=[(f"secretariat@{C}", pki_b.practitioners[0].auth_cert),
                                  (f"refused@{C}", pki_b.practitioners[1].auth_cert)], plain_domain=PLAIN,
                       inbound_processes=1)  # B opens bob's mail in a worker process (smime.processes)
    gws.start()
    assert gws.plain_bob is not None
    try:
        yield World(gws.a, gws.b, gws.alice, gws.bob, capture, gws.plain_bob)
    finally:
        gws.stop()
        for name, gw in (("A", gws.a), ("B", gws.b)):
            errors = [line for line in gw.log.read_text().splitlines() if "ERROR" in line or "rror" in line]
            print(f"--- gateway {name}: errors in its log ---", *errors[-20:], sep="\n")  # shown when a test fails
        peer.stop()
        if not os.environ.get("MSSGW_KEEP_TEST_DIRS"):
            shutil.rmtree(root, ignore_errors=True)


def letter(sender: str, to: str, subject: str) -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{time.monotonic_ns()}@{A}>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{MARKER}\r\n").encode()


def wait_for_mail(gw: GatewayProcess, user: str, timeout: float = 30) -> list[bytes]:
    deadline = time.monotonic() + timeout
    with gw.imap(user) as c:
        while True:
            messages = inbox_messages(c)
            if messages or time.monotonic() > deadline:
                return messages
            time.sleep(0.2)


def test_signed_encrypted_relayed_and_verified(world: World) -> None:
    with world.a.smtp(world.alice) as s:
        assert s.sendmail(world.alice, [world.bob], letter(world.alice, world.bob, "Résultats")) == {}
    [received] = wait_for_mail(world.b, world.bob)
    msg = email.message_from_bytes(received, policy=email.policy.default)
    assert msg["MSSGW-Security"].startswith("verified"), msg["MSSGW-Security"]
    assert "smime=pass" in msg["Authentication-Results"]
    assert MARKER.encode() in received


def test_what_crosses_between_gateways_is_enveloped(world: World) -> None:
    with world.a.smtp(world.alice) as s:
        assert s.sendmail(world.alice, [f"secretariat@{C}"], letter(world.alice, f"secretariat@{C}", "Capture")) == {}
    deadline = time.monotonic() + 30
    while not world.capture.messages and time.monotonic() < deadline:
        time.sleep(0.1)
    [crossed] = world.capture.messages
    assert re.search(rb"(?im)^Content-Type: application/(x-)?pkcs7-mime;.*enveloped-data", crossed.replace(b"\r\n\t", b" "))
    assert MARKER.encode() not in crossed


def test_unknown_recipient_and_outside_the_trust_space_are_refused_at_rcpt(world: World) -> None:
    with world.a.smtp(world.alice) as s:
        s.mail(world.alice)
        code, text = s.rcpt(f"nobody@{B}")
        assert (code, text[:5]) == (550, b"5.1.1") and b"not in the MSSant" in text
        code, text = s.rcpt("someone@outside.example")
        assert (code, text[:5]) == (550, b"5.7.1") and b"trust space" in text


def test_a_refusal_by_the_peer_ends_in_a_dsn_in_the_senders_inbox(world: World) -> None:
    refused = f"refused@{C}"
    with world.a.smtp(world.alice) as s:
        assert s.sendmail(world.alice, [refused], letter(world.alice, refused, "Sera refuse")) == {}
    [dsn] = wait_for_mail(world.a, world.alice)
    report = email.message_from_bytes(dsn, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    text = status.as_bytes()
    assert f"Final-Recipient: rfc822; {refused}".encode() in text or f"Final-Recipient: rfc822;{refused}".encode() in text
    assert b"Action: failed" in text and b"Status: 5.1.1" in text
    assert MARKER.encode() not in dsn  # the body never goes back in a notice


def test_xdm_attachment_and_subject_cross_intact(world: World) -> None:
    """An IHE_XDM.ZIP and a `XDM/1.0/DDM+…` subject through signing, encryption, relay, decryption (issue 6, item 6)."""
    zip_bytes = bytes(range(256)) * 40 + b"PK\x05\x06" + b"\x00" * 18  # any bytes: the ZIP must come back identical
    msg = EmailMessage()
    msg["From"], msg["To"] = world.alice, world.bob
    msg["Subject"] = "XDM/1.0/DDM+Compte rendu d'hospitalisation"
    msg.set_content("Document joint au format IHE XDM.\n")
    msg.add_attachment(zip_bytes, maintype="application", subtype="zip", filename="IHE_XDM.ZIP")
    with world.a.smtp(world.alice) as s:
        assert s.sendmail(world.alice, [world.bob], msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))) == {}
    deadline = time.monotonic() + 30
    while True:
        found = [m for m in wait_for_mail(world.b, world.bob) if b"XDM/1.0/DDM+" in m]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    [received] = found
    got = email.message_from_bytes(received, policy=email.policy.default)
    assert got["Subject"] == "XDM/1.0/DDM+Compte rendu d'hospitalisation"
    assert got["MSSGW-Security"].startswith("verified")
    [part] = [p for p in got.walk() if p.get_filename() == "IHE_XDM.ZIP"]
    assert part.get_content() == zip_bytes


def test_a_requested_mdn_comes_back_signed_and_encrypted(world: World) -> None:
    """Disposition-Notification-To on alice's letter: B sends the MSSanté `processed` MDN (mssante.md §1.7) from
    bob's account, signed and encrypted, back through A's port 25 into alice's inbox."""
    mail = letter(world.alice, world.bob, "Avec accuse").replace(
        b"\r\nMIME-Version:", f"\r\nDisposition-Notification-To: {world.alice}\r\nMIME-Version:".encode())
    with world.a.smtp(world.alice) as s:
        assert s.sendmail(world.alice, [world.bob], mail) == {}
    deadline = time.monotonic() + 40
    while True:
        mdns = [m for m in wait_for_mail(world.a, world.alice) if b"disposition-notification" in m]
        if mdns or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    [mdn] = mdns
    report = email.message_from_bytes(mdn, policy=email.policy.default)
    assert report["MSSGW-Security"].startswith("verified")  # it crossed signed and encrypted, like any mail
    assert report.get_param("report-type") == "disposition-notification"
    status = next(p for p in report.walk() if p.get_content_type() == "message/disposition-notification")
    assert b"automatic-action/MDN-sent-automatically; processed" in status.as_bytes()


def test_plain_relay_only_to_the_domains_configured_for_it(world: World) -> None:
    """relay.plain_domains: mail for B's second domain leaves A neither signed nor encrypted (B marks it
    unsigned), in the same run as bob's, which is signed, encrypted and verified; the default is S/MIME."""
    with world.a.smtp(world.alice) as s:
        assert s.sendmail(world.alice, [world.plain_bob], letter(world.alice, world.plain_bob, "En clair")) == {}
        assert s.sendmail(world.alice, [world.bob], letter(world.alice, world.bob, "Chiffre")) == {}
    [plain] = wait_for_mail(world.b, world.plain_bob)
    security = email.message_from_bytes(plain, policy=email.policy.default)["MSSGW-Security"]
    assert security.startswith("unsigned"), security
    assert MARKER.encode() in plain
    deadline = time.monotonic() + 30
    while not (secure := [m for m in wait_for_mail(world.b, world.bob) if b"Subject: Chiffre" in m]):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert email.message_from_bytes(secure[0], policy=email.policy.default)["MSSGW-Security"].startswith("verified")


def test_b_opens_inbound_mail_in_a_worker_process(world: World) -> None:
    """smime.processes = 1: B runs one worker process (spawned by multiprocessing) beside its Dovecot, and the
    mail the other tests read verified was opened there (a key-file recipient)."""
    assert world.b.proc is not None
    children = Path(f"/proc/{world.b.proc.pid}/task/{world.b.proc.pid}/children").read_text().split()
    commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children if Path(f"/proc/{pid}").exists()]
    assert sum(b"spawn_main" in c for c in commands) == 1, commands
