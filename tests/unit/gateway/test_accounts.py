from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from config.schema import DatabaseConfig
from gateway.accounts import AccountExists, AccountStore, BadAccountInput, NoSuchAccount, accounts
from gateway.db import create_tables, make_engine, metadata

PW = "correct horse battery"


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'gw.db'}"
    else:
        url = request.getfixturevalue("pg_database")
    eng = make_engine(DatabaseConfig(url=url))
    create_tables(eng)
    yield eng
    metadata.drop_all(eng)
    eng.dispose()


def test_add_authenticate_and_hash_format(engine: Engine) -> None:
    store = AccountStore(engine)
    store.add("Jeanne.Exemple@Dev.MSSante.test", PW)
    acc = store.authenticate("Jeanne.Exemple@dev.mssante.test", PW)
    assert acc is not None and acc.address == "Jeanne.Exemple@dev.mssante.test"
    with engine.connect() as conn:
        stored = conn.execute(select(accounts.c.password_hash)).scalar_one()
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")  # what Dovecot's ARGON2ID reads
    assert PW not in stored


def test_wrong_password_unknown_and_disabled_accounts_fail(engine: Engine) -> None:
    store = AccountStore(engine)
    store.add("a@dev.mssante.test", PW)
    assert store.authenticate("a@dev.mssante.test", PW + "x") is None
    assert store.authenticate("nobody@dev.mssante.test", PW) is None
    assert store.authenticate("not an address", PW) is None
    store.set_active("a@dev.mssante.test", False)
    assert store.authenticate("a@dev.mssante.test", PW) is None
    assert not store.is_mailbox("a@dev.mssante.test")
    store.set_active("a@dev.mssante.test", True)
    assert store.is_mailbox("a@dev.mssante.test")


def test_passwd_list_and_errors(engine: Engine) -> None:
    store = AccountStore(engine)
    store.add("b@dev.mssante.test", PW)
    store.set_password("b@dev.mssante.test", "another long password")
    assert store.authenticate("b@dev.mssante.test", PW) is None
    assert store.authenticate("b@dev.mssante.test", "another long password") is not None
    assert [a.address for a in store.list()] == ["b@dev.mssante.test"]
    with pytest.raises(AccountExists):
        store.add("b@DEV.mssante.test", PW)
    with pytest.raises(NoSuchAccount):
        store.set_password("c@dev.mssante.test", PW)
    with pytest.raises(BadAccountInput):
        store.add("c@dev.mssante.test", "short")
    with pytest.raises(BadAccountInput):
        store.add("c%evil@dev.mssante.test", PW)


@pytest.mark.parametrize("address", ["/alice@dev.mssante.test", "a/b@dev.mssante.test", "o'neil@dev.mssante.test",
                                     "a+tag@dev.mssante.test"])
def test_an_account_address_holds_only_what_a_dovecot_login_may(engine: Engine, address: str) -> None:
    """Valid envelope addresses, but not logins: '/' would name another mailbox directory."""
    with pytest.raises(BadAccountInput, match="only letters, digits"):
        AccountStore(engine).add(address, PW)
    assert AccountStore(engine).list() == []
