"""`mssgw queue list|show|release|retry|delete`: what an operator does with waiting mail.

These act on the queue's rows in the database the running gateway uses; the gateway's worker
looks at the database every few seconds, so a released message leaves within that time.
Message contents are never shown: they may be patient data.
"""

from __future__ import annotations

import argparse
from typing import Any

from config.loader import load
from gateway.cli import add_command
from gateway.db import create_tables, make_engine
from gateway.errors import GatewayError
from gateway.spool import QueueEntry, Spool


def register(sub: Any) -> None:
    p = add_command(sub, "queue", _usage, "list, show, release, retry or delete queued messages")
    q = p.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    lst = add_command(q, "list", _list, "list waiting messages (incoming, active, deferred, hold)")
    lst.add_argument("--all", action="store_true", help="finished messages too (done, failed)")
    for name, handler, text in (
        ("show", _show, "show one message's envelope, recipients and last errors"),
        ("release", _release, "send a held or deferred message now"),
        ("retry", _release, "same as release: try a deferred message now"),
        ("delete", _delete, "remove a waiting message for good"),
    ):
        add_command(q, name, handler, text).add_argument("queue_id")


def _usage(args: argparse.Namespace) -> int:
    return 2


def _spool(args: argparse.Namespace) -> Spool:
    cfg = load(args.config)
    engine = make_engine(cfg.database)
    create_tables(engine)
    return Spool(cfg.spool.dir, engine)


def _list(args: argparse.Namespace) -> int:
    states = None if args.all else ("incoming", "active", "deferred", "hold")
    entries = _spool(args).entries(states)
    for e in entries:
        print(f"{e.id}  {e.state:8} {e.created_at:%Y-%m-%d %H:%M} {e.size:>9} B  {e.sender} -> "
              f"{', '.join(a for a, _, _ in e.recipients)}")
    print(f"{len(entries)} message(s)")
    return 0


def _show(args: argparse.Namespace) -> int:
    entry = _find(_spool(args).entries(), args.queue_id)
    print(f"queue id      {entry.id}\nstate         {entry.state}\nsender        {entry.sender}")
    print(f"account       {entry.account or '-'}\nsize          {entry.size} bytes")
    print(f"accepted      {entry.created_at:%Y-%m-%d %H:%M:%S %Z}\nattempts      {entry.attempts}")
    print(f"next attempt  {entry.next_attempt_at:%Y-%m-%d %H:%M:%S %Z}\nlast error    {entry.last_error or '-'}")
    for address, state, reply in entry.recipients:
        print(f"  {address:40} {state:8} {reply or ''}")
    return 0


def _release(args: argparse.Namespace) -> int:
    if not _spool(args).release(args.queue_id):
        raise GatewayError(f"{args.queue_id} is not held nor deferred (see `mssgw queue show {args.queue_id}`)")
    print(f"{args.queue_id} released: the gateway sends it within a few seconds")
    return 0


def _delete(args: argparse.Namespace) -> int:
    if not _spool(args).delete(args.queue_id):
        raise GatewayError(f"{args.queue_id} is not waiting in the queue (unknown, finished or being delivered)")
    print(f"{args.queue_id} deleted")
    return 0


def _find(entries: list[QueueEntry], queue_id: str) -> QueueEntry:
    for e in entries:
        if e.id == queue_id:
            return e
    raise GatewayError(f"no message {queue_id} in the queue")
