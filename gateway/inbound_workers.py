"""Opening inbound S/MIME in worker processes: decrypt, verify and mark off the event loop, on other cores.

Opening a small message costs the gateway's single event loop about as much as everything else it does for it
(parsing CMS, the certificate path with its CRLs, decryption, marking: pure Python under the GIL, which a thread
would not relieve: cryptography's RSA does not release it either). For recipients whose key is a key file, the
whole of `secure_inbound` runs in a process of this pool instead, with the same configuration: the keys, trust
anchors and CRLs loaded once per process, and its own connection to the directory for the signer's RPPS check.
A recipient whose key is a CPS card is opened on the loop as before: the card has one session, in this process.

Whatever fails in a worker comes back as `OpenFailed` (transient): the delivery worker retries later, as it does
when opening fails on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from config.schema import GatewayConfig
from directory_sync.lookup import DirectoryLookup, Recipient
from gateway.db import make_engine
from gateway.errors import GatewayError
from gateway.inbound_security import InboundResult, secure_inbound
from gateway.logsetup import setup_logging
from gateway.pipeline import KeyRing, load_trust, signer_identity
from smime.certpath import TrustStore
from smime.limits import limits_from_config

log = logging.getLogger(__name__)


class OpenFailed(GatewayError):
    """Opening in a worker process failed for a reason of ours (not the sender's): try again later."""


class _InlineLookup(DirectoryLookup):
    """The directory read on the worker's own thread: its loop opens one message at a time and has nothing else
    to do meanwhile, so the hop to a lookup thread (and back, for the GIL) was only a cost."""

    async def lookup(self, address: str) -> Recipient | None:
        return self.lookup_blocking(address)


@dataclass(slots=True)
class _Worker:
    cfg: GatewayConfig
    keys: KeyRing
    trust: TrustStore
    directory: DirectoryLookup
    loop: asyncio.AbstractEventLoop


_worker: _Worker | None = None


def _start(cfg: GatewayConfig) -> None:
    """In each worker process, once: the parent handles SIGINT/SIGTERM and stops the pool itself; should the
    parent die without doing so (SIGKILL), the worker notices and exits rather than linger."""
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(cfg.logging)
    parent = os.getppid()
    threading.Thread(target=_exit_with, args=(parent,), name="parent-watch", daemon=True).start()
    trust = load_trust(cfg.smime)
    assert trust is not None
    _worker = _Worker(cfg, KeyRing.load(cfg.smime), trust, _InlineLookup(make_engine(cfg.database), threads=1),
                      asyncio.new_event_loop())


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _open(data: bytes, recipient: str) -> InboundResult:
    worker = _worker
    if worker is None:
        raise OpenFailed("the worker process did not start")
    key = worker.keys.key_for(recipient)
    try:
        return worker.loop.run_until_complete(secure_inbound(
            data, recipient=recipient, decrypter=key, trust=worker.trust,
            identity_check=signer_identity(worker.directory), hostname=worker.cfg.hostname,
            limits=limits_from_config(worker.cfg.limits)))
    except Exception as exc:  # noqa: BLE001 - sent back as text: the parent may not be able to rebuild the type
        raise OpenFailed(f"{type(exc).__name__}: {exc}") from None


def _ready() -> bool:
    return _worker is not None


class InboundWorkers:
    """`await open(data, recipient)` in one of `processes` worker processes (spawned: the gateway has threads)."""

    def __init__(self, cfg: GatewayConfig, processes: int) -> None:
        self._pool = ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start, initargs=(cfg,))
        self.processes = processes

    async def start(self) -> None:
        """Start every process now (each takes about a second to import and load keys), not at the first mail."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._pool, _ready) for _ in range(self.processes)))

    async def open(self, data: bytes, recipient: str) -> InboundResult:
        return await asyncio.get_running_loop().run_in_executor(self._pool, _open, data, recipient)

    async def close(self) -> None:
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
