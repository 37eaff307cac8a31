"""Hypothesis profiles of the fuzz targets, chosen by MSSGW_FUZZ_PROFILE.

`ci` (the default, what `make test` runs): 60 examples per target, the whole directory in well
under a minute. `fuzz` (what `make fuzz` runs): each target runs round after round of examples, each
round with fresh random data, until its share of FUZZ_SECONDS (default 300 for the directory) is spent.
A failing example is kept in Hypothesis's database (.hypothesis/) and replayed first by the next run;
once understood it becomes an explicit regression test (an @example, or a unit test beside the module).
"""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, Phase, settings

PROFILE = os.environ.get("MSSGW_FUZZ_PROFILE", "ci")
FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS", "300"))

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture]
# `ci` is also the name of the profile Hypothesis loads by itself when it sees a CI environment, so this one
# applies to every property test there: derandomized, so that a CI run is reproducible and new examples are
# sought by `make fuzz`, not found by chance in the run that decides whether a change lands.
settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=_SLOW_OK,
                          print_blob=True, derandomize=True)
# No shrinking under `fuzz`: it can take minutes on one failure and eat the budget; the failing example is
# saved, and the next `ci` run (`make test`) replays and shrinks it.
settings.register_profile("fuzz", max_examples=400, deadline=None, suppress_health_check=_SLOW_OK,
                          print_blob=True, phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target])
FUZZ = settings.get_profile(PROFILE)  # applied by each target (@FUZZ), not loaded for the rest of the suite

_budget: dict[str, float] = {}


def _is_fuzz_target(item: pytest.Item) -> bool:
    return isinstance(item, pytest.Function) and hasattr(item.obj, "hypothesis")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    targets = [item for item in items if _is_fuzz_target(item) and "tests/fuzz/" in str(item.path)]
    for item in targets:
        _budget[item.nodeid] = FUZZ_SECONDS / len(targets)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Under the `fuzz` profile, a target runs again and again until its time share is spent."""
    share = _budget.get(pyfuncitem.nodeid)
    if PROFILE != "fuzz" or share is None:
        return None
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    deadline = time.monotonic() + share
    rounds = 0
    while True:
        pyfuncitem.obj(**args)
        rounds += 1
        if time.monotonic() >= deadline:
            break
    print(f"{pyfuncitem.name}: {rounds} rounds of {FUZZ.max_examples} examples in {share:.0f} s")
    return True
