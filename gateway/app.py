"""The composition root: the only place that names concrete classes and wires them together.

Start order: database → spool recovery → Dovecot (embedded) → delivery worker → listeners.
Stop order is the reverse, so that nothing is accepted that cannot be stored, and every
delivery in flight ends before Dovecot goes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from config.schema import GatewayConfig
from gateway import lmtp
from gateway.accounts import AccountStore
from gateway.db import create_tables, make_engine
from gateway.delivery import DeliveryWorker
from gateway.dovecot import DovecotSupervisor
from gateway.spool import GroupCommitter, Spool
from gateway.submission import SubmissionHandler, start_submission
from gateway.tls import server_context

log = logging.getLogger(__name__)


class Gateway:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.engine = make_engine(cfg.database)
        self.bookkeeping = make_engine(cfg.database, durable=False)
        self.accounts = AccountStore(self.engine)
        self.spool = Spool(cfg.spool.dir, self.engine, self.bookkeeping)
        self.dovecot = DovecotSupervisor(cfg) if cfg.mailboxes.mode == "embedded" else None
        self.lmtp = lmtp.LmtpPool(cfg.mailboxes.lmtp_endpoint, size=cfg.spool.workers, helo=cfg.hostname)
        self.worker = DeliveryWorker(self.spool, self._deliver_local, concurrency=cfg.spool.workers)
        self._servers: list[asyncio.Server] = []

    async def start(self) -> None:
        await asyncio.to_thread(create_tables, self.engine)
        await asyncio.to_thread(self.spool.recover)
        if self.dovecot is not None:
            await self.dovecot.start()
            await self.dovecot.wait_ready()
        self.worker.start()
        handler = SubmissionHandler(self.cfg, self.accounts, GroupCommitter(self.spool), self.worker.enqueue)
        self._servers.append(await start_submission(self.cfg, handler, server_context(self.cfg.tls)))
        log.info("gateway ready")

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        await self.worker.stop()
        await self.lmtp.close()
        if self.dovecot is not None:
            await self.dovecot.stop()
        self.engine.dispose()
        self.bookkeeping.dispose()
        log.info("gateway stopped")

    async def _deliver_local(self, sender: str, recipients: Sequence[str], message: bytes) -> dict[str, tuple[int, str]]:
        replies = await self.lmtp.deliver(sender, recipients, message)
        return {rcpt: (r.code, " ".join(p for p in (r.enhanced, r.text) if p)) for rcpt, r in replies.items()}


async def serve(cfg: GatewayConfig, ready: asyncio.Event | None = None) -> None:
    """Run until SIGINT or SIGTERM, then stop cleanly."""
    os.umask(0o077)  # spool, database and mailboxes hold plaintext: the gateway's user only
    # SQL and disk work runs in threads; with the default 5 ms GIL switch interval the event
    # loop waits behind a busy thread for up to 5 ms at each handoff, on every SMTP command.
    sys.setswitchinterval(0.0005)
    gateway = Gateway(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await gateway.start()
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("stopping")
    finally:
        await gateway.stop()
