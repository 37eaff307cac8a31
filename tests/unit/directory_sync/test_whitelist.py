from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from directory_sync.errors import DeletionBrake, WhitelistError
from directory_sync.models import SyncRun, TrustDomain
from directory_sync.whitelist import (
    TrustSpace,
    domain_forms,
    import_whitelist,
    is_trust_space_domain,
    parse_whitelist,
)

NS = "https://listeblanche.mssante.fr/schema"


def _domain(name: str, dn: str = "CN=mx.exemple.fr,OU=312345678900012,O=CH EXEMPLE,ST=Rhône (69),C=FR") -> str:
    return (f"<Domaine><Nom>{name}</Nom><Description>CH Exemple</Description>"
            f"<DNCertificatOperateur>{dn}</DNCertificatOperateur>"
            f"<ResponsableContact>dsi@exemple.fr</ResponsableContact><SupportContact>support@exemple.fr"
            f"</SupportContact><DateMAJ>2025-11-02</DateMAJ></Domaine>")


def _write(path: Path, names: list[str], ns: str = NS) -> Path:
    body = "".join(_domain(n) for n in names)
    path.write_text(f'<?xml version="1.0" encoding="UTF-8"?>\n<ListeBlanche xmlns="{ns}">'
                    f"<DateDeGeneration>2026-08-26T03:00:00</DateDeGeneration>{body}</ListeBlanche>", encoding="utf-8")
    return path


def test_idn_domains_have_both_forms() -> None:
    assert domain_forms("Hôpital-Exemple.mssante.fr") == ("xn--hpital-exemple-0ob.mssante.fr",
                                                          "hôpital-exemple.mssante.fr")
    assert domain_forms("xn--hpital-exemple-0ob.mssante.fr.") == ("xn--hpital-exemple-0ob.mssante.fr",
                                                                  "hôpital-exemple.mssante.fr")
    with pytest.raises(ValueError):
        domain_forms("bad..domain")


def test_parse_keeps_dn_and_reports_bad_entries(tmp_path: Path) -> None:
    path = _write(tmp_path / "l.xml", ["ch-exemple.mssante.fr", "hôpital-exemple.mssante.fr", "", "-bad-.fr"])
    wl = parse_whitelist(path)
    assert wl.generated == "2026-08-26T03:00:00"
    assert set(wl.entries) == {"ch-exemple.mssante.fr", "xn--hpital-exemple-0ob.mssante.fr"}
    entry = wl.entries["ch-exemple.mssante.fr"]
    assert entry.operator_dn == "CN=mx.exemple.fr,OU=312345678900012,O=CH EXEMPLE,ST=Rhône (69),C=FR"
    assert [i for i, _ in wl.malformed] == [3, 4]


def test_not_a_whitelist(tmp_path: Path) -> None:
    bad = tmp_path / "x.xml"
    bad.write_text("<ListeBlanche><oops>", encoding="utf-8")
    with pytest.raises(WhitelistError, match="not well-formed"):
        parse_whitelist(bad)
    other = tmp_path / "y.xml"
    other.write_text("<html><body/></html>", encoding="utf-8")
    with pytest.raises(WhitelistError, match="no Domaine"):
        parse_whitelist(other)


def test_import_lookup_both_forms_and_reimport(engine: Engine, tmp_path: Path) -> None:
    names = [f"ch-{i}.mssante.fr" for i in range(40)] + ["hôpital-exemple.mssante.fr"]
    path = _write(tmp_path / "l.xml", names)
    report = import_whitelist(engine, path)
    assert (report.domains, report.inserted) == (41, 41)
    assert is_trust_space_domain(engine, "CH-3.MSSANTE.FR")
    assert is_trust_space_domain(engine, "xn--hpital-exemple-0ob.mssante.fr")
    assert is_trust_space_domain(engine, "HÔPITAL-exemple.mssante.fr")
    assert not is_trust_space_domain(engine, "evil.example.com")
    assert not is_trust_space_domain(engine, "sub.ch-3.mssante.fr")
    space = TrustSpace(engine)
    assert space.reload() == 41
    assert space.is_trust_space_domain("hôpital-exemple.mssante.fr")
    assert (space.operator_dn("ch-1.mssante.fr") or "").startswith("CN=mx.exemple.fr")
    again = import_whitelist(engine, path)
    assert "nothing changed" in again.summary()


def test_whitelist_brake(engine: Engine, tmp_path: Path) -> None:
    import_whitelist(engine, _write(tmp_path / "a.xml", [f"d{i}.fr" for i in range(20)]))
    with pytest.raises(DeletionBrake):
        import_whitelist(engine, _write(tmp_path / "b.xml", [f"d{i}.fr" for i in range(10)]))
    with engine.connect() as conn:
        assert len(conn.execute(select(TrustDomain.domain_ascii)).all()) == 20
        assert conn.execute(select(SyncRun.status).order_by(SyncRun.id.desc()).limit(1)).scalar_one() == "refused"
    report = import_whitelist(engine, _write(tmp_path / "c.xml", [f"d{i}.fr" for i in range(10)]), force=True)
    assert report.deleted == 10
