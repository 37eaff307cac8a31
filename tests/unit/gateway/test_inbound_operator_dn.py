"""`subject_matches_dn`: a peer's certificate subject against the operator DN of the trust-space list
(mssante.md §1.3), as the list writes it and as hand-made lists write it."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from gateway.devpki import new_rsa_key, practitioner_name, structure_name
from gateway.inbound import subject_matches_dn


def certificate(subject: x509.Name) -> x509.Certificate:
    key = new_rsa_key()
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))


OPERATOR = certificate(structure_name("mx.ch-exemple.fr", "12345678900012", "CH EXEMPLE", state="Rhône (69)"))


@pytest.mark.parametrize("dn", [
    "CN=mx.ch-exemple.fr,OU=312345678900012,O=CH EXEMPLE,ST=Rhône (69),C=FR",  # as the list writes it
    "C=FR,ST=Rhône (69),O=CH EXEMPLE,OU=312345678900012,CN=mx.ch-exemple.fr",  # as OpenSSL prints it
    "CN=MX.CH-EXEMPLE.FR, OU=312345678900012, O=ch  exemple, ST=rhône (69), C=fr",  # case and spacing
    "cn=mx.ch-exemple.fr,ou = 312345678900012,o=CH EXEMPLE,st=Rhône (69),c=FR",  # type names in lower case
])
def test_the_same_dn_however_written_matches(dn: str) -> None:
    assert subject_matches_dn(OPERATOR, dn)


@pytest.mark.parametrize("dn", [
    "CN=mx.autre-operateur.fr,OU=312345678900012,O=CH EXEMPLE,ST=Rhône (69),C=FR",  # another host
    "CN=mx.ch-exemple.fr,OU=312345678900012,O=CH EXEMPLE,C=FR",  # an RDN missing
    "CN=mx.ch-exemple.fr,O=CH EXEMPLE,OU=312345678900012,ST=Rhône (69),C=FR",  # RDNs in another order
    "CN=mx.ch-exemple.fr+OU=312345678900012,O=CH EXEMPLE,ST=Rhône (69),C=FR",  # two RDNs made one
])
def test_another_dn_does_not(dn: str) -> None:
    assert not subject_matches_dn(OPERATOR, dn)


def test_multi_valued_rdns_compare_as_sets() -> None:
    card = certificate(practitioner_name("10001234567", "EXEMPLE", "Jeanne", "Médecin"))
    assert subject_matches_dn(card, "GN=Jeanne+SN=EXEMPLE+CN=810001234567,title=Médecin,OU=TEST,C=FR")
    assert subject_matches_dn(card, "CN=810001234567+SN=EXEMPLE+GN=Jeanne,title=Médecin,OU=TEST,C=FR")


def test_an_escaped_comma_stays_in_its_value() -> None:
    cert = certificate(structure_name("mx.exemple.fr", "12345678900012", "DUPONT, MARTIN ET ASSOCIES"))
    assert subject_matches_dn(cert, r"CN=mx.exemple.fr,OU=312345678900012,O=DUPONT\, MARTIN ET ASSOCIES,C=FR")


def test_a_dn_that_cannot_be_read_is_an_error() -> None:
    with pytest.raises(ValueError):
        subject_matches_dn(OPERATOR, "this is not a DN")
