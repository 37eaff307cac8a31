"""`mssgw smime ...` run in-process on real files from the dev PKI: results and exit codes."""

from __future__ import annotations

import pytest

from gateway.cli import main


@pytest.fixture
def eml(tmp_path, message):
    path = tmp_path / "message.eml"
    path.write_bytes(message)
    return path


def _p12(practitioner, role):
    return ["--p12", str(getattr(practitioner, f"{role}_p12")), "--password-file", str(practitioner.p12_password_file)]


def _trust(pki):
    return ["--trust", str(pki.ca_bundle), "--crls", str(pki.crls_pem)]


def test_sign_encrypt_verify_decrypt(pki, eml, tmp_path, capsys, message):
    jeanne, paul = pki.practitioners
    signed, sealed, plain = tmp_path / "signed.eml", tmp_path / "sealed.eml", tmp_path / "plain.eml"
    assert main(["smime", "sign", str(eml), *_p12(jeanne, "sign"), "--hash", "sha384", "-o", str(signed)]) == 0
    assert b"micalg=sha-384" in signed.read_bytes()
    assert main(["smime", "encrypt", str(signed), "--to", str(paul.auth_cert), "--cipher", "aes128-gcm",
                 "-o", str(sealed)]) == 0
    capsys.readouterr()
    assert main(["smime", "verify", str(sealed), *_trust(pki), *_p12(paul, "auth"), "-o", str(plain)]) == 0
    out = capsys.readouterr().out
    assert "verdict: valid" in out and "RPPS 10001234567" in out and "aes128-gcm" in out
    assert plain.read_bytes() == message
    assert main(["smime", "decrypt", str(sealed), *_p12(paul, "auth"), "-o", str(plain)]) == 0
    assert b"multipart/signed" in plain.read_bytes()


def test_verify_exit_codes(pki, eml, tmp_path, capsys):
    jeanne, paul = pki.practitioners
    signed = tmp_path / "signed.eml"
    main(["smime", "sign", str(eml), "--key", str(jeanne.sign_key), "--cert", str(jeanne.sign_cert),
          "--chain", str(pki.personnes_cert), "-o", str(signed)])
    assert main(["smime", "verify", str(signed), *_trust(pki), "--at", "2090-01-01T00:00:00Z"]) == 1
    assert "FAIL path" in capsys.readouterr().out
    assert main(["smime", "verify", str(eml), *_trust(pki)]) == 4
    sealed = tmp_path / "sealed.eml"
    main(["smime", "encrypt", str(eml), "--to", str(paul.auth_cert), "-o", str(sealed)])
    assert main(["smime", "verify", str(sealed), *_trust(pki)]) == 3
    assert main(["smime", "decrypt", str(sealed), *_p12(jeanne, "auth")]) == 3
    assert "no RecipientInfo" in capsys.readouterr().err
    assert main(["smime", "decrypt", str(sealed), "--p12", str(paul.auth_p12)]) == 2
    assert main(["smime", "verify", str(tmp_path / "missing.eml"), *_trust(pki)]) == 2


def test_inspect_lists_layers(pki, eml, tmp_path, capsys):
    jeanne, paul = pki.practitioners
    sealed = tmp_path / "sealed.eml"
    main(["smime", "encrypt", str(eml), "--to", str(paul.auth_cert), "--oaep", *_p12(jeanne, "sign"),
          "-o", str(sealed)])
    capsys.readouterr()
    assert main(["smime", "inspect", str(sealed)]) == 0
    out = capsys.readouterr().out
    assert "EnvelopedData" in out and "rsaes_oaep (sha256)" in out and "encrypted: give" in out
    assert main(["smime", "inspect", str(sealed), *_p12(paul, "auth")]) == 0
    out = capsys.readouterr().out
    assert "multipart/signed (SignedData, detached)" in out and "signer 0 algorithms: sha256 / rsassa_pkcs1v15" in out
