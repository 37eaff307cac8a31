"""The composition root: the only place that names concrete classes and wires them together.

Start order: database (and the directory's migrations) → keys and trust → spool recovery →
Dovecot (embedded) → delivery worker → listeners.
Stop order is the reverse, so that nothing is accepted that cannot be stored, and every
delivery in flight ends before Dovecot goes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import sys

from config.schema import GatewayConfig
from directory_sync.database import migrate as migrate_directory
from directory_sync.lookup import DirectoryLookup
from directory_sync.whitelist import TrustSpace
from gateway.accounts import AccountStore
from gateway.cards import CardKeys, release_held
from gateway.db import create_tables, make_engine
from gateway.delivery import DeliveryWorker
from gateway.dovecot import DovecotSupervisor
from gateway.inbound import InboundHandler, peer_tls_context, start_inbound
from gateway.inbound_workers import InboundWorkers
from gateway.lmtp import LmtpPool
from gateway.nexthop import NextHopResolver
from gateway.pipeline import AccountKeys, KeyRing, Pipeline, load_trust
from gateway.redelivery import DoveadmCopies
from gateway.relay import OutboundRelay, client_tls_context
from gateway.relay_sessions import RelayLimiter, SessionCache
from gateway.spool import GroupCommitter, Incoming, Spool
from gateway.submission import RemotePolicy, SubmissionHandler, start_submission
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
        self.lmtp = LmtpPool(cfg.mailboxes.lmtp_endpoint, size=cfg.spool.workers, helo=cfg.hostname)
        self.directory = DirectoryLookup(self.engine)
        self.trust_space = TrustSpace(self.engine)
        self.relay = _relay(cfg)
        self.pipeline: Pipeline | None = None
        self.worker: DeliveryWorker | None = None
        self._committer = GroupCommitter(self.spool)
        self.cards: CardKeys | None = None
        self.inbound_workers: InboundWorkers | None = None
        self._card_watch: asyncio.Task[None] | None = None
        self._servers: list[asyncio.Server] = []

    async def start(self) -> None:
        await asyncio.to_thread(create_tables, self.engine)
        await asyncio.to_thread(migrate_directory, self.engine)
        await asyncio.to_thread(self.trust_space.reload)
        cards = self.cfg.smime.cards if self.cfg.smime is not None else ()
        if cards:
            self.cards = CardKeys({c.account: c.rpps for c in cards})
            await self.cards.start()
        keys = AccountKeys(await asyncio.to_thread(KeyRing.load, self.cfg.smime), self.cards)
        trust = await asyncio.to_thread(load_trust, self.cfg.smime)
        copies = DoveadmCopies(self.dovecot.conf_path) if self.dovecot is not None else None
        processes = self.cfg.smime.processes if self.cfg.smime is not None and self.cfg.inbound is not None else 0
        if processes and trust is not None:
            self.inbound_workers = InboundWorkers(self.cfg, processes)
            await self.inbound_workers.start()
        self.pipeline = Pipeline(self.cfg, self.lmtp, relay=self.relay, keys=keys, directory=self.directory,
                                 trust=trust, submit=self._submit_own, has_copy=copies.holds if copies else None,
                                 open_elsewhere=self.inbound_workers.open if self.inbound_workers else None)
        self.worker = DeliveryWorker(self.spool, self.pipeline.process, notify=self.pipeline.notify,
                                     concurrency=self.cfg.spool.workers)
        await asyncio.to_thread(self.spool.recover)
        if self.dovecot is not None:
            await self.dovecot.start()
            await self.dovecot.wait_ready()
        self.worker.start()
        if self.cards is not None:
            self._card_watch = asyncio.create_task(self.cards.watch(self._card_ready), name="card-watch")
        handler = SubmissionHandler(self.cfg, self.accounts, self._committer, self.worker.enqueue,
                                    remote=RemotePolicy(self.directory, self.trust_space, keys.has_key)
                                    if self.relay is not None else None)
        self._servers.append(await start_submission(self.cfg, handler, server_context(self.cfg.tls)))
        if self.cfg.inbound is not None:
            peers = InboundHandler(self.cfg, self.accounts, self._committer, self.worker.enqueue,
                                   self._in_trust_space, self.trust_space.operator_dn)
            self._servers.append(await start_inbound(self.cfg, self.cfg.inbound.listen, peers,
                                                     peer_tls_context(self.cfg.tls)))
        log.info("gateway ready")

    async def _card_ready(self, account: str) -> None:
        """A card is back and unlocked: its account's held messages go on (issue 6, item 2)."""
        if await release_held(self.spool, account) and self.worker is not None:
            self.worker.poll_now()

    async def _submit_own(self, message: Incoming) -> None:
        """A message the gateway writes itself (an MDN): spooled like any other, then handed to the worker."""
        assert self.worker is not None
        self.worker.enqueue(await self._committer.accept(message))

    async def _in_trust_space(self, domain: str) -> bool:
        return self.trust_space.is_trust_space_domain(domain)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        if self._card_watch is not None:
            self._card_watch.cancel()
            await asyncio.gather(self._card_watch, return_exceptions=True)
        if self.worker is not None:
            await self.worker.stop()
        if self.relay is not None:
            await self.relay.close()
        if self.inbound_workers is not None:
            await self.inbound_workers.close()
        if self.cards is not None:
            await self.cards.close()
        await self.lmtp.close()
        if self.dovecot is not None:
            await self.dovecot.stop()
        await asyncio.to_thread(self.directory.close)  # waits for its lookup threads
        self.engine.dispose()
        self.bookkeeping.dispose()
        log.info("gateway stopped")


def _relay(cfg: GatewayConfig) -> OutboundRelay | None:
    """The relay to other gateways, when the configuration gives the trust anchors to check them with."""
    if cfg.tls.ca is None:
        return None
    nameservers = [(h, int(p or 53)) for h, _, p in (n.partition(":") for n in cfg.relay.nameservers)]
    return OutboundRelay(NextHopResolver(cfg.relay.routes, nameservers, cfg.relay.dns_timeout),
                         RelayLimiter(cfg.relay.per_destination),
                         client_tls_context(cfg.tls.cert, cfg.tls.key, cfg.tls.ca), helo=cfg.hostname,
                         timeout=cfg.relay.timeout,
                         sessions=SessionCache(idle=cfg.relay.session_idle, max_messages=cfg.relay.session_messages,
                                               per_hop=cfg.relay.per_destination))


async def serve(cfg: GatewayConfig, ready: asyncio.Event | None = None) -> None:
    """Run until SIGINT or SIGTERM, then stop cleanly."""
    os.umask(0o077)  # spool, database and mailboxes hold plaintext: the gateway's user only
    # A core file would hold message plaintext and private keys from memory: none is ever written.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
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
