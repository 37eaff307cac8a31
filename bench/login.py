"""What a login costs: the Argon2id check of gateway.accounts (which Dovecot's ARGON2ID scheme
reads too), beside a SHA-256 of the password as the floor of any check at all.

    .venv/bin/python bench/login.py [--rounds 50]

Target (issue 2): well under 100 ms per login. Prints medians.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config.schema import DatabaseConfig
from gateway.accounts import AccountStore
from gateway.db import create_tables, make_engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(DatabaseConfig(url=f"sqlite:///{tmp}/bench.db"))
        create_tables(engine)
        store = AccountStore(engine)
        store.add("alice@dev.mssante.test", "a long enough password")
        ok, bad, floor = [], [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            assert store.authenticate("alice@dev.mssante.test", "a long enough password")
            ok.append(time.perf_counter() - t)
            t = time.perf_counter()
            assert not store.authenticate("nobody@dev.mssante.test", "a long enough password")
            bad.append(time.perf_counter() - t)
            t = time.perf_counter()
            hashlib.sha256(b"a long enough password").digest()
            floor.append(time.perf_counter() - t)
        engine.dispose()
    ms = lambda xs: statistics.median(xs) * 1000
    print(f"login check (Argon2id t=2 m=19MiB p=1 + SQL), median of {args.rounds}:")
    print(f"  good password     {ms(ok):7.1f} ms   (target: well under 100 ms)")
    print(f"  unknown account   {ms(bad):7.1f} ms   (same cost by design: no account enumeration by timing)")
    print(f"  baseline SHA-256  {ms(floor):7.3f} ms   (an unsalted fast hash, for scale only)")


if __name__ == "__main__":
    main()
