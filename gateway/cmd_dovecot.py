"""`mssgw dovecot config`: print the dovecot.conf the embedded instance would run with, for review or for a site
that runs its own Dovecot against the gateway's accounts table."""

from __future__ import annotations

import argparse
from typing import Any

from config.loader import load
from gateway.cli import add_command
from gateway.dovecot_config import render_config, render_sql_config


def register(sub: Any) -> None:
    group = sub.add_parser("dovecot", help="the Dovecot mailbox store", description="The Dovecot mailbox store.")
    actions = group.add_subparsers(dest="dovecot_command", required=True, metavar="ACTION")
    p = add_command(actions, "config", _config, "print the rendered dovecot.conf for the loaded configuration")
    p.add_argument("--sql", action="store_true",
                   help="print the passdb/userdb SQL file instead (it holds the database password, if any)")


def _config(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    print(render_sql_config(cfg) if args.sql else render_config(cfg), end="")
    return 0
