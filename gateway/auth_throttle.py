"""Limits on failed SMTP logins per client address and per login name (RFC 4954 §4 leaves them to the server).

Each key (a client address, or a login name as typed, lower-cased) may fail at most N times in a sliding window;
past that, AUTH from that address, or for that login, is answered `454 4.7.0` without checking the password (no
Argon2 work for the attacker, no oracle) until the oldest of those failures leaves the window.

The trade-off of a lock per login: anyone can lock a user out by failing on purpose. To keep that short and
narrow, the per-login lock is shorter than the per-address one, and it does not apply to a client address from
which that login has already succeeded (remembered in memory, a few addresses per login): the practitioner at
their usual desk keeps working while an attacker elsewhere is refused. The state is in memory and per process,
bounded in size (the oldest keys are forgotten first); a restart forgets it.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

from config.schema import LimitsConfig

_MAX_KEYS = 100_000
_KNOWN_ADDRESSES_PER_LOGIN = 8
_MAX_LOGIN_CHARS = 320

ADDRESS_LOCKED = "454 4.7.0 Too many failed logins from your address; try again later"
LOGIN_LOCKED = "454 4.7.0 Too many failed logins for this account; try again later"


class _Window:
    """At most `limit` failures per key within `seconds`: the key is locked while the last `limit` failures
    all lie within the window."""

    def __init__(self, limit: int, seconds: float, clock: Callable[[], float]) -> None:
        self._limit = max(1, limit)
        self._seconds = seconds
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def locked(self, key: str) -> bool:
        times = self._failures.get(key)
        return (times is not None and len(times) >= self._limit
                and self._clock() - times[0] < self._seconds)

    def add(self, key: str) -> None:
        times = self._failures.pop(key, None) or deque(maxlen=self._limit)
        times.append(self._clock())
        self._failures[key] = times  # most recent last: the oldest keys are dropped first
        while len(self._failures) > _MAX_KEYS:
            self._failures.popitem(last=False)


class AuthThrottle:
    """The failed-login counters of one listener, shared by all its connections."""

    def __init__(self, limits: LimitsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._by_address = _Window(limits.auth_address_failures, limits.auth_address_lockout, clock)
        self._by_login = _Window(limits.auth_account_failures, limits.auth_account_lockout, clock)
        self._known: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()

    def refusal(self, address: str, login: str) -> str | None:
        """The `454` reply when this address or this login is locked, else None (the password may be checked)."""
        if self._by_address.locked(address):
            return ADDRESS_LOCKED
        key = _login_key(login)
        if self._by_login.locked(key) and address not in self._known.get(key, ()):
            return LOGIN_LOCKED
        return None

    def failed(self, address: str, login: str) -> None:
        self._by_address.add(address)
        self._by_login.add(_login_key(login))

    def succeeded(self, address: str, login: str) -> None:
        """Remember `address` as one this login uses: a lock on the login does not apply there."""
        key = _login_key(login)
        known = self._known.pop(key, None) or OrderedDict()
        known.pop(address, None)
        known[address] = None
        while len(known) > _KNOWN_ADDRESSES_PER_LOGIN:
            known.popitem(last=False)
        self._known[key] = known
        while len(self._known) > _MAX_KEYS:
            self._known.popitem(last=False)


def _login_key(login: str) -> str:
    return login.strip().lower()[:_MAX_LOGIN_CHARS]
