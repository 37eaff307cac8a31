"""`mssgw smime decrypt -o FILE` writes plaintext: the file is its user's only, whatever the umask (issue 7, item 7)."""

from __future__ import annotations

import os
import stat

from gateway.cli import main


def test_decrypted_output_is_created_private(pki, tmp_path, message):  # type: ignore[no-untyped-def]
    _, paul = pki.practitioners
    eml, sealed, plain = tmp_path / "message.eml", tmp_path / "sealed.eml", tmp_path / "plain.eml"
    eml.write_bytes(message)
    old = os.umask(0o022)
    try:
        assert main(["smime", "encrypt", str(eml), "--to", str(paul.auth_cert), "-o", str(sealed)]) == 0
        assert main(["smime", "decrypt", str(sealed), "--p12", str(paul.auth_p12),
                     "--password-file", str(paul.p12_password_file), "-o", str(plain)]) == 0
    finally:
        os.umask(old)
    assert plain.read_bytes().endswith(message.split(b"\r\n\r\n", 1)[1])
    assert stat.S_IMODE(plain.stat().st_mode) == 0o600
    assert stat.S_IMODE(sealed.stat().st_mode) == 0o600
