"""RFC 5280 path checks on their own: anchors, CA constraints, CRL currency and signatures."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import pytest
from cryptography import x509

from gateway.devpki import (
    DevPki,
    issue_certificate,
    load_certificate,
    load_private_key,
    make_crl,
    new_rsa_key,
)
from smime import certpath
from smime.certpath import (
    TrustStore,
    ValidationPolicy,
    check_email_signing,
    validate_path,
)
from smime.errors import (
    BadCertificateUse,
    CertificateExpired,
    CertificateRevoked,
    MissingIntermediate,
    RevocationUnknown,
)
from smime.filekeys import FileKey

DAY = datetime.timedelta(days=1)


def test_good_path_checks_every_crl(jeanne_sign, trust):
    result = validate_path(jeanne_sign.certificate, trust)
    assert len(result.certificates) == 3
    assert result.revocation.count("not revoked") == 2  # the practitioner and the PERSONNES CA


def test_bundle_intermediates_are_not_anchors(trust):
    assert len(trust.anchors) == 1 and len(trust.intermediates) == 2


def test_stale_crl_is_unknown_revocation(jeanne_sign, trust):
    later = datetime.datetime.now(datetime.UTC) + 60 * DAY  # the dev CRLs are good for 30 days
    with pytest.raises(RevocationUnknown, match="not current"):
        validate_path(jeanne_sign.certificate, trust, at=later)
    soft = validate_path(jeanne_sign.certificate, trust, at=later, policy=ValidationPolicy(revocation="soft-fail"))
    assert "not checked" in soft.revocation


def test_crl_signed_by_another_key_is_ignored(pki, jeanne_sign, trust):
    ca = load_certificate(pki.personnes_cert)
    forged = make_crl(ca, new_rsa_key(), [(jeanne_sign.certificate.serial_number, datetime.datetime.now(datetime.UTC))])
    others = tuple(c for c in trust.crls if c.issuer != ca.subject)
    store = TrustStore(trust.anchors, trust.intermediates, (*others, forged))
    with pytest.raises(RevocationUnknown, match="no CRL of the issuer"):
        validate_path(jeanne_sign.certificate, store)


def test_revocation_after_the_verification_time_does_not_count(pki, jeanne_sign, trust):
    ca, key = load_certificate(pki.personnes_cert), load_private_key(pki.personnes_key)
    issued = jeanne_sign.certificate.not_valid_before_utc
    minute = datetime.timedelta(minutes=1)
    # make_crl backdates thisUpdate by one hour: this CRL is current from `issued` on.
    crl = make_crl(ca, key, [(jeanne_sign.certificate.serial_number, issued + 30 * minute)], now=issued + 60 * minute)
    others = tuple(c for c in trust.crls if c.issuer != ca.subject)
    store = TrustStore(trust.anchors, trust.intermediates, (*others, crl))
    with pytest.raises(CertificateRevoked):
        validate_path(jeanne_sign.certificate, store)
    assert validate_path(jeanne_sign.certificate, store, at=issued + 10 * minute).certificates


def test_end_entity_cannot_issue(pki, jeanne_sign, trust):
    """A leaf (cA=FALSE) used as an issuing CA breaks RFC 5280 §6.1.4 (k)."""
    key = new_rsa_key()
    fake = issue_certificate(jeanne_sign.certificate, jeanne_sign.private_key,
                             x509.Name.from_rfc4514_string("CN=fake"), key.public_key(), profile="signature")
    store = TrustStore(trust.anchors, trust.intermediates, trust.crls)
    with pytest.raises(BadCertificateUse, match="cA=FALSE|no basicConstraints"):
        validate_path(fake, store, extra=[jeanne_sign.certificate], policy=ValidationPolicy(revocation="off"))


def test_path_length_constraint(pki, trust):
    """PERSONNES has pathLenConstraint 0: a sub-CA below it is refused."""
    ca, ca_key = load_certificate(pki.personnes_cert), load_private_key(pki.personnes_key)
    sub_key, leaf_key = new_rsa_key(), new_rsa_key()
    sub = issue_certificate(ca, ca_key, x509.Name.from_rfc4514_string("CN=sub CA"), sub_key.public_key(),
                            profile="intermediate")
    leaf = issue_certificate(sub, sub_key, x509.Name.from_rfc4514_string("CN=leaf"), leaf_key.public_key(),
                             profile="signature")
    with pytest.raises(BadCertificateUse, match="pathLenConstraint 0"):
        validate_path(leaf, trust, extra=[sub], policy=ValidationPolicy(revocation="off"))


def test_missing_issuer(jeanne_sign):
    with pytest.raises(MissingIntermediate):
        validate_path(jeanne_sign.certificate, TrustStore(()))


def test_email_signing_usage(issuer, jeanne_sign, jeanne_auth):
    assert "emailProtection" in check_email_signing(jeanne_sign.certificate)  # nonRepudiation alone is enough
    assert check_email_signing(jeanne_auth.certificate)  # digitalSignature
    tls_only = issuer.signer(extended_key_usage=[x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH])
    with pytest.raises(BadCertificateUse, match="emailProtection"):
        check_email_signing(tls_only.certificate)


# --- the cache of validated paths (a receiving gateway sees the same signer's chain in message after message) ---

@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[x509.Certificate]:
    """The end entities whose path was built (not served from the cache)."""
    built: list[x509.Certificate] = []
    real = certpath.build_path

    def counting(end_entity: x509.Certificate, *args: Any) -> tuple[x509.Certificate, ...]:
        built.append(end_entity)
        return real(end_entity, *args)

    monkeypatch.setattr(certpath, "build_path", counting)
    return built


def fresh(trust: TrustStore, crls: tuple[x509.CertificateRevocationList, ...] | None = None) -> TrustStore:
    """The same anchors as loaded again (an empty cache), with other CRLs if given."""
    return TrustStore(trust.anchors, trust.intermediates, trust.crls if crls is None else crls)


def test_a_validated_path_is_served_again(jeanne_sign: FileKey, trust: TrustStore, builds: list[x509.Certificate]) -> None:
    store = fresh(trust)
    first = validate_path(jeanne_sign.certificate, store)
    assert validate_path(jeanne_sign.certificate, store) is first
    assert builds == [jeanne_sign.certificate]
    validate_path(jeanne_sign.certificate, store, policy=ValidationPolicy(revocation="soft-fail"))
    validate_path(jeanne_sign.certificate, store, extra=[jeanne_sign.certificate])
    assert len(builds) == 3  # another policy, other certificates from the message: validated on their own


def test_reloaded_crls_revoke_a_cached_path(pki: DevPki, jeanne_sign: FileKey, trust: TrustStore) -> None:
    store = fresh(trust)
    validate_path(jeanne_sign.certificate, store)
    ca, key = load_certificate(pki.personnes_cert), load_private_key(pki.personnes_key)
    now = datetime.datetime.now(datetime.UTC)
    revoked = make_crl(ca, key, [(jeanne_sign.certificate.serial_number, now - datetime.timedelta(minutes=5))])
    reloaded = fresh(trust, (*(c for c in trust.crls if c.issuer != ca.subject), revoked))
    with pytest.raises(CertificateRevoked):
        validate_path(jeanne_sign.certificate, reloaded)
    with pytest.raises(CertificateRevoked):
        validate_path(jeanne_sign.certificate, reloaded)  # a failure is not kept either


def test_a_cached_path_is_not_used_once_a_revocation_takes_effect(pki: DevPki, jeanne_sign: FileKey, trust: TrustStore, builds: list[x509.Certificate]) -> None:
    ca, key = load_certificate(pki.personnes_cert), load_private_key(pki.personnes_key)
    issued = jeanne_sign.certificate.not_valid_before_utc
    minute = datetime.timedelta(minutes=1)
    crl = make_crl(ca, key, [(jeanne_sign.certificate.serial_number, issued + 30 * minute)], now=issued + 60 * minute)
    store = fresh(trust, (*(c for c in trust.crls if c.issuer != ca.subject), crl))
    validate_path(jeanne_sign.certificate, store, at=issued + 10 * minute)
    validate_path(jeanne_sign.certificate, store, at=issued + 20 * minute)
    assert len(builds) == 1  # the same span: served again
    with pytest.raises(CertificateRevoked):
        validate_path(jeanne_sign.certificate, store, at=issued + 31 * minute)
    with pytest.raises(CertificateRevoked):
        validate_path(jeanne_sign.certificate, store, at=issued + 30 * minute)  # the revocation date itself


def test_a_cached_path_is_not_used_past_its_crls_next_update(jeanne_sign: FileKey, trust: TrustStore) -> None:
    store = fresh(trust)
    validate_path(jeanne_sign.certificate, store)
    with pytest.raises(RevocationUnknown, match="not current"):
        validate_path(jeanne_sign.certificate, store, at=datetime.datetime.now(datetime.UTC) + 60 * DAY)


def test_a_cached_path_is_not_used_past_the_expiry_of_a_certificate(jeanne_sign: FileKey, trust: TrustStore) -> None:
    store, off = fresh(trust), ValidationPolicy(revocation="off")
    expiry = jeanne_sign.certificate.not_valid_after_utc
    validate_path(jeanne_sign.certificate, store, at=expiry - DAY, policy=off)
    assert validate_path(jeanne_sign.certificate, store, at=expiry, policy=off).certificates  # still valid then
    with pytest.raises(CertificateExpired):
        validate_path(jeanne_sign.certificate, store, at=expiry + datetime.timedelta(seconds=1), policy=off)


def test_the_certificates_of_the_message_are_part_of_what_is_cached(pki: DevPki, jeanne_sign: FileKey, anchors_only: TrustStore) -> None:
    store = fresh(anchors_only)
    personnes = load_certificate(pki.personnes_cert)
    assert validate_path(jeanne_sign.certificate, store, extra=[personnes]).certificates
    with pytest.raises(MissingIntermediate):
        validate_path(jeanne_sign.certificate, store)


def test_a_store_with_other_crls_starts_with_an_empty_cache(jeanne_sign: FileKey, trust: TrustStore) -> None:
    store = fresh(trust)
    validate_path(jeanne_sign.certificate, store)
    assert len(store.validated_paths) == 1
    assert len(dataclasses.replace(store, crls=trust.crls[:1]).validated_paths) == 0
