"""Local mailbox accounts: the SQL table that both the gateway (SMTP AUTH) and Dovecot
(its `sql` passdb/userdb) read, and the operations an operator runs on it.

Passwords are hashed with Argon2id (RFC 9106) in the PHC string format, which Dovecot
reads with `default_pass_scheme = ARGON2ID`. The cost (t=2, m=19 MiB, p=1, the OWASP
minimum) keeps a login around 20 ms; Dovecot's libsodium only verifies p=1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Boolean, Column, DateTime, Engine, String, Table, insert, select, update

from gateway.addresses import AddressError, parse_mailbox
from gateway.db import metadata
from gateway.errors import GatewayError

log = logging.getLogger(__name__)

accounts = Table(
    "accounts",
    metadata,
    Column("address", String(320), primary_key=True),
    Column("password_hash", String(255), nullable=False),
    Column("active", Boolean, nullable=False, default=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

_HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
# Verified against when the account does not exist, so that unknown and known
# addresses cost the same time (no account enumeration by timing).
_DUMMY_HASH = _HASHER.hash("not a password")
MIN_PASSWORD_LENGTH = 12


class AccountError(GatewayError):
    """An account operation that cannot be done as asked."""


class AccountExists(AccountError):
    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__(f"the account {address} already exists")


class NoSuchAccount(AccountError):
    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__(f"there is no account {address}")


class BadAccountInput(AccountError):
    pass


@dataclass(frozen=True, slots=True)
class Account:
    address: str
    active: bool
    created_at: datetime


def normalise_address(address: str) -> str:
    """The address as stored: the envelope rules of `addresses`, domain lower-cased."""
    try:
        return str(parse_mailbox(address.strip()))
    except AddressError as exc:
        raise BadAccountInput(f"not a mailbox address: {address!r} ({exc})") from None


# What a login may hold, and so an account's address: Dovecot's auth_username_chars as the gateway
# configures it (gateway/dovecot_config.py). No "/": the mailbox is mail_dir/<domain>/<local part>.
ACCOUNT_ADDRESS_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_@")


class AccountStore:
    """Accounts in SQL. Every method blocks (SQL, Argon2): call it from a thread in async code."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def add(self, address: str, password: str) -> Account:
        address = normalise_address(address)
        if not set(address) <= ACCOUNT_ADDRESS_CHARS:
            raise BadAccountInput(f"a mailbox account's address may hold only letters, digits, '.', '-' and '_' "
                                  f"(IMAP logins, mailbox paths): {address!r}")
        _check_password(password)
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            if conn.execute(select(accounts.c.address).where(accounts.c.address == address)).first():
                raise AccountExists(address)
            conn.execute(insert(accounts).values(address=address, password_hash=_HASHER.hash(password),
                                                 active=True, created_at=now, updated_at=now))
        log.info("account added: %s", address)
        return Account(address, True, now)

    def set_password(self, address: str, password: str) -> None:
        address = normalise_address(address)
        _check_password(password)
        self._update(address, password_hash=_HASHER.hash(password))
        log.info("password changed: %s", address)

    def set_active(self, address: str, active: bool) -> None:
        address = normalise_address(address)
        self._update(address, active=active)
        log.info("account %s: %s", "enabled" if active else "disabled", address)

    def list(self) -> list[Account]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(accounts.c.address, accounts.c.active, accounts.c.created_at)
                                .order_by(accounts.c.address)).all()
        return [Account(r.address, bool(r.active), r.created_at) for r in rows]

    def get(self, address: str) -> Account | None:
        try:
            address = normalise_address(address)
        except BadAccountInput:
            return None
        with self._engine.connect() as conn:
            r = conn.execute(select(accounts.c.address, accounts.c.active, accounts.c.created_at)
                             .where(accounts.c.address == address)).first()
        return None if r is None else Account(r.address, bool(r.active), r.created_at)

    def is_mailbox(self, address: str) -> bool:
        """True if `address` is an active local mailbox (RCPT check)."""
        account = self.get(address)
        return account is not None and account.active

    def authenticate(self, login: str, password: str) -> Account | None:
        """The active account for these credentials, or None. Costs the same for unknown logins."""
        try:
            address = normalise_address(login)
        except BadAccountInput:
            address = None
        row = None
        if address is not None:
            with self._engine.connect() as conn:
                row = conn.execute(select(accounts).where(accounts.c.address == address)).first()
        stored = row.password_hash if row is not None else _DUMMY_HASH
        try:
            _HASHER.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return None
        if row is None or not row.active:
            return None
        if _HASHER.check_needs_rehash(stored):
            self._update(row.address, password_hash=_HASHER.hash(password))
        return Account(row.address, True, row.created_at)

    def _update(self, address: str, **values: object) -> None:
        with self._engine.begin() as conn:
            result = conn.execute(update(accounts).where(accounts.c.address == address)
                                  .values(updated_at=datetime.now(UTC), **values))
            if result.rowcount == 0:
                raise NoSuchAccount(address)


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise BadAccountInput(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    if "\x00" in password or "\n" in password:
        raise BadAccountInput("a password cannot hold NUL or newline characters")
