"""`mssgw run` (the gateway in the foreground) and `mssgw dev-setup` (the test PKI and the
development accounts that `make run` needs, created once and kept)."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
from pathlib import Path
from typing import Any

from config.loader import load
from config.schema import GatewayConfig
from gateway.cli import add_command
from gateway.errors import GatewayError

DEV_CREDENTIALS = "dev-accounts.txt"  # beside the development PKI: address and password per line


def register(sub: Any) -> None:
    add_command(sub, "run", _run, "run the gateway in the foreground until Ctrl-C")
    p = add_command(sub, "dev-setup", _dev_setup,
                    "create the test PKI and the development accounts (idempotent), and print them")
    p.add_argument("--pki-dir", type=Path, help="where the test PKI lives (default: beside the TLS CA bundle)")


def _run(args: argparse.Namespace) -> int:
    from gateway.app import serve
    from gateway.logsetup import setup_logging

    cfg = load(args.config)
    setup_logging(cfg.logging)
    ready = asyncio.Event()

    async def main() -> None:
        task = asyncio.create_task(serve(cfg, ready))
        ready_wait = asyncio.create_task(ready.wait())
        await asyncio.wait({task, ready_wait}, return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set():
            _print_banner(cfg)
        else:
            ready_wait.cancel()
        await task

    asyncio.run(main())
    return 0


def _print_banner(cfg: GatewayConfig) -> None:
    sub, imap = cfg.submission.listen, cfg.mailboxes.imap
    print(f"mssgw is running ({cfg.source})", flush=True)
    print(f"  SMTP submission  {sub.host}:{sub.port}  STARTTLS, then AUTH PLAIN/LOGIN", flush=True)
    if cfg.mailboxes.mode == "embedded":
        print(f"  IMAP (Dovecot)   {imap.host}:{imap.port}  STARTTLS, then LOGIN", flush=True)
    print("  Ctrl-C stops it.", flush=True)


def _dev_setup(args: argparse.Namespace) -> int:
    from gateway.accounts import AccountStore
    from gateway.db import create_tables, make_engine
    from gateway.devpki import create_dev_pki

    cfg = load(args.config)
    try:
        pki_dir: Path = args.pki_dir or dev_pki_dir(cfg)
    except GatewayError as exc:
        print(f"mssgw: {exc}; give --pki-dir")
        return 2
    domain = cfg.local_domains[0]
    pki = create_dev_pki(pki_dir, domain=domain, gateway_hostname=cfg.hostname)
    engine = make_engine(cfg.database)
    create_tables(engine)
    store = AccountStore(engine)
    creds_file = pki_dir.parent / DEV_CREDENTIALS
    known = read_dev_credentials(creds_file)
    wanted = [p.email for p in pki.practitioners] + [pki.organisation.email]
    for address in wanted:
        if address not in known:
            known[address] = secrets.token_urlsafe(12)
            if store.get(address) is None:
                store.add(address, known[address])
            else:
                store.set_password(address, known[address])
        elif store.get(address) is None:
            store.add(address, known[address])
    fd = os.open(creds_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # the passwords: the gateway's user only, even if the file was there before
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(f"{a} {p}\n" for a, p in sorted(known.items())))
    engine.dispose()
    print(f"Test PKI: {pki_dir} (CA bundle for mail clients: {pki.ca_bundle})")
    print(f"Development accounts (login = address; also in {creds_file}):")
    for address in wanted:
        print(f"  {address:40} password: {known[address]}")
    return 0


def dev_pki_dir(cfg: GatewayConfig) -> Path:
    """Where the development PKI lives: the gateway's TLS certificate is DIR/gateway/… (gateway/devpki.py)."""
    if cfg.tls.cert.parent.name != "gateway":
        raise GatewayError(f"{cfg.source}: tls.cert is not in a development PKI (DIR/gateway/tls-server…)")
    return cfg.tls.cert.parent.parent


def read_dev_credentials(path: Path) -> dict[str, str]:
    """address -> password of the development accounts `dev-setup` wrote to PATH (none if it is absent)."""
    if not path.exists():
        return {}
    pairs = (line.split(" ", 1) for line in path.read_text(encoding="utf-8").splitlines() if " " in line)
    return {a: p for a, p in pairs}
