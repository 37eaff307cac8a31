"""secure_inbound: real S/MIME made by smime/ and by `openssl cms`, opened with the development PKI's keys."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import io
import os
import subprocess
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from gateway.devpki import DevPki
from gateway.inbound_security import (
    ErrorCode,
    InboundResult,
    Verdict,
    _ascii,
    authserv_id,
    secure_inbound,
    strip_security_fields,
)
from smime.certpath import TrustStore
from smime.errors import SenderMismatch
from smime.filekeys import FileKey
from smime.limits import ParseLimits
from smime.message import (
    OFFLOAD_BYTES,
    encrypt_entity,
    encrypt_message,
    sign_and_encrypt,
)
from smime.mime import (
    field_name,
    field_value,
    header_fields,
    join_message,
    split_header_body,
    split_message,
)
from smime.signing import sign_entity
from smime.verify import rpps_of

HOST = "mx.gw-b.mssante.test"

ENTITY = (b"Content-Type: text/plain; charset=utf-8\r\n"
          b"Content-Transfer-Encoding: quoted-printable\r\n"
          b"\r\n"
          b"Bonjour,\r\n\r\nCompte rendu de consultation ci-dessous.\r\nR=C3=A9sultats normaux.\r\n")

FORGED = (b"MSSGW-Security: verified; by=" + HOST.encode() + b"; rpps=10000000000\r\n"
          b"Authentication-Results: (forged) " + HOST.upper().encode() + b";\r\n"
          b"\tsmime=pass body.smime-identifier=jeanne@example.test\r\n"
          b"mssgw-security :verified\r\n")
THEIRS = b"Authentication-Results: mx.other.example; smime=pass\r\n"


# --- keys and helpers --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trust(dev_pki: DevPki) -> TrustStore:
    return TrustStore.from_pem(dev_pki.ca_bundle.read_bytes(), dev_pki.crls_pem.read_bytes())


@pytest.fixture(scope="module")
def jeanne(dev_pki: DevPki) -> FileKey:
    p = dev_pki.practitioners[0]
    return FileKey.from_pem(p.sign_key.read_bytes(), p.sign_cert.read_bytes(),
                            chain_pem=dev_pki.personnes_cert.read_bytes())


@pytest.fixture(scope="module")
def paul(dev_pki: DevPki) -> FileKey:
    """The recipient: his authentication (encryption) key, as on his card."""
    p = dev_pki.practitioners[1]
    return FileKey.from_pem(p.auth_key.read_bytes(), p.auth_cert.read_bytes())


@pytest.fixture(scope="module")
def revoked(dev_pki: DevPki) -> FileKey:
    r = dev_pki.revoked
    return FileKey.from_pem(r.sign_key.read_bytes(), r.sign_cert.read_bytes(),
                            chain_pem=dev_pki.personnes_cert.read_bytes())


def outer(dev_pki: DevPki, sender: str | None = None, subject: str = "Consultation") -> list[bytes]:
    return [f"From: Jeanne <{sender or dev_pki.practitioners[0].email}>\r\n".encode(),
            f"To: Paul <{dev_pki.practitioners[1].email}>\r\n".encode(),
            f"Subject: {subject}\r\n".encode(),
            b"Message-ID: <inbound-test@gw-a.mssante.test>\r\n",
            b"Date: Wed, 25 Nov 2026 19:00:00 +0000\r\n"]


def with_forged(message: bytes) -> bytes:
    """Forged security fields in the middle of the header block (after the second field), and a peer's own."""
    block, body = split_header_body(message)
    fields = header_fields(block)
    return b"".join([*fields[:2], FORGED, THEIRS, *fields[2:], b"\r\n", body])


def run(args: Sequence[str | Path], data: bytes | None = None) -> bytes:
    proc = subprocess.run([str(a) for a in args], input=data, capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def openssl_sign_encrypt(dev_pki: DevPki, tmp_path: Path, entity: bytes, *, encrypt: bool = True,
                         sign: bool = True) -> bytes:
    """`openssl cms -sign` (detached, jeanne's signature key) then `-encrypt` to paul, as another agent would."""
    p, q = dev_pki.practitioners[0], dev_pki.practitioners[1]
    src = tmp_path / "entity.eml"
    src.write_bytes(entity)
    if sign:
        signed = run(["openssl", "cms", "-sign", "-in", src, "-signer", p.sign_cert, "-inkey", p.sign_key,
                      "-certfile", dev_pki.personnes_cert, "-md", "sha256", "-binary"])
        src.write_bytes(split_message(signed)[1])
    if encrypt:
        sealed = run(["openssl", "cms", "-encrypt", "-in", src, "-aes256", "-binary", q.auth_cert])
        return join_message(outer(dev_pki), split_message(sealed)[1])
    return join_message(outer(dev_pki), src.read_bytes())


async def receive(raw: bytes, trust: TrustStore, decrypter: FileKey | None, **kwargs: object) -> InboundResult:
    kwargs.setdefault("identity_check", None)
    return await secure_inbound(raw, recipient="paul@gw-b.mssante.test", decrypter=decrypter, trust=trust,
                                hostname=HOST, **kwargs)  # type: ignore[arg-type]


def top_fields(message: bytes) -> list[bytes]:
    return header_fields(split_header_body(message)[0])


def security_values(message: bytes) -> list[str]:
    return [field_value(f) for f in top_fields(message) if field_name(f) == "mssgw-security"]


def our_auth_results(message: bytes) -> list[str]:
    return [field_value(f) for f in top_fields(message)
            if field_name(f) == "authentication-results" and authserv_id(field_value(f)) == HOST]


def assert_marked(result: InboundResult) -> None:
    """Our two fields come first, once each, and say the verdict; no line is longer than RFC 5322 allows."""
    fields = top_fields(result.message)
    assert field_name(fields[0]) == "mssgw-security"
    assert field_name(fields[1]) == "authentication-results"
    assert security_values(result.message) == [field_value(fields[0])]
    assert field_value(fields[0]).split(";")[0] == result.verdict.value
    assert f"by={HOST}" in field_value(fields[0])
    assert our_auth_results(result.message) == [field_value(fields[1])]
    assert all(f.isascii() and all(len(line) <= 998 for line in f.splitlines()) for f in fields[:2])


def assert_delivered_as_received(result: InboundResult, raw: bytes) -> None:
    """A failure: the original, byte for byte, as a message/rfc822 attachment under a bilingual note."""
    assert result.verdict is Verdict.FAILED
    assert_marked(result)
    assert result.message.count(raw) == 1
    msg = email.message_from_bytes(result.message, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/mixed"
    note, original = list(msg.iter_parts())
    assert note.get_content_type() == "text/plain"
    text = note.get_content()
    assert "Motif" in text and "Reason:" in text and text.index("Motif") < text.index("Reason:")
    assert "tel qu'il a été reçu" in text and "exactly as received" in text
    assert original.get_content_type() == "message/rfc822"
    assert msg["Subject"] == next(field_value(f) for f in top_fields(raw) if field_name(f) == "subject")
    assert "pass" not in our_auth_results(result.message)[0].split(";")[1].split()[0]


# --- good messages -----------------------------------------------------------------------------------------------


async def test_signed_and_encrypted_is_verified_and_the_entity_byte_identical(dev_pki, trust, jeanne, paul):
    raw = await sign_and_encrypt(join_message(outer(dev_pki), ENTITY), jeanne, [paul.certificate],
                                 chain=jeanne.chain)
    result = await receive(raw, trust, paul)
    assert result.verdict is Verdict.VERIFIED and result.error_code is None and result.reason is None
    assert result.encrypted and result.cipher == "aes256-cbc"
    assert result.signer_rpps == dev_pki.practitioners[0].rpps
    assert result.sender == dev_pki.practitioners[0].email
    assert_marked(result)
    assert split_message(result.message)[1] == ENTITY
    ours = security_values(result.message)[0]
    assert f"rpps={dev_pki.practitioners[0].rpps}" in ours and "encrypted=yes" in ours
    ar = our_auth_results(result.message)[0]
    assert "smime=pass" in ar and f"body.smime-identifier={dev_pki.practitioners[0].email}" in ar
    assert f"body.smime-serial={jeanne.certificate.serial_number:X}" in ar


async def test_openssl_sign_then_encrypt_is_verified(dev_pki, trust, paul, tmp_path):
    raw = openssl_sign_encrypt(dev_pki, tmp_path, ENTITY)
    result = await receive(raw, trust, paul)
    assert result.verdict is Verdict.VERIFIED, result.reason
    assert split_message(result.message)[1] == ENTITY


async def test_signed_not_encrypted_is_verified_and_says_so(dev_pki, trust, paul, tmp_path):
    raw = openssl_sign_encrypt(dev_pki, tmp_path, ENTITY, encrypt=False)
    result = await receive(raw, trust, paul)
    assert result.verdict is Verdict.VERIFIED and not result.encrypted
    assert "encrypted=no" in security_values(result.message)[0]


async def test_encrypted_not_signed_is_decrypted_unsigned(dev_pki, trust, paul, tmp_path):
    raw = openssl_sign_encrypt(dev_pki, tmp_path, ENTITY, sign=False)
    result = await receive(raw, trust, paul)
    assert result.verdict is Verdict.DECRYPTED_UNSIGNED and result.encrypted and result.signer_rpps is None
    assert_marked(result)
    assert "smime=none" in our_auth_results(result.message)[0]
    assert split_message(result.message)[1] == ENTITY


async def test_plain_message_is_unsigned_and_keeps_its_bytes(dev_pki, trust, paul):
    raw = join_message(outer(dev_pki), ENTITY)
    result = await receive(raw, trust, paul)
    assert result.verdict is Verdict.UNSIGNED and not result.encrypted
    assert_marked(result)
    assert result.message.endswith(raw)
    assert b"smime=none" in result.message


# --- failures: delivered as received, marked, never verified -----------------------------------------------------


@pytest.mark.parametrize("cipher", ["aes256-cbc", "aes256-gcm"])
async def test_tampered_ciphertext_fails_and_the_original_is_delivered(dev_pki, trust, jeanne, paul, cipher):
    sealed = await sign_and_encrypt(join_message(outer(dev_pki), ENTITY), jeanne, [paul.certificate], cipher=cipher)
    head, body = split_header_body(sealed)
    der = bytearray(base64.b64decode(body))
    der[-40] ^= 0x01  # inside the ciphertext (GCM: just before the tag)
    raw = head + b"\r\n" + base64.encodebytes(bytes(der)).replace(b"\n", b"\r\n")
    result = await receive(raw, trust, paul)
    assert_delivered_as_received(result, raw)
    if cipher == "aes256-gcm":
        assert result.error_code is ErrorCode.DECRYPT
    else:  # a bad pad, or a garbled last block that breaks the signed structure or its digest
        assert result.error_code in (ErrorCode.DECRYPT, ErrorCode.MALFORMED, ErrorCode.SIGNATURE)
    assert result.reason


async def test_no_recipient_info_for_our_key_fails_and_is_delivered(dev_pki, trust, jeanne, paul):
    org = x509.load_pem_x509_certificate(dev_pki.organisation.cert.read_bytes())
    raw = await sign_and_encrypt(join_message(outer(dev_pki), ENTITY), jeanne, [org])
    result = await receive(raw, trust, paul)
    assert_delivered_as_received(result, raw)
    assert result.error_code is ErrorCode.NO_KEY and "RecipientInfo" in (result.reason or "")
    assert "encrypted=unknown" in security_values(result.message)[0]
    assert "smime=permerror" in our_auth_results(result.message)[0]
    assert "pas pu être déchiffré" in result.message.decode("utf-8", "replace") or b"d=C3=A9chiffr" in result.message


async def test_encrypted_without_a_key_for_the_recipient_fails(dev_pki, trust, jeanne, paul):
    raw = await sign_and_encrypt(join_message(outer(dev_pki), ENTITY), jeanne, [paul.certificate])
    result = await receive(raw, trust, None)
    assert_delivered_as_received(result, raw)
    assert result.error_code is ErrorCode.NO_KEY


async def test_revoked_signer_fails_with_the_reason(dev_pki, trust, revoked, paul):
    sender = dev_pki.revoked.email
    raw = await sign_and_encrypt(join_message(outer(dev_pki, sender), ENTITY), revoked, [paul.certificate],
                                 chain=revoked.chain)
    result = await receive(raw, trust, paul)
    assert_delivered_as_received(result, raw)
    assert result.error_code is ErrorCode.REVOKED and "revoked" in (result.reason or "")
    assert result.signer_rpps == dev_pki.revoked.rpps and not result.transient
    assert "smime=fail" in our_auth_results(result.message)[0]
    assert "code=SMIME-REVOKED" in security_values(result.message)[0]


async def test_signature_over_altered_content_fails(dev_pki, trust, jeanne, paul):
    signed = await sign_entity(ENTITY, jeanne)
    raw = join_message(outer(dev_pki), signed.replace(b"normaux", b"anormaux"))
    result = await receive(raw, trust, paul)
    assert_delivered_as_received(result, raw)
    assert result.error_code is ErrorCode.SIGNATURE


async def test_identity_hook_refusing_the_rpps_is_not_verified(dev_pki, trust, jeanne, paul):
    calls: list[tuple[str | None, str | None]] = []

    async def directory_says_no(cert: x509.Certificate, sender: str | None) -> str:
        calls.append((rpps_of(cert), sender))
        raise SenderMismatch(sender, f"RPPS {rpps_of(cert)} is not the directory entry of {sender}")

    raw = await sign_and_encrypt(join_message(outer(dev_pki), ENTITY), jeanne, [paul.certificate])
    result = await receive(raw, trust, paul, identity_check=directory_says_no)
    assert calls == [(dev_pki.practitioners[0].rpps, dev_pki.practitioners[0].email)]
    assert_delivered_as_received(result, raw)
    assert result.error_code is ErrorCode.IDENTITY and "directory entry" in (result.reason or "")
    assert "smime=policy" in our_auth_results(result.message)[0]


async def test_identity_hook_accepting_the_rpps_verifies(dev_pki, trust, jeanne, paul):
    async def directory_says_yes(cert: x509.Certificate, sender: str | None) -> str:
        if rpps_of(cert) != dev_pki.practitioners[0].rpps:
            raise SenderMismatch(sender, "wrong RPPS")
        return f"RPPS {rpps_of(cert)} holds {sender}"

    raw = await sign_and_encrypt(join_message(outer(dev_pki), ENTITY), jeanne, [paul.certificate])
    result = await receive(raw, trust, paul, identity_check=directory_says_yes)
    assert result.verdict is Verdict.VERIFIED


async def test_default_identity_check_is_the_from_address(dev_pki, trust, jeanne, paul):
    """identity_check=None is never "no check": a From not in the certificate fails."""
    raw = await sign_and_encrypt(join_message(outer(dev_pki, "someone.else@gw-a.mssante.test"), ENTITY), jeanne,
                                 [paul.certificate])
    result = await receive(raw, trust, paul, identity_check=None)
    assert result.verdict is Verdict.FAILED and result.error_code is ErrorCode.IDENTITY


async def test_a_bug_in_the_hook_is_not_turned_into_a_verdict(dev_pki, trust, jeanne, paul):
    async def broken(cert: x509.Certificate, sender: str | None) -> str:
        raise RuntimeError("programming error")

    raw = await sign_and_encrypt(join_message(outer(dev_pki), ENTITY), jeanne, [paul.certificate])
    with pytest.raises(RuntimeError):
        await receive(raw, trust, paul, identity_check=broken)


async def test_nesting_beyond_the_limit_fails_and_is_delivered(dev_pki, trust, paul):
    raw = join_message(outer(dev_pki), ENTITY)
    for _ in range(6):
        raw = encrypt_message(raw, [paul.certificate])
    result = await receive(raw, trust, paul)
    assert_delivered_as_received(result, raw)
    assert result.error_code is ErrorCode.MALFORMED and "nested" in (result.reason or "")


async def test_the_configured_parse_limits_apply(dev_pki, trust, jeanne, paul):
    """`[limits]` reaches the opening: a signed message within the defaults fails, delivered as received, under
    a lower CMS size limit; the same message with the default limits is verified."""
    raw = await sign_and_encrypt(join_message(outer(dev_pki), ENTITY), jeanne, [paul.certificate])
    assert (await receive(raw, trust, paul)).verdict is Verdict.VERIFIED
    result = await receive(raw, trust, paul, limits=ParseLimits(max_cms_bytes=1024))
    assert_delivered_as_received(result, raw)
    assert result.verdict is Verdict.FAILED and "1024" in (result.reason or "")


async def test_garbage_pkcs7_fails_and_is_delivered(dev_pki, trust, paul):
    raw = join_message(outer(dev_pki), b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
                                       b"Content-Transfer-Encoding: base64\r\n\r\nbm90IGEgQ01TIHN0cnVjdHVyZQ==\r\n")
    result = await receive(raw, trust, paul)
    assert_delivered_as_received(result, raw)
    assert result.error_code is ErrorCode.MALFORMED


async def test_too_large_is_not_opened_but_delivered(dev_pki, trust, paul):
    raw = join_message(outer(dev_pki), ENTITY)
    result = await receive(raw, trust, paul, max_bytes=len(raw) - 1)
    assert_delivered_as_received(result, raw)
    assert result.error_code is ErrorCode.TOO_LARGE


# --- forged security fields --------------------------------------------------------------------------------------


SCENARIOS = ["verified", "openssl", "plain", "decrypted-unsigned", "tampered", "no-key", "revoked"]


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_forged_fields_are_stripped_in_every_case(dev_pki, trust, jeanne, paul, revoked, tmp_path, scenario):
    message = join_message(outer(dev_pki), ENTITY)
    recipients = [paul.certificate]
    if scenario in ("verified", "tampered"):
        raw = await sign_and_encrypt(message, jeanne, recipients)
    elif scenario == "openssl":
        raw = openssl_sign_encrypt(dev_pki, tmp_path, ENTITY)
    elif scenario == "plain":
        raw = message
    elif scenario == "decrypted-unsigned":
        raw = encrypt_message(message, recipients)
    elif scenario == "no-key":
        raw = await sign_and_encrypt(message, jeanne, [x509.load_pem_x509_certificate(
            dev_pki.organisation.cert.read_bytes())])
    else:
        raw = await sign_and_encrypt(join_message(outer(dev_pki, dev_pki.revoked.email), ENTITY), revoked,
                                     recipients)
    if scenario == "tampered":
        raw = raw[:-200] + (b"A" if raw[-200:-199] != b"A" else b"B") + raw[-199:]
    forged = with_forged(raw)
    result = await receive(forged, trust, paul)
    expected = {"verified": Verdict.VERIFIED, "openssl": Verdict.VERIFIED, "plain": Verdict.UNSIGNED,
                "decrypted-unsigned": Verdict.DECRYPTED_UNSIGNED}.get(scenario, Verdict.FAILED)
    assert result.verdict is expected
    assert_marked(result)  # exactly one MSSGW-Security and one Authentication-Results of ours, on top
    assert result.stripped == 3
    theirs = [f for f in top_fields(result.message) if f == THEIRS]
    assert len(theirs) == 1  # a peer's own results are left alone (and copied above the note on a failure)
    if expected is not Verdict.VERIFIED:
        assert not any(v.startswith("verified") for v in security_values(result.message))


async def test_forged_field_inside_the_signed_entity_is_stripped(dev_pki, trust, jeanne, paul):
    """The decrypted entity's header block joins the top-level header: what the sender put there goes."""
    inner = (b"Content-Type: text/plain; charset=us-ascii\r\n"
             b"MSSGW-Security: verified; by=" + HOST.encode() + b"\r\n"
             b"Authentication-Results: " + HOST.encode() + b"; smime=pass\r\n\r\nHello\r\n")
    raw = join_message(outer(dev_pki), encrypt_entity(await sign_entity(inner, jeanne), [paul.certificate]))
    assert b"MSSGW-Security" not in raw
    result = await receive(raw, trust, paul)
    assert result.verdict is Verdict.VERIFIED and result.stripped == 2
    assert_marked(result)
    assert result.message.endswith(b"\r\n\r\nHello\r\n")


async def test_forged_field_inside_a_direct_wrapped_message_is_stripped(dev_pki, trust, jeanne, paul):
    """Direct-style wrapping (message/rfc822 inside the signature): the wrapped header is cleaned too."""
    wrapped = b"".join(outer(dev_pki)) + b"MSSGW-Security: verified\r\n\r\nHello\r\n"
    inner = b"Content-Type: message/rfc822\r\n\r\n" + wrapped
    raw = await sign_and_encrypt(join_message(outer(dev_pki), inner), jeanne, [paul.certificate])
    result = await receive(raw, trust, paul)
    assert result.verdict is Verdict.VERIFIED and result.stripped == 1
    assert result.message.count(b"MSSGW-Security") == 1


def test_strip_keeps_every_other_byte():
    message = (b"Received: from a\r\n by b\r\nMSSGW-Security: verified;\r\n\tby=" + HOST.encode() + b"\r\n"
               b"Authentication-Results: " + HOST.encode() + b".; smime=pass\r\n" + THEIRS +
               b"Subject: x\r\n\r\nMSSGW-Security: verified\r\n")
    cleaned, removed = strip_security_fields(message, HOST)
    assert removed == 2
    assert cleaned == b"Received: from a\r\n by b\r\n" + THEIRS + b"Subject: x\r\n\r\nMSSGW-Security: verified\r\n"


def test_authserv_id():
    assert authserv_id("(comment) MX.Example.;\r\n smime=pass") == "mx.example"
    assert authserv_id('"mx.example" 1; none') == "mx.example"
    assert authserv_id("") == ""


# --- XDM ---------------------------------------------------------------------------------------------------------


def xdm_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("INDEX.HTM", "<html><body>IHE XDM</body></html>")
        z.writestr("IHE_XDM/SUBSET01/METADATA.XML", "<SubmitObjectsRequest/>")
        z.writestr("IHE_XDM/SUBSET01/DOC0001.XML", "<ClinicalDocument>" + "é" * 3000 + "</ClinicalDocument>")
    return buf.getvalue() + bytes(range(256))  # trailing binary: every byte value must survive


def xdm_entity(payload: bytes) -> bytes:
    b = b"----=_xdm_boundary_1"
    return b"".join([
        b'Content-Type: multipart/mixed; boundary="', b, b'"\r\n\r\n',
        b"--", b, b"\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nDocument joint.\r\n",
        b"--", b, (b'\r\nContent-Type: application/zip; name="IHE_XDM.ZIP"\r\n'
                   b"Content-Transfer-Encoding: base64\r\n"
                   b'Content-Disposition: attachment; filename="IHE_XDM.ZIP"\r\n\r\n'),
        base64.encodebytes(payload).replace(b"\n", b"\r\n"),
        b"--", b, b"--\r\n",
    ])


@pytest.mark.parametrize("agent", ["smime", "openssl"])
async def test_xdm_attachment_and_subject_come_out_byte_identical(dev_pki, trust, jeanne, paul, tmp_path, agent):
    payload = xdm_zip()
    entity = xdm_entity(payload)
    subject = "XDM/1.0/DDM+Compte rendu de biologie"
    if agent == "smime":
        raw = await sign_and_encrypt(join_message(outer(dev_pki, subject=subject), entity), jeanne,
                                     [paul.certificate], chain=jeanne.chain)
    else:
        raw = openssl_sign_encrypt(dev_pki, tmp_path, entity).replace(b"Subject: Consultation",
                                                                     f"Subject: {subject}".encode())
    result = await receive(raw, trust, paul)
    assert result.verdict is Verdict.VERIFIED, result.reason
    assert split_message(result.message)[1] == entity
    msg = email.message_from_bytes(result.message, policy=email.policy.default)
    assert msg["Subject"] == subject
    zips = [p for p in msg.walk() if p.get_filename() == "IHE_XDM.ZIP"]
    assert len(zips) == 1 and zips[0].get_payload(decode=True) == payload


# --- big messages: opened off the gateway's loop, the key and the hook called back on it -----------------------


class LoopRecordingKey:
    """Paul's key, noting on which loop and thread each RSA step runs (a card must be used from the gateway's)."""

    def __init__(self, key: FileKey) -> None:
        self.key = key
        self.calls: list[tuple[asyncio.AbstractEventLoop, int]] = []

    @property
    def certificate(self) -> x509.Certificate:
        return self.key.certificate

    async def decrypt_key(self, encrypted_key: bytes, **kwargs: Any) -> bytes:
        self.calls.append((asyncio.get_running_loop(), threading.get_ident()))
        return await self.key.decrypt_key(encrypted_key, **kwargs)


@pytest.mark.parametrize("tamper", [False, True])
async def test_big_message_key_and_hook_run_on_the_gateways_loop(dev_pki, trust, jeanne, paul, tamper):
    payload = os.urandom(OFFLOAD_BYTES)
    entity = xdm_entity(payload)
    raw = await sign_and_encrypt(join_message(outer(dev_pki), entity), jeanne, [paul.certificate])
    if tamper:
        head, body = split_header_body(raw)
        der = bytearray(base64.b64decode(body))
        der[len(der) // 2] ^= 0x01
        raw = head + b"\r\n" + base64.encodebytes(bytes(der)).replace(b"\n", b"\r\n")
    key = LoopRecordingKey(paul)
    hook_calls: list[tuple[asyncio.AbstractEventLoop, int]] = []

    async def directory(cert: x509.Certificate, sender: str | None) -> str:
        hook_calls.append((asyncio.get_running_loop(), threading.get_ident()))
        return "RPPS matches"

    result = await receive(with_forged(raw), trust, key, identity_check=directory)  # type: ignore[arg-type]
    here = (asyncio.get_running_loop(), threading.get_ident())
    assert key.calls == [here]
    if tamper:  # the garbled middle block breaks the digest: checked, then failed
        assert_delivered_as_received(result, with_forged(raw))
        assert result.error_code is ErrorCode.SIGNATURE
    else:
        assert hook_calls == [here]
        assert result.verdict is Verdict.VERIFIED and result.stripped == 3
        assert_marked(result)
        assert split_message(result.message)[1] == entity


async def test_openpgp_signed_is_unsigned_for_us_and_left_intact(dev_pki, trust, paul):
    """RFC 3156 multipart/signed is not S/MIME: not judged, not failed, delivered as it came."""
    entity = (b'Content-Type: multipart/signed; protocol="application/pgp-signature"; micalg=pgp-sha256;\r\n'
              b' boundary="b1"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nHello\r\n--b1\r\n'
              b"Content-Type: application/pgp-signature\r\n\r\n-----BEGIN PGP SIGNATURE-----\r\n"
              b"-----END PGP SIGNATURE-----\r\n--b1--\r\n")
    raw = join_message(outer(dev_pki), entity)
    result = await receive(with_forged(raw), trust, paul)
    assert result.verdict is Verdict.UNSIGNED and "application/pgp-signature" in (result.reason or "")
    assert_marked(result)
    assert result.message.endswith(entity) and result.stripped == 3


@pytest.mark.parametrize("signed", [False, True])
async def test_a_leading_continuation_line_cannot_fold_into_our_field(dev_pki, trust, jeanne, paul, signed):
    """A message opening with white space would continue the field above it: our Authentication-Results."""
    message = join_message(outer(dev_pki), ENTITY)
    raw = await sign_and_encrypt(message, jeanne, [paul.certificate]) if signed else message
    raw = b"\tsmime=pass body.smime-identifier=ceo@example.test\r\n" + raw
    result = await receive(raw, trust, paul, identity_check=None)
    assert_marked(result)
    assert b"ceo@example.test" not in result.message.split(b"\r\n\r\n", 1)[0]
    assert result.stripped == 1


async def test_a_signed_from_other_than_the_header_from_is_not_verified(dev_pki, trust, jeanne, paul):
    """The From a client shows must be the one checked against the signer: a second one inside fails."""
    inner = b"From: Directeur <ceo@gw-b.mssante.test>\r\n" + ENTITY
    raw = join_message(outer(dev_pki), encrypt_entity(await sign_entity(inner, jeanne), [paul.certificate]))
    result = await receive(raw, trust, paul)
    assert_delivered_as_received(result, raw)
    assert result.error_code is ErrorCode.IDENTITY and "ceo@gw-b.mssante.test" in (result.reason or "")


async def test_protected_fields_of_the_signed_content_replace_the_outer_ones(dev_pki, trust, jeanne, paul):
    """RFC 9788-style: Subject and From inside the signature win over the unprotected outer copies."""
    p = dev_pki.practitioners[0]
    inner = f"From: Jeanne EXEMPLE <{p.email}>\r\nSubject: Résultats\r\n".encode() + ENTITY
    raw = join_message(outer(dev_pki, subject="[...]"), encrypt_entity(await sign_entity(inner, jeanne),
                                                                        [paul.certificate]))
    result = await receive(raw, trust, paul)
    assert result.verdict is Verdict.VERIFIED
    names = [field_name(f) for f in top_fields(result.message)]
    assert names.count("from") == 1 and names.count("subject") == 1
    assert [field_value(f) for f in top_fields(result.message) if field_name(f) == "subject"] == ["Résultats"]


@pytest.mark.parametrize("extra", [b"From: ceo@gw-b.mssante.test\r\n", None])
async def test_a_second_from_or_mailbox_in_the_header_is_not_verified(dev_pki, trust, jeanne, paul, extra):
    p = dev_pki.practitioners[0]
    fields = outer(dev_pki)
    if extra is None:
        fields[0] = f"From: Jeanne <{p.email}>, Directeur <ceo@gw-b.mssante.test>\r\n".encode()
    else:
        fields.append(extra)
    raw = await sign_and_encrypt(join_message(fields, ENTITY), jeanne, [paul.certificate])
    result = await receive(raw, trust, paul)
    assert_delivered_as_received(result, raw)
    assert result.error_code is ErrorCode.IDENTITY


@pytest.mark.parametrize(("text", "expected"), [
    ("Jeanne  EXEMPLE ", "Jeanne EXEMPLE"),  # printable ASCII: only the white space is folded
    ("Hélène\tMÜLLER\x00 ﬁn", "Helene MULLER? fin"),  # accents dropped, ligature decomposed, a control as '?'
    ("x" * 400, "x" * 297 + "..."),
])
def test_header_text_is_printable_ascii(text: str, expected: str) -> None:
    assert _ascii(text) == expected
