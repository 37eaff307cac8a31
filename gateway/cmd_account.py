"""`mssgw account add|passwd|list|disable|enable`: the local mailboxes.

Passwords are read from the terminal (twice) or, for scripts, from a file or stdin:
never from an argument, which `ps` would show to every user of the host.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from config.loader import load
from gateway.accounts import AccountStore
from gateway.cli import add_command
from gateway.db import create_tables, make_engine
from gateway.errors import GatewayError


def register(sub: Any) -> None:
    p = add_command(sub, "account", _usage, "manage the local mailbox accounts")
    acc = p.add_subparsers(dest="account_command", required=True, metavar="ACTION")
    for name, handler, text in (("add", _add, "create an account"), ("passwd", _passwd, "set a new password")):
        q = add_command(acc, name, handler, text)
        q.add_argument("address")
        q.add_argument("--password-file", help="read the password from this file ('-' for stdin)")
    add_command(acc, "list", _list, "list the accounts")
    for name, handler, text in (("disable", _disable, "refuse logins and mail for an account"),
                                ("enable", _enable, "re-enable an account")):
        add_command(acc, name, handler, text).add_argument("address")


def _usage(args: argparse.Namespace) -> int:
    return 2


def _store(args: argparse.Namespace) -> AccountStore:
    engine = make_engine(load(args.config).database)
    create_tables(engine)
    return AccountStore(engine)


def _password(args: argparse.Namespace) -> str:
    if args.password_file == "-":
        return sys.stdin.readline().rstrip("\n")
    if args.password_file:
        with open(args.password_file, encoding="utf-8") as f:
            return f.readline().rstrip("\n")
    first = getpass.getpass("New password: ")
    if getpass.getpass("Again: ") != first:
        raise GatewayError("the two passwords differ")
    return first


def _add(args: argparse.Namespace) -> int:
    account = _store(args).add(args.address, _password(args))
    print(f"account {account.address} created")
    return 0


def _passwd(args: argparse.Namespace) -> int:
    _store(args).set_password(args.address, _password(args))
    print(f"password of {args.address} changed")
    return 0


def _list(args: argparse.Namespace) -> int:
    for a in _store(args).list():
        print(f"{a.address:40} {'active' if a.active else 'disabled':9} created {a.created_at:%Y-%m-%d}")
    return 0


def _disable(args: argparse.Namespace) -> int:
    _store(args).set_active(args.address, False)
    print(f"account {args.address} disabled")
    return 0


def _enable(args: argparse.Namespace) -> int:
    _store(args).set_active(args.address, True)
    print(f"account {args.address} enabled")
    return 0
