"""Regression (issue 6, item 4): an inbound message for two local recipients, the first with a key file and
the second with a CPS card that is not in any reader. Before the fix the first recipient got its copy, then the
card's hold parked the whole message without recording that copy, so every release delivered it again to the
first recipient (and never counted it). Now the first recipient's delivery is recorded at once, the second
waits (deferred, then held alone), and once its key is back it gets its copy: one copy each, nothing lost.

Real parts: the spool (files and SQLite), the delivery worker, the pipeline, S/MIME from smime/ with the
development PKI's keys, a CardKeys without any reader, and an LMTP server (aiosmtpd) on a unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import Engine

from config.schema import (
    DatabaseConfig,
    DovecotConfig,
    GatewayConfig,
    Listener,
    SpoolConfig,
    SubmissionConfig,
    TLSConfig,
)
from gateway.cards import CardKeys
from gateway.db import create_tables, make_engine
from gateway.delivery import DeliveryWorker
from gateway.devpki import DevPki
from gateway.lmtp import LmtpPool
from gateway.pipeline import AccountKeys, KeyRing, Pipeline
from gateway.spool import Incoming, Spool, new_queue_id
from smime.certpath import TrustStore
from smime.filekeys import FileKey
from smime.message import sign_and_encrypt
from tests.integration.gateway_support import short_tmpdir

DOMAIN = "b.mssante.test"
FIRST = f"a-secretariat@{DOMAIN}"  # the recipients are claimed in address order: the key file's comes first
SECOND = f"z-practitioner@{DOMAIN}"
MARKER = b"Compte rendu 5e1d"


@dataclass
class Mailboxes:
    """What the LMTP server (RFC 2033) received: one (recipient, message) per delivered copy."""

    copies: list[tuple[str, bytes]] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        self.copies.extend((rcpt, content) for rcpt in envelope.rcpt_tos)
        return "\r\n".join("250 2.0.0 delivered" for _ in envelope.rcpt_tos)

    def count(self, rcpt: str) -> int:
        return sum(1 for r, _ in self.copies if r == rcpt)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


@contextlib.asynccontextmanager
async def lmtp_server(path: Path) -> AsyncIterator[Mailboxes]:
    boxes = Mailboxes()
    server = await asyncio.get_running_loop().create_unix_server(lambda: LMTP(boxes, decode_data=False), str(path))
    try:
        yield boxes
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    engine: Engine = make_engine(DatabaseConfig(url=f"sqlite:///{tmp_path / 'gw.db'}"))
    create_tables(engine)
    yield Spool(tmp_path / "spool", engine)
    engine.dispose()


def config(tmp_path: Path, lmtp: Path, dev_pki: DevPki) -> GatewayConfig:
    listener = Listener("127.0.0.1", 0)
    return GatewayConfig(hostname=f"gw.{DOMAIN}", local_domains=(DOMAIN,),
                         tls=TLSConfig(dev_pki.tls_server_chain, dev_pki.tls_server_key),
                         database=DatabaseConfig(url=f"sqlite:///{tmp_path / 'gw.db'}"),
                         spool=SpoolConfig(tmp_path / "spool"), submission=SubmissionConfig(listener),
                         mailboxes=DovecotConfig("external", listener, tmp_path, tmp_path, lmtp=f"unix:{lmtp}"))


def file_key(key: Path, cert: Path) -> FileKey:
    return FileKey.from_pem(key.read_bytes(), cert.read_bytes())


async def settle(spool: Spool, queue_id: str, states: tuple[str, ...]) -> str:
    for _ in range(1500):
        [entry] = [e for e in spool.entries() if e.id == queue_id]
        if entry.state in states:
            return entry.state
        await asyncio.sleep(0.02)
    raise AssertionError(f"message {queue_id} still {entry.state}")


def pending(spool: Spool, queue_id: str) -> list[str]:
    [entry] = [e for e in spool.entries() if e.id == queue_id]
    return [address for address, state, _ in entry.recipients if state == "pending"]


async def test_released_multi_recipient_message_gives_each_recipient_one_copy(
        tmp_path: Path, sock_dir: Path, spool: Spool, dev_pki: DevPki) -> None:
    org, practitioner = dev_pki.organisation, dev_pki.practitioners[0]
    letter = (f"From: {org.email}\r\nTo: {FIRST}, {SECOND}\r\nSubject: deux destinataires\r\n"
              f"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n").encode() + MARKER + b"\r\n"
    signer = file_key(org.key, org.cert)
    second_key = file_key(practitioner.auth_key, practitioner.auth_cert)
    sealed = await sign_and_encrypt(letter, signer, [signer.certificate, second_key.certificate])
    trust = TrustStore.from_pem(dev_pki.ca_bundle.read_bytes(), dev_pki.crls_pem.read_bytes())
    socket = sock_dir / "lmtp"
    cfg = config(tmp_path, socket, dev_pki)
    card_absent = AccountKeys(KeyRing({FIRST: signer}), CardKeys({SECOND: practitioner.rpps}))
    card_back = AccountKeys(KeyRing({FIRST: signer, SECOND: second_key}))

    async with lmtp_server(socket) as boxes:
        lmtp = LmtpPool(f"unix:{socket}", size=2)

        async def attempt(keys: AccountKeys, expect: tuple[str, ...], *, release: bool) -> str:
            worker = DeliveryWorker(spool, Pipeline(cfg, lmtp, keys=keys, trust=trust).process)
            if release:
                assert spool.release(msg.id)
            worker.start()
            if not release:
                worker.enqueue(msg)
            try:
                return await settle(spool, msg.id, expect)
            finally:
                await worker.stop()

        [msg] = spool.accept_batch([Incoming(new_queue_id(), org.email, (FIRST, SECOND), sealed, None, "inbound")])
        # The first recipient is served; the second waits for its card (deferred, not a hold that forgets).
        assert await attempt(card_absent, ("deferred", "hold", "done"), release=False) == "deferred"
        assert (boxes.count(FIRST), boxes.count(SECOND)) == (1, 0)
        assert pending(spool, msg.id) == [SECOND]
        # An operator's release while the card is still away: held, for the second recipient alone.
        assert await attempt(card_absent, ("hold", "deferred", "done"), release=True) == "hold"
        assert (boxes.count(FIRST), boxes.count(SECOND)) == (1, 0)
        # The card is back: released, the second recipient gets its copy, the first no second one.
        assert await attempt(card_back, ("done", "deferred", "hold", "failed"), release=True) == "done"
        await lmtp.close()
    assert (boxes.count(FIRST), boxes.count(SECOND)) == (1, 1)
    assert all(MARKER in content and b"MSSGW-Security: verified" in content for _, content in boxes.copies)
    assert not spool.path(msg.id).exists()
