"""Interop with `openssl cms` (OpenSSL 3), both ways: what we write it accepts, what it writes we read.

Every test runs the real binary on files; nothing stands in for it.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.devpki import (
    issue_certificate,
    load_certificate,
    load_private_key,
    practitioner_name,
)
from smime.envelope import decrypt_content, encrypt_content
from smime.message import encrypt_entity, open_message, sign_and_encrypt
from smime.mime import join_message, split_message, split_multipart_signed, to_crlf
from smime.signing import sign_entity
from smime.verify import verify_signed_data

ENTITY = (b"Content-Type: text/plain; charset=utf-8\r\n"
          b"Content-Transfer-Encoding: quoted-printable\r\n"
          b"\r\n"
          b"Bonjour,\r\n\r\nR=C3=A9sultats joints.   \r\n.\r\nFrom the lab\r\n")
OUTER = [b"From: Jeanne EXEMPLE <jeanne.exemple@dev.mssante.test>\r\n",
         b"To: Paul TESTEUR <paul.testeur@dev.mssante.test>\r\n",
         b"Subject: Interop\r\n"]


def run(args: Sequence[str | Path], data: bytes | None = None, *, check: bool = True) -> bytes:
    """Run a real tool; on failure show its stderr, which says why."""
    proc = subprocess.run([str(a) for a in args], input=data, capture_output=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} {args[1]} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def _verify_args(pki, path: Path) -> list:
    """`openssl cms -verify` with CRL checks on the whole chain; OpenSSL 3.0 reads the CRLs from the CAfile."""
    cafile = path.with_name("ca-and-crls.pem")
    cafile.write_bytes(pki.ca_bundle.read_bytes() + pki.crls_pem.read_bytes())
    return ["openssl", "cms", "-verify", "-in", path, "-CAfile", cafile, "-crl_check_all", "-purpose", "smimesign"]


# --- ours -> openssl ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hash_name", ["sha256", "sha384", "sha512"])
@pytest.mark.parametrize("padding", ["pkcs1v15", "pss"])
@pytest.mark.parametrize("detached", [True, False])
def test_openssl_verifies_our_signature(pki, jeanne_sign, tmp_path, hash_name, padding, detached):
    signed = asyncio.run(sign_entity(ENTITY, jeanne_sign, hash_name=hash_name, padding=padding, detached=detached,
                                     chain=jeanne_sign.chain))
    path = tmp_path / "signed.eml"
    path.write_bytes(join_message(OUTER, signed))
    content = run(_verify_args(pki, path))
    assert to_crlf(content) == ENTITY


def test_openssl_rejects_our_signature_when_tampered(pki, jeanne_sign, tmp_path):
    """The counter-check of the test above: the same command fails on an altered message."""
    signed = asyncio.run(sign_entity(ENTITY, jeanne_sign))
    path = tmp_path / "signed.eml"
    path.write_bytes(join_message(OUTER, signed.replace(b"joints", b"jointz")))
    proc = subprocess.run([str(a) for a in _verify_args(pki, path)], capture_output=True, check=False)
    assert proc.returncode != 0 and b"Verification failure" in proc.stderr


@pytest.mark.parametrize("cipher", ["aes128-cbc", "aes256-cbc", "aes128-gcm", "aes256-gcm"])
@pytest.mark.parametrize("key_transport", ["pkcs1v15", "oaep"])
def test_openssl_decrypts_ours(pki, paul_auth, tmp_path, cipher, key_transport):
    p = pki.practitioners[1]
    sealed = encrypt_entity(ENTITY, [paul_auth.certificate], cipher=cipher, key_transport=key_transport)
    path = tmp_path / "sealed.eml"
    path.write_bytes(join_message(OUTER, sealed))
    out = run(["openssl", "cms", "-decrypt", "-in", path, "-recip", p.auth_cert, "-inkey", p.auth_key])
    assert to_crlf(out) == ENTITY


def test_openssl_opens_our_sign_then_encrypt(pki, jeanne_sign, paul_auth, tmp_path):
    p = pki.practitioners[1]
    sealed = asyncio.run(sign_and_encrypt(join_message(OUTER, ENTITY), jeanne_sign, [paul_auth.certificate],
                                          chain=jeanne_sign.chain, cipher="aes256-gcm", key_transport="oaep"))
    path = tmp_path / "sealed.eml"
    path.write_bytes(sealed)
    signed = tmp_path / "signed.eml"
    signed.write_bytes(run(["openssl", "cms", "-decrypt", "-in", path, "-recip", p.auth_cert, "-inkey", p.auth_key]))
    assert to_crlf(run(_verify_args(pki, signed))) == ENTITY


# --- openssl -> ours ---------------------------------------------------------------------------------------------


def _openssl_encrypt(pki, tmp_path, *options: str, outform: str = "SMIME") -> bytes:
    src = tmp_path / "entity.eml"
    src.write_bytes(ENTITY)
    p = pki.practitioners[1]
    return run(["openssl", "cms", "-encrypt", "-in", src, "-outform", outform, "-recip", p.auth_cert, *options])


@pytest.mark.parametrize("options,cipher,transport", [
    (["-aes128"], "aes128-cbc", "pkcs1v15"),
    (["-aes256"], "aes256-cbc", "pkcs1v15"),
    (["-aes-128-gcm"], "aes128-gcm", "pkcs1v15"),
    (["-aes-256-gcm"], "aes256-gcm", "pkcs1v15"),
    (["-aes256", "-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256"], "aes256-cbc", "oaep-sha256"),
    (["-aes-256-gcm", "-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha512"], "aes256-gcm",
     "oaep-sha512"),
])
def test_we_decrypt_openssl(pki, paul_auth, trust, tmp_path, options, cipher, transport):
    out = _openssl_encrypt(pki, tmp_path, *options)
    opened = asyncio.run(open_message(join_message(OUTER, split_message(out)[1]), decrypter=paul_auth, trust=trust))
    (layer,) = opened.layers
    assert layer.decrypted is not None
    assert (layer.decrypted.cipher, layer.decrypted.key_transport) == (cipher, transport)
    assert opened.entity == ENTITY


def test_we_decrypt_openssl_ber_stream(pki, paul_auth, tmp_path):
    """`-stream` writes BER with indefinite lengths and a constructed OCTET STRING (RFC 5652 §2)."""
    der = _openssl_encrypt(pki, tmp_path, "-aes256", "-stream", outform="DER")
    assert der[1] == 0x80  # indefinite length at the top
    assert asyncio.run(decrypt_content(der, paul_auth)).content == ENTITY


def test_we_decrypt_openssl_default_oaep(pki, paul_auth, tmp_path):
    """OpenSSL's OAEP default is SHA-1 with MGF1-SHA-1, encoded as absent parameters (RFC 8017 A.2.1)."""
    der = _openssl_encrypt(pki, tmp_path, "-aes256", "-keyopt", "rsa_padding_mode:oaep", outform="DER")
    decrypted = asyncio.run(decrypt_content(der, paul_auth))
    assert decrypted.content == ENTITY
    assert decrypted.key_transport == "oaep-sha1"


def _openssl_sign(pki, tmp_path, *options: str, entity: bytes = ENTITY) -> bytes:
    src = tmp_path / "entity.eml"
    src.write_bytes(entity)
    p = pki.practitioners[0]
    out = run(["openssl", "cms", "-sign", "-in", src, "-signer", p.sign_cert, "-inkey", p.sign_key,
               "-certfile", pki.personnes_cert, *options])
    return join_message(OUTER, split_message(out)[1])


@pytest.mark.parametrize("options,digest,detached", [
    ([], "sha256", True),
    (["-md", "sha384"], "sha384", True),
    (["-md", "sha512"], "sha512", True),
    (["-nodetach"], "sha256", False),
    (["-keyopt", "rsa_padding_mode:pss"], "sha256", True),
    (["-md", "sha512", "-nodetach", "-keyopt", "rsa_padding_mode:pss"], "sha512", False),
])
def test_we_verify_openssl(pki, trust, tmp_path, options, digest, detached):
    opened = asyncio.run(open_message(_openssl_sign(pki, tmp_path, *options), decrypter=None, trust=trust))
    (report,) = opened.reports
    assert report.valid, report.summary()
    assert report.signer.digest_algorithm == digest and report.detached == detached
    assert report.signer.rpps == "10001234567"
    assert opened.entity == ENTITY


def test_we_verify_openssl_binary(pki, trust, tmp_path):
    """`-binary`: bytes signed as they are (bare LF kept), not turned into canonical CRLF."""
    entity = b"Content-Type: application/octet-stream\n\n\x00\x01binary\nbytes\r\xff"
    opened = asyncio.run(open_message(_openssl_sign(pki, tmp_path, "-binary", entity=entity), decrypter=None,
                                      trust=trust))
    (report,) = opened.reports
    assert report.valid, report.summary()
    assert report.content == entity


def test_we_detect_tampering_of_openssl_signature(pki, trust, tmp_path):
    signed = _openssl_sign(pki, tmp_path).replace(b"joints", b"jointz")
    report = asyncio.run(open_message(signed, decrypter=None, trust=trust)).reports[0]
    assert not report.valid and report.failures[0].name == "message-digest"


def test_we_open_openssl_sign_then_encrypt(pki, paul_auth, trust, tmp_path):
    signed = tmp_path / "signed.eml"
    signed.write_bytes(split_message(_openssl_sign(pki, tmp_path))[1])
    p = pki.practitioners[1]
    sealed = run(["openssl", "cms", "-encrypt", "-in", signed, "-aes256", p.auth_cert])
    opened = asyncio.run(open_message(join_message(OUTER, split_message(sealed)[1]), decrypter=paul_auth,
                                      trust=trust))
    assert [layer.kind for layer in opened.layers] == ["encrypted", "signed"]
    assert opened.reports[0].valid and opened.entity == ENTITY


def test_legacy_x_pkcs7_mime(pki, paul_auth, trust, tmp_path):
    out = _openssl_encrypt(pki, tmp_path, "-aes256").replace(b"application/pkcs7-mime", b"application/x-pkcs7-mime")
    assert b"x-pkcs7-mime" in out
    opened = asyncio.run(open_message(join_message(OUTER, split_message(out)[1]), decrypter=paul_auth, trust=trust))
    assert opened.entity == ENTITY


def test_openssl_reads_our_der_directly(pki, paul_auth, tmp_path):
    p = pki.practitioners[1]
    path = tmp_path / "sealed.der"
    path.write_bytes(encrypt_content(ENTITY, [paul_auth.certificate], cipher="aes128-gcm"))
    out = run(["openssl", "cms", "-decrypt", "-inform", "DER", "-binary", "-in", path, "-recip", p.auth_cert,
               "-inkey", p.auth_key])
    assert out == ENTITY


@pytest.mark.parametrize("curve,md", [(ec.SECP256R1(), "sha256"), (ec.SECP384R1(), "sha384")])
def test_we_verify_openssl_ecdsa(pki, trust, tmp_path, curve, md):
    """ECDSA signers (RFC 8551 §2.2 MUST; the ETT 'GOOD_ECDSA_CERT' case), issued by the PERSONNES CA."""
    key = ec.generate_private_key(curve)
    cert = issue_certificate(load_certificate(pki.personnes_cert), load_private_key(pki.personnes_key),
                             practitioner_name("10001234567", "EXEMPLE", "Jeanne", "Médecin"),
                             key.public_key(),  # type: ignore[arg-type]
                             profile="signature", sans=[x509.RFC822Name("jeanne.exemple@dev.mssante.test")])
    (tmp_path / "ec.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ec.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    src = tmp_path / "entity.eml"
    src.write_bytes(ENTITY)
    out = run(["openssl", "cms", "-sign", "-md", md, "-in", src, "-signer", tmp_path / "ec.crt",
               "-inkey", tmp_path / "ec.key", "-certfile", pki.personnes_cert])
    signed = join_message(OUTER, split_message(out)[1])
    report = asyncio.run(open_message(signed, decrypter=None, trust=trust)).reports[0]
    assert report.valid, report.summary()
    assert report.signer.signature_algorithm == f"{md}_ecdsa"
    tampered = asyncio.run(open_message(signed.replace(b"joints", b"jointz"), decrypter=None, trust=trust)).reports[0]
    assert [c.name for c in tampered.failures] == ["message-digest", "signature"]


def test_two_signers_one_good(pki, trust, tmp_path):
    """RFC 5652 §5.1: several SignerInfos; the revoked one fails, Jeanne's carries the verdict, in either order."""
    src = tmp_path / "entity.eml"
    src.write_bytes(ENTITY)
    jeanne = pki.practitioners[0]
    out = run(["openssl", "cms", "-sign", "-in", src, "-signer", pki.revoked.sign_cert, "-inkey", pki.revoked.sign_key,
               "-signer", jeanne.sign_cert, "-inkey", jeanne.sign_key, "-certfile", pki.personnes_cert])
    parts = split_multipart_signed(split_message(out)[1])
    info = cms.ContentInfo.load(parts.signature)
    infos = list(info["content"]["signer_infos"])
    assert sorted(i["sid"].chosen["serial_number"].native == pki.revoked.serial for i in infos) == [False, True]
    for order in (infos, infos[::-1]):  # the SignerInfos are not signed: their order is free
        info["content"]["signer_infos"] = cms.SignerInfos(order)
        report = verify_signed_data(info.dump(force=True), parts.content, trust=trust, micalg=parts.micalg,
                                    sender="jeanne.exemple@dev.mssante.test")
        assert report.valid and report.signer.rpps == "10001234567"
