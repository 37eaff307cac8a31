"""Dovecot's configuration, rendered from the gateway's: dovecot.conf, the SQL passdb/userdb file, the mail directory.

Dovecot authenticates IMAP logins against the gateway's own `accounts` table (an SQL passdb, argon2id hashes) and
refuses unknown users at LMTP RCPT (an SQL userdb on the same table). Mail is stored as one unprivileged user, under
mail_dir/<domain>/<local part>. Nothing here starts a process: gateway.dovecot does.
"""

from __future__ import annotations

import grp
import hashlib
import logging
import os
import pwd
import socket
import stat
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from config.loader import read_secret
from config.schema import GatewayConfig, ImapLimitsConfig
from gateway.accounts import ACCOUNT_ADDRESS_CHARS
from gateway.errors import GatewayError
from gateway.tls import MSSANTE_TLS12_CIPHERS

log = logging.getLogger(__name__)

CONF_NAME = "mssgw-dovecot.conf"  # not dovecot.conf: Dovecot makes that a symlink to the file it runs
SQL_CONF_NAME = "dovecot-sql.conf.ext"
# Login and mail processes beyond mailboxes.limits.max_connections: the supervisor's readiness probe, and a margin
# so that the relay's own limit is the one clients meet (its `* BYE`, not a connection left hanging in Dovecot).
_SPARE_LOGINS = 4


class DovecotError(GatewayError):
    """Base class: the mailbox store cannot be configured or run."""


class DovecotConfigError(DovecotError):
    """A gateway setting cannot be expressed in Dovecot's configuration."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


class MailUserMissing(DovecotError):
    """The unprivileged user that owns the mailboxes does not exist on this host."""

    def __init__(self, user: str) -> None:
        self.user = user
        super().__init__(f"the mail user {user!r} does not exist; create it with: "
                         f"useradd --system --no-create-home --shell /usr/sbin/nologin {user}")


class MailDirUnreachable(DovecotError):
    """The mail user cannot traverse a directory on the way to mail_dir (a checkout under /root is 0700)."""

    def __init__(self, path: Path, user: str, mail_dir: Path) -> None:
        self.path = path
        self.user = user
        self.mail_dir = mail_dir
        super().__init__(f"the mail user {user!r} cannot reach {mail_dir}: {path} is not searchable by it; "
                         f"fix: chmod o+x {path}, or set mailboxes.mail_dir to a directory outside it")


def instance_name(cfg: GatewayConfig) -> str:
    """A name unique to this base_dir, so `doveadm -i` and the process list tell instances apart."""
    digest = hashlib.sha256(str(cfg.mailboxes.base_dir).encode()).hexdigest()[:10]
    return f"mssgw-{digest}"


def free_loopback_port() -> int:
    """An ephemeral port on 127.0.0.1 that was free a moment ago (for Dovecot's internal, PROXY-only listener)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _dq(value: str | Path) -> str:
    """Quote a value for dovecot.conf (a double-quoted string); `%` is escaped against variable expansion."""
    text = str(value)
    if any(c in text for c in "\r\n\0"):
        raise DovecotConfigError("mailboxes", f"a control character in {text!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _sql_literal(value: str) -> str:
    """An SQL string literal inside a Dovecot query template: quotes doubled, `%` escaped for var expansion."""
    return "'" + value.replace("'", "''").replace("%", "%%") + "'"


def render_config(cfg: GatewayConfig, *, backend_port: int | None = None) -> str:
    """Render dovecot.conf for the embedded instance.

    `backend_port` is Dovecot's loopback listener that only accepts PROXY protocol connections from the gateway's
    relay (see the module docstring); by default a free port is picked now. Everything Dovecot writes stays under
    `base_dir`; the only client-facing listener is the gateway's relay on `imap.host:imap.port`.
    """
    mb = cfg.mailboxes
    lim = _checked_limits(mb.limits)
    base = mb.base_dir
    port = free_loopback_port() if backend_port is None else backend_port
    try:
        pw = pwd.getpwnam(mb.mail_user)
    except KeyError:
        raise MailUserMissing(mb.mail_user) from None
    if pw.pw_uid == 0:
        raise DovecotConfigError("mailboxes.mail_user", "must not be root")
    uid_range = f"first_valid_uid = {pw.pw_uid}\nlast_valid_uid = {pw.pw_uid}\n"
    lines = f"""\
# Rendered by mssgw from {cfg.source or 'the gateway configuration'}; do not edit, it is rewritten at each start.
instance_name = {instance_name(cfg)}
base_dir = {_dq(base)}
state_dir = {_dq(base / 'state')}
log_path = /dev/stderr
log_timestamp = ""
hostname = {_dq(cfg.hostname)}
protocols = imap lmtp
listen = 127.0.0.1
shutdown_clients = yes

# TLS for IMAP (RFC 8314 §3, RFC 9051 §11.1): STARTTLS only, TLS 1.2 or newer, no login in clear text.
ssl = required
ssl_cert = <{_include_path(cfg.tls.cert)}
ssl_key = <{_include_path(cfg.tls.key)}
ssl_min_protocol = {cfg.tls.min_version}
ssl_prefer_server_ciphers = yes
ssl_cipher_list = {MSSANTE_TLS12_CIPHERS}
disable_plaintext_auth = yes
auth_mechanisms = plain login
auth_username_format = %Lu
# No "/" in a login: the home is mail_dir/<domain>/<local part>, and "/alice" would name alice's.
auth_username_chars = {"".join(sorted(ACCOUNT_ADDRESS_CHARS))}
auth_verbose = yes
auth_verbose_passwords = no

# Brute force: every failed login is answered after auth_failure_delay, and the authentication penalty (anvil)
# slows each client address further, up to 15 s a try. It sees the real address through the relay's PROXY header.
# No network is trusted: a trusted client could name another address (ID x-originating-ip) and skip the penalty.
auth_failure_delay = {lim.auth_failure_delay} secs
haproxy_trusted_networks = 127.0.0.1
login_trusted_networks =
login_greeting = {_dq(cfg.hostname + ' IMAP ready.')}
imap_id_send =

# Accounts: the gateway's SQL table; argon2id hashes as argon2-cffi writes them (no {{SCHEME}} prefix).
passdb {{
  driver = sql
  args = {_dq(base / SQL_CONF_NAME)}
}}
userdb {{
  driver = sql
  args = {_dq(base / SQL_CONF_NAME)}
}}

# Mail: maildir under mail_dir/<domain>/<local part>, owned by {mb.mail_user} only.
mail_location = maildir:~/Maildir
mail_uid = {mb.mail_user}
mail_gid = {mb.mail_user}
{uid_range}
lda_mailbox_autocreate = yes
lmtp_save_to_detail_mailbox = no

# One user, one private namespace: no shared or public namespace, no ACL, no METADATA, no URLAUTH, no path outside
# the user's own Maildir (mailbox names with '/', '~' or a leading separator are refused), no extra groups.
mail_full_filesystem_access = no
mail_privileged_group =
mail_access_groups =
mail_chroot =
imap_metadata = no
imap_urlauth_host =
namespace inbox {{
  type = private
  separator = .
  prefix =
  inbox = yes
}}

# Hostile input: long command lines are refused, and APPEND is capped at the message size limit (quota plugin,
# IMAP only: LMTP delivery is already bounded by the gateway).
imap_max_line_length = {lim.max_line_length}
imap_hibernate_timeout = 0
mail_max_userip_connections = {lim.max_userip_connections}
default_client_limit = {max(1000, 2 * lim.max_connections + 100)}

service imap-login {{
  service_count = 1
  process_limit = {lim.max_connections + _SPARE_LOGINS}
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
    haproxy = yes
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0600
    user = root
    group = root
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service submission-login {{
  inet_listener submission {{
    port = 0
  }}
}}
service managesieve-login {{
  inet_listener sieve {{
    port = 0
  }}
}}
service imap {{
  process_limit = {lim.max_connections + _SPARE_LOGINS}
}}
protocol imap {{
  mail_plugins = $mail_plugins quota
}}
plugin {{
  quota = count:Mailbox
  quota_vsizes = yes
  quota_max_mail_size = {cfg.limits.max_message_size}
}}
"""
    return lines


def _checked_limits(lim: ImapLimitsConfig) -> ImapLimitsConfig:
    """Refuse limits that would leave IMAP unusable or that Dovecot cannot express."""
    key = "mailboxes.limits"
    if lim.max_connections < 1 or lim.max_connections_per_ip < 1:
        raise DovecotConfigError(key, "max_connections and max_connections_per_ip must be at least 1")
    if lim.max_userip_connections < 1:
        raise DovecotConfigError(f"{key}.max_userip_connections", "must be at least 1")
    if lim.max_line_length < 8192:
        raise DovecotConfigError(f"{key}.max_line_length", "must be at least 8192 bytes (RFC 7162 §4)")
    return lim


def _include_path(path: Path) -> str:
    """A path for a `<file` include: dovecot.conf has no quoting there, so refuse what would break it."""
    text = str(path)
    if any(c.isspace() for c in text) or "%" in text:
        raise DovecotConfigError("tls", f"Dovecot cannot read a file whose path has spaces or '%': {text}")
    return text


def render_sql_config(cfg: GatewayConfig) -> str:
    """Render the passdb/userdb SQL file (it may hold the PostgreSQL password: written 0600, root only).

    The same queries serve SQLite and PostgreSQL: `active` is a BOOLEAN there, an integer 0/1 in SQLite.
    """
    mb = cfg.mailboxes
    if "'" in str(mb.mail_dir):
        raise DovecotConfigError("mailboxes.mail_dir", "a quote in the path")
    home_sql = "'" + str(mb.mail_dir).replace("%", "%%") + "/%Ld/%Ln'"
    user = _sql_literal(mb.mail_user)
    return f"""\
# Rendered by mssgw; do not edit.
driver = {_sql_driver(cfg)}
connect = {_connect_string(cfg)}
default_pass_scheme = ARGON2ID
password_query = SELECT address AS user, password_hash AS password FROM accounts WHERE address = '%Lu' AND active
user_query = SELECT {home_sql} AS home, {user} AS uid, {user} AS gid FROM accounts WHERE address = '%Lu' AND active
iterate_query = SELECT address AS user FROM accounts WHERE active
"""


def _sql_driver(cfg: GatewayConfig) -> str:
    url = cfg.database.url
    if url.startswith("sqlite"):
        return "sqlite"
    if url.startswith("postgresql"):
        return "pgsql"
    raise DovecotConfigError("database.url", "Dovecot's passdb reads SQLite or PostgreSQL only")


def _connect_string(cfg: GatewayConfig) -> str:
    """SQLAlchemy URL → Dovecot `connect`: the SQLite file, or a libpq keyword string for PostgreSQL."""
    try:
        url = make_url(cfg.database.url)
    except ArgumentError as exc:
        raise DovecotConfigError("database.url", f"not a database URL: {exc}") from None
    if _sql_driver(cfg) == "sqlite":
        if not url.database or url.database == ":memory:" or not url.database.startswith("/"):
            raise DovecotConfigError("database.url", "Dovecot needs the absolute path of an SQLite file")
        return url.database
    parts: dict[str, str] = {}
    if url.host:
        parts["host"] = url.host
    elif isinstance(url.query.get("host"), str):
        parts["host"] = str(url.query["host"])
    if url.port:
        parts["port"] = str(url.port)
    if url.database:
        parts["dbname"] = url.database
    if url.username:
        parts["user"] = url.username
    if cfg.database.password is not None:
        parts["password"] = read_secret(cfg.database.password)
    sslmode = url.query.get("sslmode")
    if isinstance(sslmode, str):
        parts["sslmode"] = sslmode
    for key, value in parts.items():
        # Dovecot splits the connect string on spaces before libpq sees it, so no quoting can protect one.
        if not value or any(c.isspace() or c in "'\\" for c in value):
            shown = "the password" if key == "password" else repr(value)
            raise DovecotConfigError("database", f"Dovecot cannot pass {shown} as {key} (space, quote or backslash)")
    return " ".join(f"{k}={v}" for k, v in parts.items())


def write_private(path: Path, text: str) -> None:
    """Write atomically, 0600 from the first byte (the SQL file may hold a password)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _make_searchable_parents(path: Path) -> None:
    """Create the missing parents of `path` 0755 whatever the umask (the gateway runs under 077); existing ones are
    left as they are, and checked by the caller."""
    missing = [p for p in path.parents if not p.exists()]
    for parent in reversed(missing):
        parent.mkdir(exist_ok=True)
        os.chmod(parent, 0o755)


def prepare_mail_dir(cfg: GatewayConfig) -> None:
    """Create mail_dir (0700, owned by the mail user) and check that the mail user can reach it.

    Dovecot's mail processes run as that user: a directory on the way it cannot search would fail each delivery
    with a bare "Permission denied", so the gateway refuses to start and names the directory instead.
    """
    mb = cfg.mailboxes
    try:
        pw = pwd.getpwnam(mb.mail_user)
    except KeyError:
        raise MailUserMissing(mb.mail_user) from None
    gids = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if mb.mail_user in g.gr_mem}
    mail_dir = mb.mail_dir
    _make_searchable_parents(mail_dir)
    mail_dir.mkdir(mode=0o700, exist_ok=True)
    for parent in reversed(mail_dir.parents):
        st = parent.stat()
        if st.st_uid == pw.pw_uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in gids:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise MailDirUnreachable(parent, mb.mail_user, mail_dir)
    st = mail_dir.stat()
    if (st.st_uid, st.st_gid) != (pw.pw_uid, pw.pw_gid):
        os.chown(mail_dir, pw.pw_uid, pw.pw_gid)
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(mail_dir, 0o700)
