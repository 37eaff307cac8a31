"""Crash safety under load: nothing acknowledged is lost when a gateway is killed with SIGKILL (issue 7, item 1).

    .venv/bin/python bench/crash_test.py [--messages 2000] [--clients 8] [--kills 5] [--role all|submission|...]

For each role, `--clients` connections push `--messages` messages (each with its own Message-ID, sent once, never
retried) while the gateway process is SIGKILLed `--kills` times at random moments and restarted each time:
  * submission: SMTP submission with STARTTLS and AUTH to a local mailbox; the gateway is killed.
  * inbound:    port 25 with a trust-space client certificate (a peer gateway) to a local mailbox of B; B is killed.
  * relay:      submission on A for a mailbox of B; A signs, encrypts and relays to B over mutual TLS, and A is
                killed, its relay worker in the middle of deliveries.
  * relay-peer: the same path, but B is killed under A's relay sessions (kept open between messages).
When every spool is empty the recipient's Maildir is read, and the script prints per role: acknowledged (a 250
after DATA), delivered (acknowledged and in the mailbox), lost (acknowledged and not there: must be 0) and
duplicated (copies beyond the first). Exit status 1 when anything is lost. Needs root and Dovecot (as `make test`).
The harness is tests/integration/crash_support.py, which tests/integration/test_crash_safety.py runs smaller.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.crash_support import (
    ROLES,
    Figures,
    Role,
    inbound_role,
    relay_peer_role,
    relay_role,
    run,
    submission_role,
    two_gateway_world,
)
from tests.integration.gateway_support import short_tmpdir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=2000, help="messages per role (default 2000)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent SMTP clients (default 8)")
    ap.add_argument("--kills", type=int, default=5, help="SIGKILLs per role (default 5)")
    ap.add_argument("--role", choices=("all", *ROLES), default="all")
    ap.add_argument("--size", type=int, default=2048, help="message size in bytes (default 2048)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the kill schedule (default: random)")
    ap.add_argument("--workers", type=int, default=4, help="spool workers per gateway (default 4)")
    ap.add_argument("--log-level", default="INFO", help="the gateways' log level (default INFO)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (the embedded Dovecot stores mail as the mail user), e.g. via `make bench`")
    roles = ROLES if args.role == "all" else (args.role,)
    print(f"crash test: {args.messages} messages of {args.size} B per role, {args.clients} clients, "
          f"{args.kills} SIGKILLs per role at random moments")
    results: list[Figures] = []
    root = short_tmpdir()
    try:
        def crash(role: Role) -> Figures:
            return _report(run(role, messages=args.messages, clients=args.clients, kills=args.kills, size=args.size,
                               seed=args.seed))

        if "submission" in roles:
            with submission_role(root / "single", log_level=args.log_level, workers=args.workers) as role:
                results.append(crash(role))
        if set(roles) - {"submission"}:
            with two_gateway_world(root / "pair", log_level=args.log_level, workers=args.workers) as gws:
                for make in (inbound_role, relay_role, relay_peer_role):
                    role = make(gws)
                    if role.name in roles:
                        results.append(crash(role))
    finally:
        if os.environ.get("MSSGW_KEEP_TEST_DIRS"):
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    lost = sum(r.lost for r in results)
    print(f"total: acknowledged {sum(r.acknowledged for r in results)}, delivered {sum(r.delivered for r in results)}, "
          f"lost {lost} (must be 0), duplicated {sum(r.duplicated for r in results)} (aim: 0)")
    return 1 if lost else 0


def _report(figures: Figures) -> Figures:
    print(*figures.lines(), sep="\n", flush=True)
    if figures.lost_ids:
        print(f"  LOST: {', '.join(figures.lost_ids[:10])}{' ...' if figures.lost > 10 else ''}")
    return figures


if __name__ == "__main__":
    sys.exit(main())
