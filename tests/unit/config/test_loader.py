from __future__ import annotations

from pathlib import Path

import pytest

from config.errors import ConfigError
from config.loader import load, read_secret
from config.schema import SecretRef

ROOT = Path(__file__).resolve().parents[3]

MINIMAL = """
hostname = "gw.test"
local_domains = ["a.test"]
[tls]
cert = "c.pem"
key = "k.pem"
[database]
url = "sqlite:///db.sqlite"
[spool]
dir = "spool"
[submission]
listen = { host = "127.0.0.1", port = 1587 }
[mailboxes]
mode = "embedded"
imap = { host = "127.0.0.1", port = 1143 }
base_dir = "dc"
mail_dir = "mail"
"""


def write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "gw.toml"
    f.write_text(text, encoding="utf-8")
    return f


def test_shipped_configs_load() -> None:
    for name in ("dev.toml", "gateway.example.toml"):
        cfg = load(ROOT / "config" / name)
        assert cfg.limits.max_message_size == 25 * 1024 * 1024
        assert cfg.tls.cert.is_absolute()


def test_relative_paths_and_sqlite_url_resolve_against_the_file(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, MINIMAL))
    assert cfg.spool.dir == tmp_path / "spool"
    assert cfg.database.url == f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert cfg.mailboxes.lmtp_endpoint == f"unix:{tmp_path / 'dc' / 'lmtp'}"
    assert cfg.source == tmp_path / "gw.toml"


@pytest.mark.parametrize("change, key, words", [
    (("port = 1587", 'port = "x"'), "submission.listen.port", "non-negative integer"),
    (('mode = "embedded"', 'mode = "elsewhere"'), "mailboxes.mode", "one of 'embedded', 'external'"),
    (('hostname = "gw.test"', 'hostname = "gw.test"\nhost_name = "x"'), "host_name", "unknown key"),
    (('[spool]\ndir = "spool"', "[spool]"), "spool.dir", "is required"),
    (('url = "sqlite:///db.sqlite"', 'url = "postgresql://u:pw@h/db"'), "database.url", "no password"),
    (('local_domains = ["a.test"]', 'local_domains = ["A.test"]'), "local_domains", "lower case"),
    (('[mailboxes]', '[mailboxes]\nlmtp_password = "hunter2"'), "mailboxes.lmtp_password", "unknown key"),
])
def test_errors_name_the_file_the_key_and_the_expectation(tmp_path: Path, change, key, words) -> None:
    f = write(tmp_path, MINIMAL.replace(*change))
    with pytest.raises(ConfigError) as info:
        load(f)
    assert info.value.file == f
    assert info.value.key == key
    assert words in str(info.value)
    assert str(f) in str(info.value)


def test_inline_secret_is_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace('url = "sqlite:///db.sqlite"', 'url = "sqlite:///db.sqlite"\npassword = "hunter2"')
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text))
    assert info.value.key == "database.password"


def test_secret_reference_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    text = MINIMAL.replace('url = "sqlite:///db.sqlite"',
                           'url = "postgresql+psycopg://u@h/db"\npassword = { file = "pw" }')
    cfg = load(write(tmp_path, text))
    assert cfg.database.password is not None
    assert read_secret(cfg.database.password) == "s3cret"
    monkeypatch.setenv("MSSGW_TEST_SECRET", "from-env")
    assert read_secret(SecretRef(env="MSSGW_TEST_SECRET")) == "from-env"
    with pytest.raises(ConfigError):
        read_secret(SecretRef(env="MSSGW_TEST_UNSET_VARIABLE"))


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "hostname = "))
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml")


def test_relay_routes_and_key_files(tmp_path: Path) -> None:
    text = MINIMAL + """
[relay]
routes = { "b.mssante.test" = "127.0.0.1:10025" }
nameservers = ["127.0.0.1:5353"]
[smime]
trust_anchors = "anchors.pem"
keys = [{ account = "secretariat@a.test", cert = "org.crt", key = "org.key" }]
"""
    cfg = load(write(tmp_path, text))
    assert cfg.relay.routes == {"b.mssante.test": "127.0.0.1:10025"}
    assert cfg.smime is not None and cfg.smime.keys[0].key == tmp_path / "org.key"
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text.replace('"127.0.0.1:10025"', "25")))
    assert info.value.key == "relay.routes.b.mssante.test"
