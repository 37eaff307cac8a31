"""Interop with NSS, the library Thunderbird uses, through its real tools (`certutil`, `pk12util`, `cmsutil`,
`crlutil` from Debian's libnss3-tools), both ways.

Debian 12 ships NSS 3.87: it has neither RSA-OAEP (NSS 3.100) nor AuthEnvelopedData/GCM, so what goes to
Thunderbird by default stays AES-CBC with PKCS#1 v1.5 key transport (smime.md, "Thunderbird / NSS").
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from smime.envelope import decrypt_content, encrypt_content
from smime.filekeys import FileKey
from smime.signing import build_signed_data
from smime.verify import verify_signed_data

CONTENT = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nCompte rendu pour Thunderbird.\r\n"
JEANNE_SIGN = "Jeanne EXEMPLE (signature)"
PAUL = "paul.testeur@dev.mssante.test"


def run(args: Sequence[str | Path], *, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run([str(a) for a in args], capture_output=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return proc


@pytest.fixture(scope="session")
def nssdb(pki, tmp_path_factory) -> str:
    """An NSS database trusting the dev root for e-mail, with Paul's decryption key, Jeanne's signing key
    and the PERSONNES CRL."""
    directory = tmp_path_factory.mktemp("nssdb")
    db = f"sql:{directory}"
    run(["certutil", "-N", "-d", db, "--empty-password"])
    run(["certutil", "-A", "-d", db, "-n", "root", "-t", "C,C,C", "-i", pki.root_cert])
    run(["certutil", "-A", "-d", db, "-n", "personnes", "-t", ",,", "-i", pki.personnes_cert])
    paul, jeanne = pki.practitioners[1], pki.practitioners[0]
    run(["pk12util", "-i", paul.auth_p12, "-d", db, "-w", paul.p12_password_file, "-K", ""])
    run(["pk12util", "-i", jeanne.sign_p12, "-d", db, "-w", jeanne.p12_password_file, "-K", ""])
    run(["crlutil", "-I", "-d", db, "-i", pki.personnes_crl_der, "-t", "1"])
    return db


@pytest.fixture
def files(tmp_path) -> Path:
    (tmp_path / "content").write_bytes(CONTENT)
    return tmp_path


# --- ours -> NSS -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hash_name", ["sha256", "sha384", "sha512"])
@pytest.mark.parametrize("padding", ["pkcs1v15", "pss"])
@pytest.mark.parametrize("detached", [True, False])
def test_nss_verifies_ours(nssdb, jeanne_sign, files, hash_name, padding, detached):
    der = asyncio.run(build_signed_data(CONTENT, jeanne_sign, hash_name=hash_name, padding=padding,
                                        detached=detached, chain=jeanne_sign.chain))
    (files / "sig.der").write_bytes(der)
    detached_args = ["-c", files / "content"] if detached else []
    out = run(["cmsutil", "-D", "-d", nssdb, "-u", "4", "-i", files / "sig.der", *detached_args]).stdout
    assert out.endswith(CONTENT)


def test_nss_rejects_ours_when_tampered(nssdb, jeanne_sign, files):
    der = asyncio.run(build_signed_data(CONTENT, jeanne_sign, chain=jeanne_sign.chain))
    (files / "sig.der").write_bytes(der)
    (files / "other").write_bytes(CONTENT.replace(b"Compte", b"Comptf"))
    proc = run(["cmsutil", "-D", "-d", nssdb, "-u", "4", "-i", files / "sig.der", "-c", files / "other"],
               check=False)
    assert proc.returncode != 0 and b"DigestMismatch" in proc.stderr + proc.stdout


def test_nss_rejects_revoked_signer(nssdb, pki, files):
    revoked = FileKey.from_pem(pki.revoked.sign_key.read_bytes(), pki.revoked.sign_cert.read_bytes(),
                               chain_pem=pki.personnes_cert.read_bytes())
    (files / "sig.der").write_bytes(asyncio.run(build_signed_data(CONTENT, revoked, chain=revoked.chain)))
    proc = run(["cmsutil", "-D", "-d", nssdb, "-u", "4", "-i", files / "sig.der", "-c", files / "content"],
               check=False)
    assert proc.returncode != 0 and b"REVOKED" in proc.stderr


@pytest.mark.parametrize("cipher", ["aes128-cbc", "aes256-cbc"])
def test_nss_decrypts_ours(nssdb, paul_auth, jeanne_sign, files, cipher):
    der = encrypt_content(CONTENT, [paul_auth.certificate, jeanne_sign.certificate], cipher=cipher)
    (files / "enc.der").write_bytes(der)
    assert run(["cmsutil", "-D", "-d", nssdb, "-i", files / "enc.der"]).stdout == CONTENT


# --- NSS -> ours ---------------------------------------------------------------------------------------------
# `-Y NONE`: the signature certificate is nonRepudiation-only, so NSS refuses to name it as an encryption key.
# encryption key; Jeanne's encryption key is on her authentication certificate) -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hash_flag,digest", [("SHA256", "sha256"), ("SHA384", "sha384"), ("SHA512", "sha512")])
@pytest.mark.parametrize("detached", [True, False])
def test_we_verify_nss(nssdb, trust, files, hash_flag, digest, detached):
    args = ["cmsutil", "-S", "-d", nssdb, "-N", JEANNE_SIGN, "-G", "-P", "-Y", "NONE", "-H", hash_flag,
            "-i", files / "content"]
    der = run([*args, "-T"] if detached else args).stdout
    report = verify_signed_data(der, CONTENT if detached else None, trust=trust, identity_check=None)
    assert report.valid, report.summary()
    assert report.signer.digest_algorithm == digest and report.content == CONTENT
    assert report.signer.signing_time is not None


@pytest.mark.parametrize("attributes", [[], ["-G"]])
def test_we_detect_tampering_of_nss_signature(nssdb, trust, files, attributes):
    """Without -G NSS writes no signed attributes, and the signature covers the content itself (RFC 5652 §5.4)."""
    der = run(["cmsutil", "-S", "-d", nssdb, "-N", JEANNE_SIGN, "-Y", "NONE", *attributes, "-T",
               "-i", files / "content"]).stdout
    good = verify_signed_data(der, CONTENT, trust=trust, identity_check=None)
    assert good.valid, good.summary()
    assert ("no signed attributes" in good.check("message-digest").reason) == (not attributes)
    bad = verify_signed_data(der, CONTENT + b"!", trust=trust, identity_check=None)
    failed = [c.name for c in bad.failures]
    assert failed == (["signature"] if not attributes else ["message-digest", "signature"])


def test_we_decrypt_nss(nssdb, paul_auth, files):
    der = run(["cmsutil", "-E", "-d", nssdb, "-r", PAUL, "-i", files / "content"]).stdout
    out = asyncio.run(decrypt_content(der, paul_auth))
    assert out.content == CONTENT and out.structure == "enveloped_data"


def test_we_open_nss_sign_then_encrypt(nssdb, paul_auth, trust, files):
    signed = run(["cmsutil", "-S", "-d", nssdb, "-N", JEANNE_SIGN, "-Y", "NONE", "-G", "-i", files / "content"]).stdout
    (files / "signed.der").write_bytes(signed)
    sealed = run(["cmsutil", "-E", "-d", nssdb, "-r", PAUL, "-i", files / "signed.der"]).stdout
    inner = asyncio.run(decrypt_content(sealed, paul_auth)).content
    report = verify_signed_data(inner, None, trust=trust, identity_check=None)
    assert report.valid and report.content == CONTENT
