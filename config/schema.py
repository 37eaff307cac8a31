"""The configuration schema: frozen dataclasses, one per TOML table.

Every path is absolute once loaded (relative paths in a file are resolved against the
directory of that file). Secrets are never values here: only the path of a file or the
name of an environment variable that holds them (`SecretRef`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

MailboxMode = Literal["embedded", "external"]
LogFormat = Literal["text", "json"]


@dataclass(frozen=True, slots=True)
class SecretRef:
    """Where a secret lives: a file (first line, stripped) or an environment variable."""

    file: Path | None = None
    env: str | None = None


@dataclass(frozen=True, slots=True)
class Listener:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """The gateway's own certificate and the anchors it trusts for peers and clients."""

    cert: Path
    key: Path
    ca: Path | None = None
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    """A SQLAlchemy URL (sqlite:///ABS_PATH or postgresql+psycopg://user@host/db).

    A PostgreSQL password, when needed, comes from `password` (file or env), never the URL.
    """

    url: str
    password: SecretRef | None = None


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    dir: Path
    workers: int = 4


@dataclass(frozen=True, slots=True)
class SubmissionConfig:
    """The client-facing SMTP submission listener (STARTTLS, AUTH only after TLS)."""

    listen: Listener


@dataclass(frozen=True, slots=True)
class InboundConfig:
    """The port-25 listener for peer gateways of the trust space (STARTTLS and a client certificate required)."""

    listen: Listener


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """How mail for other gateways leaves: the next hop by static route or MX (RFC 5321 §5.1), over TLS.

    `routes` maps a domain to "host", "host:port" or "[ip]:port" and wins over DNS; `nameservers`
    ("ip" or "ip:port") replace the system resolver when given. An authenticated session to a hop stays open
    `session_idle` seconds for the next message (0: one session per message), for at most `session_messages`
    messages. `plain_domains`: destination domains sent WITHOUT S/MIME (benchmarks, tests); empty by default.
    """

    routes: dict[str, str] = field(default_factory=dict)
    nameservers: tuple[str, ...] = ()
    dns_timeout: float = 10.0
    per_destination: int = 5
    timeout: float = 120.0
    session_idle: float = 5.0
    session_messages: int = 100
    plain_domains: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class KeyFileConfig:
    """An organisation mailbox's key and certificate (PEM; the certificate file may hold the chain after it)."""

    account: str
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class CardBinding:
    """A practitioner's mailbox whose key is the CPS card of this RPPS number (read in any PC/SC reader)."""

    account: str
    rpps: str


@dataclass(frozen=True, slots=True)
class SmimeConfig:
    """S/MIME: the trust anchors and CRLs of the trust space, and the keys of local accounts."""

    trust_anchors: Path
    crls: Path | None = None
    keys: tuple[KeyFileConfig, ...] = ()
    cards: tuple[CardBinding, ...] = ()
    processes: int = 0
    """Worker processes that open inbound mail for key-file recipients (0: on the event loop)."""


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """What a client and its input may cost the gateway (each key is explained in config/gateway.example.toml)."""

    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_connections: int = 200
    max_connections_per_address: int = 30
    idle_timeout: float = 300.0
    max_auth_failures: int = 3
    auth_failure_delay: float = 1.0
    max_errors: int = 20
    greeting_delay: float = 0.0
    data_timeout: float = 300.0
    max_data_duration: float = 1800.0
    max_buffered_data: int = 512 * 1024 * 1024
    auth_address_failures: int = 10
    auth_address_lockout: float = 900.0
    auth_account_failures: int = 10
    auth_account_lockout: float = 300.0
    # What a received or submitted message may make the parsers build (smime.limits.ParseLimits)
    max_mime_depth: int = 50
    max_mime_parts: int = 10_000
    max_asn1_depth: int = 64
    max_asn1_elements: int = 200_000
    max_cms_size: int = 64 * 1024 * 1024
    # What one member of a directory extract ZIP may inflate to (directory_sync.extracts.ZipLimits)
    max_zip_member_size: int = 8 * 1024 ** 3
    max_zip_ratio: int = 100


@dataclass(frozen=True, slots=True)
class ImapLimitsConfig:
    """What IMAP clients may cost: enforced by the gateway's IMAP relay and by the embedded Dovecot.

    `max_connections` and `max_connections_per_ip` are counted by the relay, per client address (more get `* BYE`);
    the others are written into Dovecot's configuration. Dovecot's own authentication penalty (anvil: up to 15 s
    per client address after repeated failures) is always on and is not configurable in Dovecot 2.3.
    """

    max_connections: int = 200
    max_connections_per_ip: int = 50
    max_userip_connections: int = 20
    auth_failure_delay: int = 2
    max_line_length: int = 65536


@dataclass(frozen=True, slots=True)
class DovecotConfig:
    """The mailbox store: Dovecot, run by the gateway (embedded) or the site's (external).

    embedded: the gateway renders dovecot.conf into `base_dir` and supervises
    `binary -F -c <conf>`; mail lives under `mail_dir/<domain>/<user>` owned by `mail_user`;
    LMTP is a unix socket in `base_dir`; IMAP listens on `imap`.
    external: the gateway only talks LMTP to `lmtp` ("unix:/path" or "host:port").
    """

    mode: MailboxMode
    imap: Listener
    base_dir: Path
    mail_dir: Path
    mail_user: str = "mssgw-mail"
    binary: Path = Path("/usr/sbin/dovecot")
    lmtp: str | None = None
    limits: ImapLimitsConfig = field(default_factory=ImapLimitsConfig)

    @property
    def lmtp_endpoint(self) -> str:
        """Where to deliver: the configured endpoint, or the embedded instance's socket."""
        if self.lmtp is not None:
            return self.lmtp
        return f"unix:{self.base_dir / 'lmtp'}"


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "INFO"
    format: LogFormat = "text"
    file: Path | None = None


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    hostname: str
    local_domains: tuple[str, ...]
    tls: TLSConfig
    database: DatabaseConfig
    spool: SpoolConfig
    submission: SubmissionConfig
    mailboxes: DovecotConfig
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    inbound: InboundConfig | None = None
    relay: RelayConfig = field(default_factory=RelayConfig)
    smime: SmimeConfig | None = None
    source: Path | None = None

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self.local_domains
