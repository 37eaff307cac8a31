from __future__ import annotations

import pytest

from gateway.addresses import AddressError, parse_mailbox


def test_plain_address_lowercases_the_domain_only() -> None:
    m = parse_mailbox("Jeanne.Exemple@Medecin.MSSante.fr")
    assert (m.local, m.domain) == ("Jeanne.Exemple", "medecin.mssante.fr")
    assert str(m) == "Jeanne.Exemple@medecin.mssante.fr"


@pytest.mark.parametrize("address", [
    "@relay.example,@other.test:victim@target.test",   # source route
    "victim%target.test@dev.mssante.test",              # percent hack
    "target.test!victim@dev.mssante.test",              # bang path
    '"victim@target.test"@dev.mssante.test',            # quoted local part
    "victim@[192.0.2.1]",                               # address literal
    "victim@localhost",                                 # no dot
    "victim@-bad-.test",
    "no-at-sign",
    "a..b@dev.mssante.test",
    "x" * 65 + "@dev.mssante.test",
    "",
])
def test_relay_tricks_are_refused(address: str) -> None:
    with pytest.raises(AddressError):
        parse_mailbox(address)
