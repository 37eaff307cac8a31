"""The failed-login limits per client address and per login (gateway/auth_throttle.py), on a clock the test moves."""

from __future__ import annotations

from config.schema import LimitsConfig
from gateway.auth_throttle import ADDRESS_LOCKED, LOGIN_LOCKED, AuthThrottle

LIMITS = LimitsConfig(auth_address_failures=3, auth_address_lockout=600, auth_account_failures=2,
                      auth_account_lockout=60)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_address_is_locked_after_its_failures_until_the_oldest_leaves_the_window() -> None:
    clock = Clock()
    t = AuthThrottle(LIMITS, clock)
    for login in ("a@x.test", "b@x.test", "c@x.test"):  # different logins: only the address adds up
        assert t.refusal("10.0.0.1", login) is None
        t.failed("10.0.0.1", login)
        clock.now += 1
    assert t.refusal("10.0.0.1", "d@x.test") == ADDRESS_LOCKED
    assert t.refusal("10.0.0.2", "d@x.test") is None
    clock.now += 598  # the first failure is 600 s old: one slot frees
    assert t.refusal("10.0.0.1", "d@x.test") is None


def test_a_login_is_locked_but_not_where_it_has_logged_in_before() -> None:
    clock = Clock()
    t = AuthThrottle(LIMITS, clock)
    t.succeeded("10.0.0.9", "Carol@X.test")
    t.failed("10.0.0.1", "carol@x.test")
    t.failed("10.0.0.2", " CAROL@x.test")  # one login, however it is typed
    assert t.refusal("10.0.0.3", "carol@x.test") == LOGIN_LOCKED
    assert t.refusal("10.0.0.9", "carol@x.test") is None  # the usual desk
    clock.now += 61
    assert t.refusal("10.0.0.3", "carol@x.test") is None  # the login lock is short


def test_memory_stays_bounded_under_many_addresses() -> None:
    t = AuthThrottle(LIMITS, Clock())
    for i in range(120_000):
        t.failed(f"2001:db8::{i:x}", f"user{i}@x.test")
    assert len(t._by_address._failures) <= 100_000
    assert len(t._by_login._failures) <= 100_000
