"""Certificates of a message: parsed once per encoding (bounded, failures not kept), and named by identifiers."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from asn1crypto import cms
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from gateway.devpki import create_dev_pki
from smime.cms import CACHED_CERTIFICATE_BYTES, _load_certificate, from_asn1, identifies
from smime.errors import MalformedCms


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> x509.Certificate:
    pki = create_dev_pki(tmp_path_factory.mktemp("pki") / "pki")
    return x509.load_pem_x509_certificate(Path(pki.organisation.cert).read_bytes())


def _asn1(cert: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))


def _rid(issuer: asn1_x509.Name, serial: int) -> cms.SignerIdentifier:
    ias = cms.IssuerAndSerialNumber({"issuer": issuer, "serial_number": serial})
    return cms.SignerIdentifier.load(ias.dump())


def test_identifier_with_the_certificates_encodings(cert: x509.Certificate) -> None:
    a = _asn1(cert)
    assert identifies(_rid(a.issuer, cert.serial_number), cert)
    assert not identifies(_rid(a.issuer, cert.serial_number + 1), cert)
    assert not identifies(_rid(a.subject, cert.serial_number), cert)


def test_identifier_with_the_issuer_encoded_otherwise_still_names_it(cert: x509.Certificate) -> None:
    a = _asn1(cert)
    # The same attributes, each value as a PrintableString instead of the certificate's UTF8String.
    rdns = []
    for rdn in a.issuer.chosen:
        atvs = []
        for atv in rdn:
            atvs.append(asn1_x509.NameTypeAndValue({"type": atv["type"], "value": asn1_x509.DirectoryString(
                name="printable_string", value=atv["value"].native) if atv["type"].native != "country_name"
                else atv["value"]}))
        rdns.append(asn1_x509.RelativeDistinguishedName(atvs))
    other = asn1_x509.Name(name="", value=asn1_x509.RDNSequence(rdns))
    assert other.dump() != a.issuer.dump()
    assert identifies(_rid(other, cert.serial_number), cert)
    assert not identifies(_rid(other, cert.serial_number + 1), cert)


def test_a_message_certificate_is_parsed_once_per_encoding(cert: x509.Certificate) -> None:
    first = from_asn1(_asn1(cert))
    assert from_asn1(_asn1(cert)) is first
    assert first == cert and _load_certificate.cache_info().maxsize == 256


def test_a_large_certificate_is_parsed_but_not_kept(cert: x509.Certificate) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "large")])
    now = datetime.datetime.now(datetime.UTC)
    big = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
           .serial_number(7).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
           .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"),
                                                     b"\x04\x82\x50\x00" + bytes(0x5000)), critical=False)
           .sign(key, hashes.SHA256()))
    assert len(big.public_bytes(serialization.Encoding.DER)) > CACHED_CERTIFICATE_BYTES
    before = _load_certificate.cache_info().currsize
    loaded = from_asn1(_asn1(big))
    assert loaded == big and from_asn1(_asn1(big)) is not loaded
    assert _load_certificate.cache_info().currsize == before


def test_a_damaged_certificate_fails_each_time() -> None:
    bad = asn1_x509.Certificate.load(b"\x30\x06\x30\x00\x30\x00\x03\x00")
    before = _load_certificate.cache_info().currsize
    for _ in range(2):
        with pytest.raises(MalformedCms):
            from_asn1(bad)
    assert _load_certificate.cache_info().currsize == before


def test_a_certificate_of_an_unknown_version_is_malformed_cms(cert: x509.Certificate) -> None:
    der = cert.public_bytes(serialization.Encoding.DER)
    version = bytes.fromhex("a003020102")  # [0] EXPLICIT INTEGER 2: v3
    assert der.count(version) == 1
    with pytest.raises(MalformedCms, match="InvalidVersion"):
        from_asn1(asn1_x509.Certificate.load(der.replace(version, bytes.fromhex("a003020103"))))
