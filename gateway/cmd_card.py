"""`mssgw card list|info|unlock|unblock`: the CPS cards in the readers of this host.

The PIN (and the unblocking code) is read from a file or from the terminal without echo, never
from an argument, which `ps` shows to every user of the host; it is never printed or logged.
`unlock` presents the PIN exactly once and leaves the card powered: the verified state lives on
the card and serves the running gateway's connection until the card is removed or reset. It is
meant for a running gateway, which keeps the card connected: with no connection left, pcscd
powers the card down and the card forgets the PIN, as it should. A
wrong PIN prints the tries left and stops: three wrong PINs block a practitioner's card.

The card commands need no configuration file: they talk to pcscd only.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from cps.errors import CardError
from cps.pcsc import PcscContext
from cps.worker import CardSession, CardStatus
from gateway.cli import add_command
from gateway.errors import GatewayError

T = TypeVar("T")


def register(sub: Any) -> None:
    p = add_command(sub, "card", _usage, "CPS smart cards: list, show, unlock with the PIN, unblock")
    cards = p.add_subparsers(dest="card_command", required=True, metavar="ACTION")
    add_command(cards, "list", _list, "readers, cards, holders, RPPS numbers, certificate validity, PIN tries left")
    info = add_command(cards, "info", _info, "details of one card: ATR, serial, certificates, fingerprints")
    info.add_argument("--reader", help="reader name (default: the only reader holding a card)")
    unlock = add_command(cards, "unlock", _unlock, "present the PIN once, for the running gateway")
    unlock.add_argument("--reader", help="reader name (default: the only reader holding a card)")
    unlock.add_argument("--pin-file", help="read the PIN from this file's first line ('-' for stdin)")
    unblock = add_command(cards, "unblock", _unblock, "reset a blocked PIN with the unblocking code (PUK)")
    unblock.add_argument("--reader", help="reader name (default: the only reader holding a card)")
    unblock.add_argument("--puk-file", help="read the unblocking code from this file ('-' for stdin)")
    unblock.add_argument("--new-pin-file", help="read the new PIN from this file")


def _usage(args: argparse.Namespace) -> int:
    return 2


def _secret(path: str | None, prompt: str) -> str:
    if path == "-":
        return sys.stdin.readline().strip()
    if path:
        with open(path, encoding="utf-8") as f:
            return f.readline().strip()
    return getpass.getpass(prompt)


def _card_call(reader: str, action: Callable[[CardSession], Awaitable[T]], *, reset: bool = False) -> T:
    async def run() -> T:
        session = CardSession(reader)
        try:
            return await action(session)
        finally:
            await session.close(reset=reset)

    try:
        return asyncio.run(run())
    except CardError as exc:
        raise GatewayError(str(exc)) from None


def _readers() -> list[str]:
    try:
        with PcscContext() as ctx:
            return ctx.readers()
    except CardError as exc:
        raise GatewayError(f"{exc} (is pcscd running?)") from None


def _choose_reader(wanted: str | None) -> str:
    readers = _readers()
    if wanted is not None:
        if wanted not in readers:
            raise GatewayError(f"no reader named {wanted!r}; readers: {', '.join(readers) or 'none'}")
        return wanted
    with PcscContext() as ctx:
        holding = [s.name for s in ctx.states(readers) if s.present]
    if len(holding) != 1:
        raise GatewayError(f"{len(holding)} readers hold a card ({', '.join(holding) or 'none'}): name one with --reader")
    return holding[0]


def _validity(cert: x509.Certificate | None) -> str:
    if cert is None:
        return "-"
    end = cert.not_valid_after_utc
    state = "EXPIRED" if end < dt.datetime.now(dt.UTC) else "valid"
    return f"{state} until {end:%Y-%m-%d}"


def _describe(status: CardStatus) -> str:
    if not status.present:
        return f"{status.reader}: no card"
    tries = "?" if status.pin_tries_left is None else str(status.pin_tries_left)
    lock = "unlocked" if status.unlocked else ("BLOCKED" if status.pin_tries_left == 0 else "locked")
    return (f"{status.reader}: {status.holder or '?'}, RPPS {status.rpps or '?'}, "
            f"signature certificate {_validity(status.sign_certificate)}, PIN tries left {tries}, {lock}")


def _list(args: argparse.Namespace) -> int:
    readers = _readers()
    if not readers:
        print("no smart-card reader")
        return 1
    for reader in readers:
        print(_describe(_card_call(reader, lambda s: s.status())))
    return 0


def _info(args: argparse.Namespace) -> int:
    status = _card_call(_choose_reader(args.reader), lambda s: s.status())
    print(_describe(status))
    if status.identity is not None:
        print(f"  type     {status.identity.kind}")
        print(f"  ATR      {status.identity.atr.hex(' ').upper()}")
        print(f"  serial   {status.identity.serial}")
    for label, cert in (("signature", status.sign_certificate), ("authentication", status.auth_certificate)):
        if cert is None:
            continue
        print(f"  {label} certificate")
        print(f"    subject      {cert.subject.rfc4514_string()}")
        print(f"    issuer       {cert.issuer.rfc4514_string()}")
        print(f"    validity     {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}")
        print(f"    SHA-256      {cert.fingerprint(hashes.SHA256()).hex(':').upper()}")
    return 0


def _unlock(args: argparse.Namespace) -> int:
    reader = _choose_reader(args.reader)
    pin = _secret(args.pin_file, f"PIN of the card in {reader}: ")
    tries = _card_call(reader, lambda s: s.unlock(pin))
    print(f"card in {reader} unlocked ({tries} tries)")
    return 0


def _unblock(args: argparse.Namespace) -> int:
    reader = _choose_reader(args.reader)
    puk = _secret(args.puk_file, f"Unblocking code (PUK) of the card in {reader}: ")
    if args.new_pin_file:
        new_pin = _secret(args.new_pin_file, "")
    else:
        new_pin = getpass.getpass("New PIN: ")
        if getpass.getpass("Again: ") != new_pin:
            raise GatewayError("the two PINs differ")
    _card_call(reader, lambda s: s.unblock(puk, new_pin))
    print(f"PIN of the card in {reader} reset; unlock it with the new PIN")
    return 0
