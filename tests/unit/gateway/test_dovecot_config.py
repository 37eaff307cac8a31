"""The rendered Dovecot configuration: what it says, and that Dovecot's own parser (doveconf) accepts it."""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from config.schema import (
    DatabaseConfig,
    DovecotConfig,
    GatewayConfig,
    Listener,
    SecretRef,
    SpoolConfig,
    SubmissionConfig,
    TLSConfig,
)
from gateway.dovecot import _proxy_header
from gateway.dovecot_config import (
    DovecotConfigError,
    MailDirUnreachable,
    MailUserMissing,
    prepare_mail_dir,
    render_config,
    render_sql_config,
)

MAIL_USER = "mssgw-mail"


def existing_mail_user() -> str:
    """The mail user if present, else any unprivileged system user (rendering only needs one that exists)."""
    for name in (MAIL_USER, "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    pytest.skip("no unprivileged user to render for")


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mssgw-u-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def config(root: Path, url: str | None = None, password: SecretRef | None = None) -> GatewayConfig:
    return GatewayConfig(
        hostname="gw.dev.mssante.test",
        local_domains=("dev.mssante.test",),
        tls=TLSConfig(cert=root / "tls.crt", key=root / "tls.key"),
        database=DatabaseConfig(url=url or f"sqlite:///{root / 'gateway.db'}", password=password),
        spool=SpoolConfig(dir=root / "spool"),
        submission=SubmissionConfig(listen=Listener("127.0.0.1", 10587)),
        mailboxes=DovecotConfig(mode="embedded", imap=Listener("127.0.0.1", 10143), base_dir=root / "dovecot",
                                mail_dir=root / "mail", mail_user=existing_mail_user()),
    )


def test_rendered_config_says_what_the_gateway_needs(root: Path) -> None:
    conf = render_config(config(root), backend_port=40123)
    for line in (
        "ssl = required", "ssl_min_protocol = TLSv1.2", "disable_plaintext_auth = yes",
        "auth_mechanisms = plain login", f'base_dir = "{root}/dovecot"', "log_path = /dev/stderr",
        "protocols = imap lmtp", "listen = 127.0.0.1", "mail_location = maildir:~/Maildir",
        f"ssl_cert = <{root}/tls.crt", "haproxy = yes", "port = 40123", "haproxy_trusted_networks = 127.0.0.1",
    ):
        assert line in conf.splitlines() or f"  {line}" in conf or f"    {line}" in conf, line
    uid = pwd.getpwnam(existing_mail_user()).pw_uid
    assert f"first_valid_uid = {uid}" in conf and f"last_valid_uid = {uid}" in conf
    assert "10143" not in conf  # the client-facing port belongs to the gateway's relay, not to Dovecot
    assert "instance_name = mssgw-" in conf


def test_sql_file_for_sqlite(root: Path) -> None:
    sql = render_sql_config(config(root))
    assert f"connect = {root}/gateway.db" in sql and "driver = sqlite" in sql
    assert "default_pass_scheme = ARGON2ID" in sql
    assert ("password_query = SELECT address AS user, password_hash AS password FROM accounts "
            "WHERE address = '%Lu' AND active") in sql
    assert f"SELECT '{root}/mail/%Ld/%Ln' AS home, '{existing_mail_user()}' AS uid" in sql


def test_sql_file_for_postgresql_takes_the_password_from_its_secret(root: Path) -> None:
    secret = root / "pg.secret"
    secret.write_text("s3cr3t-Pw\n")
    cfg = config(root, "postgresql+psycopg://mssgw@db.example:5433/gw?sslmode=verify-full", SecretRef(file=secret))
    sql = render_sql_config(cfg)
    assert "driver = pgsql" in sql
    assert "connect = host=db.example port=5433 dbname=gw user=mssgw password=s3cr3t-Pw sslmode=verify-full" in sql
    assert "s3cr3t" not in render_config(cfg, backend_port=1)


@pytest.mark.parametrize(("url", "password", "match"), [
    ("mysql://u@h/db", None, "SQLite or PostgreSQL"),
    ("sqlite://", None, "absolute path"),
    ("postgresql://u@h/db", "two words", "the password"),
])
def test_what_dovecot_cannot_take_is_refused(root: Path, url: str, password: str | None, match: str) -> None:
    ref = None
    if password is not None:
        (root / "pw").write_text(password)
        ref = SecretRef(file=root / "pw")
    with pytest.raises(DovecotConfigError, match=match) as info:
        render_sql_config(config(root, url, ref))
    assert "two words" not in str(info.value)


def test_percent_and_quotes_in_paths_are_escaped(root: Path) -> None:
    odd = root / "100%"
    cfg = config(odd)
    assert f"'{odd}".replace("%", "%%") + "/mail/%Ld/%Ln'" in render_sql_config(cfg)
    quoted = dataclasses.replace(cfg, mailboxes=dataclasses.replace(cfg.mailboxes, mail_dir=root / "it's"))
    with pytest.raises(DovecotConfigError, match="quote"):
        render_sql_config(quoted)


def test_missing_mail_user_is_named(root: Path) -> None:
    cfg = config(root)
    cfg = dataclasses.replace(cfg, mailboxes=dataclasses.replace(cfg.mailboxes, mail_user="no-such-user-xyz"))
    with pytest.raises(MailUserMissing, match="useradd --system"):
        render_config(cfg)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to the mail user needs root")
def test_mail_dir_prepared_or_the_blocking_directory_named(root: Path) -> None:
    cfg = config(root)
    prepare_mail_dir(cfg)
    st = (root / "mail").stat()
    assert st.st_uid == pwd.getpwnam(cfg.mailboxes.mail_user).pw_uid and (st.st_mode & 0o777) == 0o700
    (root / "closed").mkdir(mode=0o700)
    closed = dataclasses.replace(cfg, mailboxes=dataclasses.replace(cfg.mailboxes, mail_dir=root / "closed" / "m"))
    with pytest.raises(MailDirUnreachable) as info:
        prepare_mail_dir(closed)
    assert info.value.path == root / "closed"


def test_doveconf_accepts_the_rendered_files(root: Path) -> None:
    doveconf = shutil.which("doveconf") or "/usr/bin/doveconf"
    if not Path(doveconf).exists():
        pytest.skip("doveconf is not installed")
    cfg = config(root)
    (root / "dovecot").mkdir()
    conf = root / "dovecot" / "mssgw-dovecot.conf"
    conf.write_text(render_config(cfg, backend_port=40123))
    (root / "dovecot" / "dovecot-sql.conf.ext").write_text(render_sql_config(cfg))
    (root / "tls.crt").write_text("")
    (root / "tls.key").write_text("")
    out = subprocess.run([doveconf, "-c", str(conf), "-n"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "ssl = required" in out.stdout and "port = 40123" in out.stdout


def test_proxy_header_carries_the_client_addresses() -> None:
    assert _proxy_header(("127.0.0.1", 50000), ("127.0.0.1", 10143)) == b"PROXY TCP4 127.0.0.1 127.0.0.1 50000 10143\r\n"
    assert _proxy_header(("::1", 5), ("::1", 6)) == b"PROXY TCP6 ::1 ::1 5 6\r\n"
    assert _proxy_header(("::ffff:10.0.0.1", 5), ("10.0.0.2", 6)) == b"PROXY TCP4 10.0.0.1 10.0.0.2 5 6\r\n"
    assert _proxy_header(("10.0.0.1", 5), ("::1", 6)) == b"PROXY UNKNOWN\r\n"


def test_cli_prints_the_rendered_config(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    toml = root / "gw.toml"
    toml.write_text(f"""
hostname = "gw.dev.mssante.test"
local_domains = ["dev.mssante.test"]
[tls]
cert = "tls.crt"
key = "tls.key"
[database]
url = "sqlite:///gateway.db"
[spool]
dir = "spool"
[submission]
listen = {{ host = "127.0.0.1", port = 10587 }}
[mailboxes]
mode = "embedded"
imap = {{ host = "127.0.0.1", port = 10143 }}
base_dir = "dc"
mail_dir = "mail"
mail_user = "{existing_mail_user()}"
""")
    assert main(["-c", str(toml), "dovecot", "config"]) == 0
    out = capsys.readouterr().out
    assert f'base_dir = "{root}/dc"' in out and "ssl = required" in out
    assert main(["-c", str(toml), "dovecot", "config", "--sql"]) == 0
    assert f"connect = {root}/gateway.db" in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to the mail user needs root")
def test_missing_parents_are_created_searchable_under_a_strict_umask(root: Path) -> None:
    cfg = config(root)
    deep = dataclasses.replace(cfg, mailboxes=dataclasses.replace(cfg.mailboxes, mail_dir=root / "a" / "b" / "mail"))
    old = os.umask(0o077)
    try:
        prepare_mail_dir(deep)
    finally:
        os.umask(old)
    assert ((root / "a").stat().st_mode & 0o777) == 0o755 == ((root / "a" / "b").stat().st_mode & 0o777)
    assert ((root / "a" / "b" / "mail").stat().st_mode & 0o777) == 0o700
