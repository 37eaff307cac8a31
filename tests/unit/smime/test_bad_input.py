"""Every bad input of issue 3 §6 ends in a typed error with a clear message, never a bare exception."""

from __future__ import annotations

import datetime
import subprocess

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gateway.devpki import ca_name, issue_certificate, new_rsa_key, practitioner_name
from smime.certpath import TrustStore
from smime.envelope import decrypt_content, encrypt_content
from smime.errors import (
    BadCertificateUse,
    CertificateExpired,
    CertificateNotYetValid,
    CertificateRevoked,
    ContentTampered,
    DecryptionFailed,
    MalformedCms,
    MalformedMessage,
    MicalgMismatch,
    MissingIntermediate,
    NestingTooDeep,
    NoRecipientInfo,
    UntrustedAnchor,
    WeakAlgorithm,
    WeakKey,
)
from smime.filekeys import FileKey
from smime.message import encrypt_message, open_message
from smime.mime import build_pkcs7_mime, join_message, split_message
from smime.signing import sign_message
from smime.verify import verify_signed_data

DAY = datetime.timedelta(days=1)


async def _report(signed, trust, **kwargs):
    return (await open_message(signed, decrypter=None, trust=trust, **kwargs)).reports[0]


def _failure(report, error_type):
    assert not report.valid
    errors = [c.error for c in report.failures]
    assert any(isinstance(e, error_type) for e in errors), report.summary()
    with pytest.raises(error_type):
        raise next(e for e in errors if isinstance(e, error_type))
    return next(e for e in errors if isinstance(e, error_type))


async def test_body_tampered(jeanne_sign, trust, message):
    signed = await sign_message(message, jeanne_sign)
    report = await _report(signed.replace(b"compte rendu", b"compte rendv"), trust)
    _failure(report, ContentTampered)
    assert report.check("signature").passed is False


async def test_header_inside_signed_part_tampered(jeanne_sign, trust, message):
    """The ETT 'invalid digest' case: a header injected into the signed part after signing."""
    signed = await sign_message(message, jeanne_sign)
    tampered = signed.replace(b"Content-Type: text/plain; charset=us-ascii\r\n",
                              b"Content-Type: text/plain; charset=us-ascii\r\nX-Injected: yes\r\n", 1)
    assert tampered != signed
    _failure(await _report(tampered, trust), ContentTampered)


async def test_outer_header_change_does_not_break_signature(jeanne_sign, trust, message):
    signed = await sign_message(message, jeanne_sign)
    report = await _report(signed.replace(b"Subject: Compte rendu", b"Subject: [EXT] Compte rendu"), trust)
    assert report.valid


async def test_wrong_micalg(jeanne_sign, trust, message):
    signed = await sign_message(message, jeanne_sign)
    error = _failure(await _report(signed.replace(b"micalg=sha-256", b"micalg=sha-512"), trust), MicalgMismatch)
    assert error.micalg == "sha-512" and error.digest == "sha256"


async def test_signer_expired(jeanne_sign, trust, message):
    signed = await sign_message(message, jeanne_sign)
    later = jeanne_sign.certificate.not_valid_after_utc + DAY
    error = _failure(await _report(signed, trust, at=later), CertificateExpired)
    assert "EXEMPLE" in error.subject


async def test_signer_certificate_issued_expired(issuer, trust, message):
    now = datetime.datetime.now(datetime.UTC)
    old = issuer.signer(not_before=now - 400 * DAY, not_after=now - 30 * DAY)
    _failure(await _report(await sign_message(message, old), trust), CertificateExpired)


async def test_signer_not_yet_valid(issuer, trust, message):
    now = datetime.datetime.now(datetime.UTC)
    future = issuer.signer(not_before=now + 10 * DAY, not_after=now + 400 * DAY)
    _failure(await _report(await sign_message(message, future), trust), CertificateNotYetValid)


async def test_explicit_time_before_issue(jeanne_sign, trust, message):
    signed = await sign_message(message, jeanne_sign)
    before = jeanne_sign.certificate.not_valid_before_utc - DAY
    _failure(await _report(signed, trust, at=before), CertificateNotYetValid)


async def test_revoked(pki, trust, message):
    revoked = FileKey.from_pem(pki.revoked.sign_key.read_bytes(), pki.revoked.sign_cert.read_bytes())
    signed = await sign_message(message.replace(b"jeanne.exemple@", pki.revoked.email.split("@")[0].encode() + b"@"),
                                revoked)
    error = _failure(await _report(signed, trust), CertificateRevoked)
    assert error.serial == pki.revoked.serial and error.reason_code == "keyCompromise"


async def test_untrusted_anchor(trust, message):
    """A whole foreign PKI, its root sent along: the path ends at a root we do not trust."""
    root_key, key = new_rsa_key(), new_rsa_key()
    name = practitioner_name("10001234567", "EXEMPLE", "Jeanne", "Médecin")
    root = issue_certificate(None, root_key, ca_name("AC RACINE ETRANGERE"), root_key.public_key(), profile="root")
    cert = issue_certificate(root, root_key, name, key.public_key(), profile="signature",
                             sans=[x509.RFC822Name("jeanne.exemple@dev.mssante.test")])
    signed = await sign_message(message, FileKey(cert, key), chain=[root])
    _failure(await _report(signed, trust), MissingIntermediate)  # our signer never sends a root
    # Known but not an anchor (e.g. a CA met earlier): the path ends at an untrusted root.
    store = TrustStore(trust.anchors, (*trust.intermediates, root), trust.crls)
    _failure(await _report(signed, store), UntrustedAnchor)


async def test_missing_intermediate(jeanne_sign, anchors_only, message):
    signed = await sign_message(message, jeanne_sign)  # no chain sent, and only the root is configured
    error = _failure(await _report(signed, anchors_only), MissingIntermediate)
    assert "PERSONNES" in error.issuer


async def test_weak_key(issuer, trust, message):
    weak = issuer.signer(bits=1024)
    error = _failure(await _report(await sign_message(message, weak), trust), WeakKey)
    assert error.bits == 1024


@pytest.fixture
def sha1_signed(pki, message, tmp_path) -> bytes:
    """A message signed by `openssl cms -md sha1`, as an old client would."""
    p = pki.practitioners[0]
    src = tmp_path / "in.eml"
    src.write_bytes(split_message(message)[1])
    out = subprocess.run(["openssl", "cms", "-sign", "-md", "sha1", "-in", str(src), "-signer", str(p.sign_cert),
                          "-inkey", str(p.sign_key)], capture_output=True, check=True).stdout
    return join_message(split_message(message)[0], out)


async def test_sha1_signature_from_openssl(sha1_signed, trust):
    report = await _report(sha1_signed, trust)
    assert _failure(report, WeakAlgorithm).algorithm == "sha1"
    assert report.check("signature").passed  # the signature is sound, the algorithm is what is refused


async def test_sha1_certificate_signature(issuer, trust, message):
    old = issuer.signer(hash_alg=hashes.SHA1())
    error = _failure(await _report(await sign_message(message, old), trust), WeakAlgorithm)
    assert error.algorithm == "sha1"


async def test_wrong_key_usage(issuer, trust, message):
    enc_only = issuer.signer(profile="encryption")
    _failure(await _report(await sign_message(message, enc_only), trust), BadCertificateUse)


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 10, b"0\x82\xff\xff\x06\x09", b"not DER at all" * 5])
def test_garbage_cms(garbage, trust):
    with pytest.raises(MalformedCms):
        verify_signed_data(garbage, b"content", trust=trust)


async def test_truncated_cms(jeanne_sign, paul_auth, trust, message):
    signed = await sign_message(message, jeanne_sign, detached=False)
    info = cms.ContentInfo.load(encrypt_content(b"x", [paul_auth.certificate]))
    der = info.dump()
    for cut in (len(der) // 3, len(der) - 5):
        with pytest.raises(MalformedCms):
            await decrypt_content(der[:cut], paul_auth)
    opaque = build_pkcs7_mime(b"\x30\x80\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x07\x02\xa0\x80\x30", "signed-data")
    with pytest.raises(MalformedCms):
        await open_message(join_message([], opaque), decrypter=None, trust=trust)
    assert b"signed-data" in signed


async def test_enveloped_data_given_to_verify(paul_auth, trust):
    with pytest.raises(MalformedCms, match="expected SignedData"):
        verify_signed_data(encrypt_content(b"x", [paul_auth.certificate]), None, trust=trust)


async def test_no_recipient_info_for_our_key(paul_auth, jeanne_auth, trust, message):
    sealed = encrypt_message(message, [paul_auth.certificate])
    with pytest.raises(NoRecipientInfo, match="no RecipientInfo for our certificate"):
        await open_message(sealed, decrypter=jeanne_auth, trust=trust)


@pytest.mark.parametrize("cipher", ["aes256-cbc", "aes128-gcm"])
async def test_corrupted_ciphertext(paul_auth, cipher):
    info = cms.ContentInfo.load(encrypt_content(b"Content-Type: text/plain\r\n\r\nx\r\n" * 3,
                                                [paul_auth.certificate], cipher=cipher))
    field = "encrypted_content_info" if cipher.endswith("cbc") else "auth_encrypted_content_info"
    eci = info["content"][field]
    data = bytearray(eci["encrypted_content"].native)
    data[-1] ^= 0x01
    eci["encrypted_content"] = bytes(data)
    with pytest.raises(DecryptionFailed, match="padding" if cipher.endswith("cbc") else "tag"):
        await decrypt_content(info.dump(force=True), paul_auth)


async def test_corrupted_gcm_tag(paul_auth):
    info = cms.ContentInfo.load(encrypt_content(b"x" * 40, [paul_auth.certificate], cipher="aes256-gcm"))
    mac = bytearray(info["content"]["mac"].native)
    mac[0] ^= 0x80
    info["content"]["mac"] = bytes(mac)
    with pytest.raises(DecryptionFailed, match="GCM tag mismatch"):
        await decrypt_content(info.dump(force=True), paul_auth)


async def test_absurd_nesting(paul_auth, trust, message):
    sealed = message
    for _ in range(6):
        sealed = encrypt_message(sealed, [paul_auth.certificate])
    with pytest.raises(NestingTooDeep) as exc:
        await open_message(sealed, decrypter=paul_auth, trust=trust)
    assert exc.value.limit == 4
    opened = await open_message(sealed, decrypter=paul_auth, trust=trust, max_depth=6)
    assert opened.message == message


@pytest.mark.parametrize("mangle", [
    lambda s: s.replace(b"boundary=", b"boundery="),
    lambda s: s[: s.rindex(b"--\r\n") - 10],
    lambda s: s.replace(b"application/pkcs7-signature;", b"text/plain;"),
    lambda s: s.replace(b'protocol="application/pkcs7-signature"', b'protocol="application/pgp-signature"'),
])
async def test_broken_multipart_signed(jeanne_sign, trust, message, mangle):
    signed = await sign_message(message, jeanne_sign)
    with pytest.raises(MalformedMessage):
        await open_message(mangle(signed), decrypter=None, trust=trust)


async def test_signature_bytes_flipped(jeanne_sign, trust, message):
    signed = await sign_message(message, jeanne_sign, detached=False)
    entity = split_message(signed)[1]
    from smime.mime import decode_body, split_header_body
    info = cms.ContentInfo.load(decode_body(*split_header_body(entity)))
    si = info["content"]["signer_infos"][0]
    sig = bytearray(si["signature"].native)
    sig[10] ^= 1
    si["signature"] = bytes(sig)
    report = verify_signed_data(info.dump(force=True), None, trust=trust, identity_check=None)
    from smime.errors import SignatureInvalid
    _failure(report, SignatureInvalid)
    assert report.check("message-digest").passed


def test_key_file_mismatch(pki):
    from smime.filekeys import KeyLoadError
    p, q = pki.practitioners
    with pytest.raises(KeyLoadError, match="does not match"):
        FileKey.from_pem(p.sign_key.read_bytes(), q.sign_cert.read_bytes())
    with pytest.raises(KeyLoadError, match="PKCS#12"):
        FileKey.from_pkcs12(p.sign_p12.read_bytes(), b"wrong password")
    key = FileKey.from_pkcs12(p.sign_p12.read_bytes(), p.p12_password())
    assert key.certificate.public_bytes(serialization.Encoding.DER) == p.sign_cert.read_bytes() or \
        key.certificate == FileKey.from_pem(p.sign_key.read_bytes(), p.sign_cert.read_bytes()).certificate
    assert len(key.chain) == 1
