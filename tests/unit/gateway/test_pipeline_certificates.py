"""Recipient certificates from the directory are parsed once per distinct encoding, in a bounded cache."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.devpki import create_dev_pki
from gateway.pipeline import recipient_certificate


def test_same_der_same_certificate_other_der_other(tmp_path: Path) -> None:
    pki = create_dev_pki(tmp_path / "pki")
    ders = [x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)
            for path in (pki.organisation.cert, pki.practitioners[0].auth_cert)]
    first = recipient_certificate(ders[0])
    assert recipient_certificate(bytes(bytearray(ders[0]))) is first  # equal bytes in another object: served again
    other = recipient_certificate(ders[1])
    assert other is not first and other.public_bytes(serialization.Encoding.DER) == ders[1]
    assert recipient_certificate.cache_info().maxsize == 256


def test_bad_der_raises_every_time_and_is_not_kept() -> None:
    before = recipient_certificate.cache_info().currsize
    for _ in range(2):
        with pytest.raises(ValueError):
            recipient_certificate(b"\x30\x03\x02\x01\x01")
    assert recipient_certificate.cache_info().currsize == before
