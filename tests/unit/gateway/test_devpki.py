"""The development PKI, checked with the real openssl and NSS binaries as well as with cryptography."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from gateway import cmd_pki, devpki
from gateway.devpki import DevPki

OPENSSL = shutil.which("openssl")
CERTUTIL = shutil.which("certutil")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl binary not installed")


def run(*argv: str | Path, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=check, timeout=60)


def leaves(pki: DevPki) -> dict[str, Path]:
    return {role: path for role, path in pki.certificates() if not role.startswith(("root", "ca-"))}


def good_leaves(pki: DevPki) -> dict[str, Path]:
    return {role: path for role, path in leaves(pki).items() if not role.startswith("revoked")}


def openssl_verify(pki: DevPki, leaf: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run("openssl", "verify", "-CAfile", pki.root_cert, "-untrusted", pki.personnes_cert,
               "-untrusted", pki.organisations_cert, *extra, leaf)


def cert(path: Path) -> x509.Certificate:
    return devpki.load_certificate(path)


def snapshot(directory: Path) -> dict[str, tuple[bytes, int, int]]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns, stat.S_IMODE(p.stat().st_mode))
            for p in sorted(directory.rglob("*")) if p.is_file()}


# --- chains and revocation, by openssl --------------------------------------------------------------------------

@needs_openssl
def test_every_good_leaf_verifies_against_root_with_crl_check(dev_pki: DevPki) -> None:
    for role, path in good_leaves(dev_pki).items():
        plain = openssl_verify(dev_pki, path)
        assert plain.returncode == 0, (role, plain.stderr)
        checked = openssl_verify(dev_pki, path, "-crl_check_all", "-CRLfile", str(dev_pki.crls_pem))
        assert checked.returncode == 0, (role, checked.stderr)
    assert len(good_leaves(dev_pki)) == 6  # gateway, 2 x (auth, sign), organisation


@needs_openssl
def test_revoked_signature_certificate_fails_only_with_crl_check(dev_pki: DevPki) -> None:
    assert openssl_verify(dev_pki, dev_pki.revoked.sign_cert).returncode == 0
    checked = openssl_verify(dev_pki, dev_pki.revoked.sign_cert, "-crl_check", "-CRLfile", str(dev_pki.personnes_crl_pem))
    assert checked.returncode != 0
    assert "certificate revoked" in checked.stdout + checked.stderr


@needs_openssl
def test_leaf_fails_without_its_intermediate(dev_pki: DevPki) -> None:
    result = run("openssl", "verify", "-CAfile", dev_pki.root_cert, dev_pki.practitioner("10001234567").sign_cert)
    assert result.returncode != 0
    assert "unable to get local issuer certificate" in result.stdout + result.stderr


@needs_openssl
@pytest.mark.parametrize(("role", "purpose"), [
    ("sign", "smimesign"), ("auth", "smimesign"), ("auth", "smimeencrypt"), ("auth", "sslclient"),
])
def test_practitioner_certificates_fit_their_openssl_purpose(dev_pki: DevPki, role: str, purpose: str) -> None:
    p = dev_pki.practitioner("10001234567")
    path = p.sign_cert if role == "sign" else p.auth_cert
    result = openssl_verify(dev_pki, path, "-purpose", purpose)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_openssl
def test_signature_certificate_cannot_encrypt_or_authenticate_tls(dev_pki: DevPki) -> None:
    sign = dev_pki.practitioner("10001234567").sign_cert
    for purpose in ("smimeencrypt", "sslclient"):
        assert openssl_verify(dev_pki, sign, "-purpose", purpose).returncode != 0, purpose


@needs_openssl
def test_gateway_certificate_verifies_as_server_for_its_names(dev_pki: DevPki) -> None:
    for check in (["-verify_hostname", dev_pki.gateway_hostname], ["-verify_hostname", "localhost"],
                  ["-verify_ip", "127.0.0.1"]):
        result = openssl_verify(dev_pki, dev_pki.tls_server_cert, "-purpose", "sslserver", *check)
        assert result.returncode == 0, (check, result.stdout + result.stderr)
    wrong = openssl_verify(dev_pki, dev_pki.tls_server_cert, "-verify_hostname", "other.mssante.test")
    assert wrong.returncode != 0


@needs_openssl
def test_tls_server_chain_and_bundle_hold_the_expected_certificates(dev_pki: DevPki) -> None:
    chain = x509.load_pem_x509_certificates(dev_pki.tls_server_chain.read_bytes())
    assert [c.subject for c in chain] == [cert(dev_pki.tls_server_cert).subject, cert(dev_pki.organisations_cert).subject]
    bundle = x509.load_pem_x509_certificates(dev_pki.ca_bundle.read_bytes())
    assert [c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value for c in bundle] == [
        devpki.ROOT_CN, devpki.PERSONNES_CN, devpki.ORGANISATIONS_CN]
    result = run("openssl", "verify", "-CAfile", dev_pki.ca_bundle, dev_pki.tls_server_cert)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(CERTUTIL is None, reason="NSS certutil not installed")
def test_nss_accepts_nonrepudiation_only_certificate_for_email_signing(dev_pki: DevPki, tmp_path: Path) -> None:
    """The claim behind the signature profile's key usage: NSS (Thunderbird) accepts it as an S/MIME signer."""
    db = f"sql:{tmp_path}"
    run("certutil", "-N", "-d", db, "--empty-password", check=True)
    run("certutil", "-A", "-d", db, "-n", "root", "-t", "C,C,C", "-i", dev_pki.root_cert, check=True)
    run("certutil", "-A", "-d", db, "-n", "personnes", "-t", ",,", "-i", dev_pki.personnes_cert, check=True)
    p = dev_pki.practitioner("10001234567")
    run("certutil", "-A", "-d", db, "-n", "sign", "-t", ",,", "-i", p.sign_cert, check=True)
    run("certutil", "-A", "-d", db, "-n", "auth", "-t", ",,", "-i", p.auth_cert, check=True)
    signer = run("certutil", "-V", "-d", db, "-n", "sign", "-u", "S")
    assert signer.returncode == 0 and "certificate is valid" in signer.stdout, signer.stdout + signer.stderr
    recipient = run("certutil", "-V", "-d", db, "-n", "auth", "-u", "R")
    assert recipient.returncode == 0, recipient.stdout + recipient.stderr
    sign_as_recipient = run("certutil", "-V", "-d", db, "-n", "sign", "-u", "R")
    assert sign_as_recipient.returncode != 0


# --- what the certificates say ----------------------------------------------------------------------------------

def test_practitioner_subject_is_the_card_shape_with_one_multivalued_rdn(dev_pki: DevPki) -> None:
    for p in dev_pki.practitioners:
        rdns = list(cert(p.sign_cert).subject.rdns)
        multi = [r for r in rdns if len(r) > 1]
        assert len(multi) == 1
        assert {(a.oid, a.value) for a in multi[0]} == {
            (NameOID.COMMON_NAME, p.id_nat), (NameOID.SURNAME, p.surname), (NameOID.GIVEN_NAME, p.given_name)}
        assert p.id_nat == "8" + p.rpps and len(p.rpps) == 11
        singles = [(next(iter(r)).oid, next(iter(r)).value) for r in rdns if len(r) == 1]
        assert singles == [(NameOID.COUNTRY_NAME, "FR"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "TEST"),
                           (NameOID.TITLE, p.profession)]
        assert cert(p.auth_cert).subject == cert(p.sign_cert).subject


@needs_openssl
def test_openssl_prints_the_multivalued_rdn(dev_pki: DevPki) -> None:
    out = run("openssl", "x509", "-noout", "-subject", "-nameopt", "oneline,-esc_msb,utf8", "-in",
              dev_pki.practitioner("10001234567").sign_cert, check=True).stdout
    assert "title = Médecin" in out
    rdn = out.rstrip().rsplit(", ", 1)[1]
    assert sorted(rdn.split(" + ")) == ["CN = 810001234567", "GN = Jeanne", "SN = EXEMPLE"]


def test_practitioner_name_without_test_marker_is_the_exact_card_shape() -> None:
    name = devpki.practitioner_name("10009999999", "EXEMPLE", "JEANNE", "Médecin", test_marker=None)
    assert [len(r) for r in name.rdns] == [1, 1, 3]
    assert name.get_attributes_for_oid(NameOID.TITLE)[0].value == "Médecin"


@pytest.mark.parametrize(("role", "ku", "ekus"), [
    ("sign", {"content_commitment"}, [ExtendedKeyUsageOID.EMAIL_PROTECTION]),
    ("auth", {"digital_signature", "key_encipherment"},
     [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.EMAIL_PROTECTION]),
])
def test_practitioner_key_usages(dev_pki: DevPki, role: str, ku: set[str], ekus: list[x509.ObjectIdentifier]) -> None:
    for p in dev_pki.practitioners:
        c = cert(p.sign_cert if role == "sign" else p.auth_cert)
        assert set_bits(c) == ku
        assert c.extensions.get_extension_for_class(x509.KeyUsage).critical
        assert list(c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == ekus
        assert c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.RFC822Name) == [p.email]
        assert c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


KU_BITS = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
           "key_cert_sign", "crl_sign")


def set_bits(c: x509.Certificate) -> set[str]:
    ku = c.extensions.get_extension_for_class(x509.KeyUsage).value
    return {bit for bit in KU_BITS if getattr(ku, bit)}


def test_every_leaf_is_rsa2048_sha256_with_ski_aki_crldp_policy_and_three_years(dev_pki: DevPki) -> None:
    issuers = {"personnes": cert(dev_pki.personnes_cert), "organisations": cert(dev_pki.organisations_cert)}
    for role, path in leaves(dev_pki).items():
        c = cert(path)
        issuer = issuers["organisations" if role in ("gateway-tls-server", "organisation") else "personnes"]
        assert c.issuer == issuer.subject, role
        c.verify_directly_issued_by(issuer)
        assert c.public_key().key_size == 2048  # type: ignore[union-attr]
        assert isinstance(c.signature_hash_algorithm, hashes.SHA256)
        aki = c.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        dps = c.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        assert dps[0].full_name is not None and dps[0].full_name[0].value.startswith("http://igc-sante.test/")
        policies = c.extensions.get_extension_for_class(x509.CertificatePolicies).value
        assert [pi.policy_identifier for pi in policies] == [devpki.TEST_POLICY_OID]
        lifetime = c.not_valid_after_utc - c.not_valid_before_utc
        assert dt.timedelta(days=3 * 365) <= lifetime <= dt.timedelta(days=3 * 366), role
        assert c.not_valid_before_utc < dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30), role


def test_every_subject_is_marked_test(dev_pki: DevPki) -> None:
    for role, path in dev_pki.certificates():
        marks = [a.value for a in cert(path).subject
                 if a.oid in (NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME)]
        assert any("TEST" in str(m) for m in marks), role


def test_gateway_and_organisation_certificates(dev_pki: DevPki) -> None:
    gw = cert(dev_pki.tls_server_cert)
    assert gw.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == dev_pki.gateway_hostname
    assert gw.subject.get_attributes_for_oid(NameOID.STATE_OR_PROVINCE_NAME)[0].value == "Paris (75)"
    ou = gw.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value
    assert isinstance(ou, str) and ou.startswith("3") and len(ou) == 15 and luhn_ok(ou[1:])
    assert list(gw.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    org = cert(dev_pki.organisation.cert)
    assert set_bits(org) == {"digital_signature", "content_commitment", "key_encipherment"}
    assert org.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.RFC822Name) == [f"secretariat@{dev_pki.domain}"]
    assert luhn_ok(dev_pki.organisation.siret) and dev_pki.organisation.id_nat_struct == "3" + dev_pki.organisation.siret


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def test_cas_are_constrained(dev_pki: DevPki) -> None:
    root = cert(dev_pki.root_cert)
    assert root.issuer == root.subject
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length is None
    for path in (dev_pki.personnes_cert, dev_pki.organisations_cert):
        c = cert(path)
        bc = c.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length == 0
        assert set_bits(c) == {"key_cert_sign", "crl_sign"}
        c.verify_directly_issued_by(root)


def test_crls_name_the_revoked_serial_with_number_aki_and_30_days(dev_pki: DevPki) -> None:
    pers = x509.load_pem_x509_crl(dev_pki.personnes_crl_pem.read_bytes())
    assert pers.public_bytes(serialization.Encoding.DER) == dev_pki.personnes_crl_der.read_bytes()
    assert pers.is_signature_valid(cert(dev_pki.personnes_cert).public_key())  # type: ignore[arg-type]
    revoked_serial = cert(dev_pki.revoked.sign_cert).serial_number
    assert revoked_serial == dev_pki.revoked.serial
    assert pers.get_revoked_certificate_by_serial_number(revoked_serial) is not None
    for p in dev_pki.practitioners:
        assert pers.get_revoked_certificate_by_serial_number(cert(p.sign_cert).serial_number) is None
    org = x509.load_der_x509_crl(dev_pki.organisations_crl_der.read_bytes())
    assert len(org) == 0
    for crl, ca in ((pers, dev_pki.personnes_cert), (org, dev_pki.organisations_cert)):
        assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
        aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == cert(ca).extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        assert crl.next_update_utc is not None
        assert crl.next_update_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=29)
    assert dev_pki.crls_pem.read_bytes().count(b"-----BEGIN X509 CRL-----") == 3


# --- keys and PKCS#12 -------------------------------------------------------------------------------------------

def test_keys_match_their_certificates(dev_pki: DevPki) -> None:
    pairs = [(dev_pki.root_cert, dev_pki.root_key), (dev_pki.personnes_cert, dev_pki.personnes_key),
             (dev_pki.organisations_cert, dev_pki.organisations_key), (dev_pki.tls_server_cert, dev_pki.tls_server_key),
             (dev_pki.organisation.cert, dev_pki.organisation.key), (dev_pki.revoked.sign_cert, dev_pki.revoked.sign_key)]
    pairs += [(p.auth_cert, p.auth_key) for p in dev_pki.practitioners]
    pairs += [(p.sign_cert, p.sign_key) for p in dev_pki.practitioners]
    for c, k in pairs:
        assert devpki.load_private_key(k).public_key() == cert(c).public_key(), c
    assert len({devpki.load_private_key(k).public_key().public_numbers().n for _, k in pairs}) == len(pairs)


def test_pkcs12_loads_with_its_password_only(dev_pki: DevPki) -> None:
    p = dev_pki.practitioner("10007654321")
    password = p.p12_password()
    assert len(password) >= 20
    for p12, c in ((p.sign_p12, p.sign_cert), (p.auth_p12, p.auth_cert)):
        bundle = pkcs12.load_pkcs12(p12.read_bytes(), password)
        assert bundle.cert is not None and bundle.cert.certificate == cert(c)
        assert bundle.key is not None and bundle.key.public_key() == cert(c).public_key()
        assert [a.certificate for a in bundle.additional_certs] == [cert(dev_pki.personnes_cert), cert(dev_pki.root_cert)]
        with pytest.raises(ValueError):
            pkcs12.load_pkcs12(p12.read_bytes(), b"wrong" + password)
    org = dev_pki.organisation
    assert pkcs12.load_pkcs12(org.p12.read_bytes(), org.p12_password()).cert is not None


@needs_openssl
def test_openssl_reads_the_pkcs12(dev_pki: DevPki) -> None:
    p = dev_pki.practitioner("10001234567")
    ok = run("openssl", "pkcs12", "-in", p.sign_p12, "-passin", f"file:{p.p12_password_file}", "-nokeys", "-clcerts")
    assert ok.returncode == 0, ok.stderr
    assert cert(p.sign_cert) == x509.load_pem_x509_certificate(ok.stdout.encode())
    bad = run("openssl", "pkcs12", "-in", p.sign_p12, "-passin", "pass:not-the-password", "-noout")
    assert bad.returncode != 0


def test_file_and_directory_modes(dev_pki: DevPki) -> None:
    for path in sorted(dev_pki.directory.rglob("*")):
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir():
            assert mode == 0o700, path
        elif path.suffix in (".key", ".p12") or path.name == "p12-password":
            assert mode == 0o600, path
        else:
            assert mode == 0o644, path
    assert stat.S_IMODE(dev_pki.directory.stat().st_mode) == 0o700


# --- idempotence, the manifest and failure modes ----------------------------------------------------------------

def test_second_call_changes_nothing_and_returns_the_same_pki(dev_pki: DevPki) -> None:
    before = snapshot(dev_pki.directory)
    again = devpki.create_dev_pki(dev_pki.directory, domain="other.test", gateway_hostname="other.test")
    assert again == dev_pki
    assert snapshot(dev_pki.directory) == before


def test_manifest_paths_are_relative_and_the_pki_can_move(dev_pki: DevPki, tmp_path: Path) -> None:
    manifest = json.loads((dev_pki.directory / devpki.MANIFEST).read_text())
    assert manifest["practitioners"][0]["sign_cert"] == "practitioners/10001234567/sign.crt"
    assert str(dev_pki.directory) not in (dev_pki.directory / devpki.MANIFEST).read_text()
    moved = tmp_path / "moved"
    shutil.copytree(dev_pki.directory, moved)
    loaded = devpki.load_dev_pki(moved)
    assert loaded.practitioner("10001234567").sign_cert == moved / "practitioners/10001234567/sign.crt"
    assert loaded.revoked.serial == dev_pki.revoked.serial


def test_damaged_pki_is_reported_not_regenerated(dev_pki: DevPki, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(dev_pki.directory, damaged)
    (damaged / "practitioners/10001234567/sign.key").unlink()
    with pytest.raises(devpki.DevPkiIncomplete) as info:
        devpki.create_dev_pki(damaged)
    assert info.value.missing == ("practitioners/10001234567/sign.key",)
    assert not (damaged / "practitioners/10001234567/sign.key").exists()


def test_manifest_escaping_the_directory_is_refused(dev_pki: DevPki, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(dev_pki.directory, bad)
    manifest = json.loads((bad / devpki.MANIFEST).read_text())
    manifest["root_key"] = "../../etc/passwd"
    (bad / devpki.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(devpki.DevPkiManifestInvalid, match="root_key"):
        devpki.load_dev_pki(bad)


def test_nonempty_directory_without_manifest_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("someone else's")
    with pytest.raises(devpki.DevPkiDirectoryNotEmpty) as info:
        devpki.create_dev_pki(tmp_path)
    assert info.value.entries == ("notes.txt",)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_load_without_manifest_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(devpki.DevPkiManifestInvalid, match="dev-init"):
        devpki.load_dev_pki(tmp_path)


def test_concurrent_creators_make_one_pki(tmp_path: Path) -> None:
    """Two processes racing on one directory (parallel test sessions sharing var/pki) both get the same PKI."""
    target = tmp_path / "shared"
    code = ("import sys, pathlib; from gateway.devpki import create_dev_pki; "
            "print(create_dev_pki(pathlib.Path(sys.argv[1])).revoked.serial)")
    env = {**os.environ, "PYTHONPATH": str(Path(devpki.__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    assert devpki.load_dev_pki(target).revoked.serial == int(outputs[0][0])


def test_domain_hostname_and_now_are_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    when = dt.datetime(2024, 3, 1, 12, 0, tzinfo=dt.UTC)
    pki = devpki.create_dev_pki(tmp_path / "p", domain="ch-exemple.mssante.test", gateway_hostname="mx.ch-exemple.test",
                                now=when)
    assert pki.practitioner("10001234567").email == "jeanne.exemple@ch-exemple.mssante.test"
    gw = cert(pki.tls_server_cert)
    san = gw.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mx.ch-exemple.test", "localhost"]
    assert gw.not_valid_before_utc == when - dt.timedelta(hours=1)
    crl = x509.load_der_x509_crl(pki.personnes_crl_der.read_bytes())
    assert crl.next_update_utc == when + dt.timedelta(days=30)
    with caplog.at_level("WARNING", logger="gateway.devpki"):
        assert devpki.create_dev_pki(tmp_path / "p") == pki
    assert "made for ch-exemple.mssante.test" in caplog.text


def test_unwritable_target_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(devpki.DevPkiUnwritable):
        devpki.create_dev_pki(tmp_path / "file" / "pki")


# --- the helpers, for variants other tests need -----------------------------------------------------------------

@needs_openssl
def test_variants_fail_openssl_verification_for_the_right_reason(dev_pki: DevPki, tmp_path: Path) -> None:
    ca_cert, ca_key = cert(dev_pki.personnes_cert), devpki.load_private_key(dev_pki.personnes_key)
    name = devpki.practitioner_name("10001111111", "VARIANTE", "Zoé", "Infirmier")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    key = devpki.new_rsa_key()
    variants = {
        "expired": (devpki.issue_certificate(ca_cert, ca_key, name, key.public_key(), profile="signature",
                                             not_before=past, not_after=past + dt.timedelta(days=365)),
                    [], "certificate has expired"),
        "not-yet-valid": (devpki.issue_certificate(ca_cert, ca_key, name, key.public_key(), profile="signature",
                                                   not_before=dt.datetime.now(dt.UTC) + dt.timedelta(days=1)),
                          [], "certificate is not yet valid"),
        "sha1": (devpki.issue_certificate(ca_cert, ca_key, name, key.public_key(), profile="signature",
                                          hash_alg=hashes.SHA1()),
                 ["-auth_level", "2"], "digest algorithm too weak"),
        "weak-key": (devpki.issue_certificate(ca_cert, ca_key, name, devpki.new_rsa_key(1024).public_key(),
                                              profile="signature"),
                     ["-auth_level", "2"], "key too weak"),
        "wrong-eku": (devpki.issue_certificate(ca_cert, ca_key, name, key.public_key(), profile="signature",
                                                          extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,)),
                                 ["-purpose", "smimesign"], "unsuitable certificate purpose"),
    }
    for label, (c, extra, reason) in variants.items():
        path = tmp_path / f"{label}.crt"
        path.write_bytes(devpki.pem(c))
        result = openssl_verify(dev_pki, path, *extra)
        assert result.returncode != 0, label
        assert reason in (result.stdout + result.stderr).lower(), (label, result.stdout + result.stderr)


@needs_openssl
def test_issue_certificate_can_omit_extensions_and_use_sha1(tmp_path: Path) -> None:
    key = devpki.new_rsa_key(1024)
    c = devpki.issue_certificate(None, key, devpki.ca_name("TEST X"), key.public_key(), profile="tls-client",
                                 key_usage=None, extended_key_usage=None, policies=False, serial=42,
                                 hash_alg=hashes.SHA1())
    assert c.serial_number == 42
    assert isinstance(c.signature_hash_algorithm, hashes.SHA1)
    present = {e.oid for e in c.extensions}
    assert ExtensionOID.KEY_USAGE not in present and ExtensionOID.EXTENDED_KEY_USAGE not in present
    assert ExtensionOID.CERTIFICATE_POLICIES not in present
    crl = devpki.make_crl(c, key, [(42, dt.datetime.now(dt.UTC))], hash_alg=hashes.SHA1(), reason=None)
    assert isinstance(crl.signature_hash_algorithm, hashes.SHA1)
    (tmp_path / "ca.pem").write_bytes(devpki.pem(c))
    (tmp_path / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    checked = run("openssl", "crl", "-in", tmp_path / "crl.pem", "-CAfile", tmp_path / "ca.pem", "-noout")
    assert checked.returncode == 0 and "verify OK" in checked.stdout + checked.stderr, checked.stderr
    checked = run("openssl", "verify", "-auth_level", "0", "-CAfile", tmp_path / "ca.pem", tmp_path / "ca.pem")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with pytest.raises(TypeError):
        devpki.issue_certificate(None, key, devpki.ca_name("TEST X"), key.public_key(), profile="root",
                                 hash_alg=hashes.MD5())


# --- the CLI ----------------------------------------------------------------------------------------------------

def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mssgw")
    cmd_pki.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


def test_cli_dev_init_then_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "pki"
    assert cli(["pki", "dev-init", str(target), "--domain", "cli.test"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("created development PKI") and "jeanne.exemple@cli.test" in first
    assert cli(["pki", "dev-init", str(target)]) == 0
    assert "already" in capsys.readouterr().out


def test_cli_show_one_line_per_certificate_with_fingerprint(dev_pki: DevPki, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["pki", "show", str(dev_pki.directory)]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = list(dev_pki.certificates())
    assert len(lines) == len(expected) == 10
    for line, (role, path) in zip(lines, expected, strict=True):
        c = cert(path)
        assert line.split()[0] == role
        assert f"sha256={c.fingerprint(hashes.SHA256()).hex(':').upper()}" in line
        assert f"serial={c.serial_number:x}" in line
    assert "GN=Jeanne" in lines[4] and "CN=810001234567" in lines[4]
    assert "PRIVATE KEY" not in "\n".join(lines)


# --- the certificates in use: a real TLS handshake and real S/MIME, by openssl ---------------------------------

@needs_openssl
def test_tls_handshake_with_gateway_certificate_and_practitioner_client_certificate(dev_pki: DevPki) -> None:
    """Server side: Python's ssl with the chain file; client side: openssl s_client with a card-style auth cert."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(dev_pki.tls_server_chain, dev_pki.tls_server_key)
    ctx.load_verify_locations(dev_pki.ca_bundle)
    ctx.verify_mode = ssl.CERT_REQUIRED
    peer: list[Any] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with ctx.wrap_socket(conn, server_side=True) as tls:
                peer.append(tls.getpeercert() or {})
                tls.sendall(b"bonjour\n")
                tls.unwrap()  # close_notify, so the client sees a clean end of the session

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        p = dev_pki.practitioner("10001234567")
        result = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(dev_pki.ca_bundle),
             "-verify_return_error", "-verify_hostname", dev_pki.gateway_hostname,
             "-cert", str(p.auth_cert), "-key", str(p.auth_key), "-brief", "-ign_eof"],
            check=False, input="", capture_output=True, text=True, timeout=30)
        thread.join(timeout=30)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert "Verification: OK" in result.stderr and "bonjour" in result.stdout
    subject = dict(item for rdn in peer[0]["subject"] for item in rdn)
    assert subject["commonName"] == p.id_nat and subject["surname"] == p.surname


@needs_openssl
def test_openssl_cms_signs_with_the_signature_key_and_encrypts_to_the_auth_certificate(
        dev_pki: DevPki, tmp_path: Path) -> None:
    p = dev_pki.practitioner("10001234567")
    message = tmp_path / "msg.txt"
    message.write_bytes(b"Content-Type: text/plain\r\n\r\nCompte rendu de consultation.\r\n")
    signed, enveloped, out = tmp_path / "signed.eml", tmp_path / "enveloped.eml", tmp_path / "out.eml"
    anchors = tmp_path / "anchors.pem"  # `openssl cms` has no -CRLfile: the CA file carries the CRLs too
    anchors.write_bytes(dev_pki.root_cert.read_bytes() + dev_pki.crls_pem.read_bytes())
    run("openssl", "cms", "-sign", "-signer", p.sign_cert, "-inkey", p.sign_key, "-certfile", dev_pki.personnes_cert,
        "-in", message, "-out", signed, check=True)
    verified = run("openssl", "cms", "-verify", "-CAfile", anchors, "-purpose", "smimesign", "-crl_check", "-in", signed, "-out", out)
    assert verified.returncode == 0, verified.stderr
    assert out.read_bytes().replace(b"\r\n", b"\n").endswith(b"Compte rendu de consultation.\n")
    run("openssl", "cms", "-encrypt", "-aes256", "-in", message, "-out", enveloped, p.auth_cert, check=True)
    run("openssl", "cms", "-decrypt", "-recip", p.auth_cert, "-inkey", p.auth_key, "-in", enveloped, "-out", out,
        check=True)
    assert out.read_bytes().replace(b"\r\n", b"\n") == message.read_bytes().replace(b"\r\n", b"\n")
    r = dev_pki.revoked
    run("openssl", "cms", "-sign", "-signer", r.sign_cert, "-inkey", r.sign_key, "-certfile", dev_pki.personnes_cert,
        "-in", message, "-out", signed, check=True)
    rejected = run("openssl", "cms", "-verify", "-CAfile", anchors, "-crl_check", "-in", signed, "-out", out)
    assert rejected.returncode != 0 and "certificate revoked" in rejected.stderr
