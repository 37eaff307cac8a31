"""What the tests of the two SMTP servers (submission, inbound) share: a gateway configuration on
loopback ports with the development PKI, and a way to run blocking smtplib clients off the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from config.schema import (
    DatabaseConfig,
    DovecotConfig,
    GatewayConfig,
    InboundConfig,
    LimitsConfig,
    Listener,
    SpoolConfig,
    SubmissionConfig,
    TLSConfig,
)
from gateway.devpki import DevPki

DOMAIN = "dev.mssante.test"
T = TypeVar("T")


def make_config(tmp: Path, pki: DevPki, **limits: float) -> GatewayConfig:
    """Both listeners on ephemeral ports of 127.0.0.1; `limits` override LimitsConfig fields."""
    return GatewayConfig(
        hostname="gw.dev.mssante.test",
        local_domains=(DOMAIN,),
        tls=TLSConfig(cert=pki.tls_server_chain, key=pki.tls_server_key, ca=pki.ca_bundle),
        database=DatabaseConfig(url=f"sqlite:///{tmp / 'gw.db'}"),
        spool=SpoolConfig(dir=tmp / "spool"),
        submission=SubmissionConfig(listen=Listener("127.0.0.1", 0)),
        inbound=InboundConfig(listen=Listener("127.0.0.1", 0)),
        mailboxes=DovecotConfig(mode="external", imap=Listener("127.0.0.1", 0), base_dir=tmp / "dc",
                                mail_dir=tmp / "mail", lmtp="unix:/nonexistent"),
        limits=replace(LimitsConfig(auth_failure_delay=0.01), **limits),  # type: ignore[arg-type]
    )


async def run(fn: Callable[..., T], *args: Any) -> T:
    """smtplib blocks: run it in a thread to keep the server's loop free."""
    return await asyncio.to_thread(fn, *args)
