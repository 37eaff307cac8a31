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
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.devpki import DevPki, create_dev_pki
from tests.integration.gateway_support import GatewayProcess, free_port, short_tmpdir

A, B, C = "a.mssante.test", "b.mssante.test", "c.mssante.test"
MARKER = "Compte rendu confidentiel 7f3a9c"

MSSANTE_HEADER = ("Type de BAL|Adresse BAL|Type Identifiant PP|Identifiant PP|Identification nationale PP|"
                  "Type identifiant structure|Identification Structure|Service de rattachement|Civilité d'exercice|"
                  "Nom d'exercice|Prénom d'exercice|Catégorie profession|Libellé de catégorie profession|"
                  "Code Profession|Libellé Profession|Code savoir-faire|Libellé savoir-faire|Dématérialisation|"
                  "Raison Sociale structure BAL|Enseigne commerciale structure BAL|L2COMPLEMENTLOCALISATION|"
                  "L3COMPLEMENTDISTRIBUTION|L4NUMEROVOIE|L4COMPLEMENTNUMEROVOIE|NL4TYPEVOIE|L4LIBELLEVOIE|"
                  "L5LIEUDITMENTION|L6LIGNEACHEMINEMENT|Code postal|Département|Pays")


def org_row(address: str, siret: str) -> str:
    fields = ["ORG", address, "", "", "", "3", siret, "Secrétariat", "", "", "", "", "", "", "", "", "", "",
              "CENTRE TEST", "", "", "", "1", "", "R", "DES LILAS", "", "75012 PARIS", "75012", "75", "FRANCE"]
    assert len(fields) == 31
    return "|".join(fields)


def whitelist(*domains: str) -> str:
    entries = "".join(f"<Domaine><Nom>{d}</Nom><Description>{d}</Description>"
                      f"<DNCertificatOperateur>CN=gw.{d},O=TEST,C=FR</DNCertificatOperateur></Domaine>"
                      for d in domains)
    return (f'<ListeBlanche xmlns="https://listeblanche.mssante.fr/schema">'
            f"<DateDeGeneration>2026-11-25T03:00:00</DateDeGeneration>{entries}</ListeBlanche>")


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


def _run(gw: GatewayProcess, *args: str) -> None:
    result = gw.mssgw(*args)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def world(dovecot_binary: Path) -> Iterator[World]:
    root = short_tmpdir()
    pki_a: DevPki = create_dev_pki(root / "pki-a", domain=A, gateway_hostname=f"gw.{A}")
    pki_b: DevPki = create_dev_pki(root / "pki-b", domain=B, gateway_hostname=f"gw.{B}")
    anchors, crls = root / "anchors.pem", root / "crls.pem"
    anchors.write_bytes(pki_a.ca_bundle.read_bytes() + pki_b.ca_bundle.read_bytes())
    crls.write_bytes(pki_a.crls_pem.read_bytes() + pki_b.crls_pem.read_bytes())
    alice, bob = pki_a.organisation.email, pki_b.organisation.email
    (root / "trust.xml").write_text(whitelist(A, B, C), encoding="utf-8")

    # The capturing peer for domain C presents B's certificate (a trust-space certificate).
    capture = Capture([])
    peer_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    peer_tls.load_cert_chain(pki_b.tls_server_chain, pki_b.tls_server_key)
    capture_port = free_port()
    peer = Controller(_Capturing(capture), hostname="127.0.0.1", port=capture_port, tls_context=peer_tls,
                      require_starttls=True)
    peer.start()

    def smime(account: str, pki: DevPki) -> str:
        return (f'[smime]\ntrust_anchors = "{anchors}"\ncrls = "{crls}"\n'
                f'keys = [{{ account = "{account}", cert = "{pki.organisation.cert}", '
                f'key = "{pki.organisation.key}" }}]\n')

    inbound = '[inbound]\nlisten = { host = "127.0.0.1", port = INBOUND_PORT }\n'
    b = GatewayProcess(root / "b", pki_b.directory, domain=B, hostname=f"gw.{B}", accounts={bob: "bob-password-1"},
                       ca=anchors, extra=inbound + smime(bob, pki_b))
    a = GatewayProcess(root / "a", pki_a.directory, domain=A, hostname=f"gw.{A}",
                       accounts={alice: "alice-password-1"}, ca=anchors,
                       extra=inbound + smime(alice, pki_a)
                       + f'[relay]\nroutes = {{ "{B}" = "[127.0.0.1]:{b.inbound_port}", '
                         f'"{C}" = "[127.0.0.1]:{capture_port}" }}\n')
    for gw in (a, b):
        _run(gw, "directory", "migrate")
        _run(gw, "directory", "whitelist", str(root / "trust.xml"))
    extract = root / "Extraction_Correspondance_MSSante_202611250300.txt"
    extract.write_text("\n".join([MSSANTE_HEADER, org_row(bob, "30000000000002"),
                                  org_row(f"secretariat@{C}", "30000000000003"),
                                  org_row(f"refused@{C}", "30000000000004")]) + "\n", encoding="utf-8")
    _run(a, "directory", "import", str(extract))
    # A certificate belongs to one mailbox in the directory: C's is another of PKI B's (nobody decrypts there).
    for address, cert in ((bob, pki_b.organisation.cert), (f"secretariat@{C}", pki_b.practitioners[0].auth_cert),
                          (f"refused@{C}", pki_b.practitioners[1].auth_cert)):
        _run(a, "directory", "add-cert", "--address", address, "--usage", "encryption", str(cert))
    b.start()
    a.start()
    try:
        yield World(a, b, alice, bob, capture)
    finally:
        for name, gw in (("A", a), ("B", b)):
            if gw.proc is not None and gw.proc.poll() is None:
                gw.interrupt()
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
            c.select("INBOX")
            _, data = c.search(None, "ALL")
            if data[0].split() or time.monotonic() > deadline:
                return [c.fetch(n, "(BODY.PEEK[])")[1][0][1] for n in data[0].split()]  # type: ignore[index]
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
