"""RFC 5280 path checks on their own: anchors, CA constraints, CRL currency and signatures."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509

from gateway.devpki import (
    issue_certificate,
    load_certificate,
    load_private_key,
    make_crl,
    new_rsa_key,
)
from smime.certpath import (
    TrustStore,
    ValidationPolicy,
    check_email_signing,
    validate_path,
)
from smime.errors import (
    BadCertificateUse,
    CertificateRevoked,
    MissingIntermediate,
    RevocationUnknown,
)

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
