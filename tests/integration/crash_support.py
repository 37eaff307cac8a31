"""Crash safety under load (issue 7, item 1), shared by bench/crash_test.py and tests/integration/test_crash_safety.py.

Clients push messages through a gateway over real SMTP while another thread kills a gateway process with SIGKILL
at random moments and restarts it; afterwards the recipient's Maildir is read and every message that got a `250`
must be there. A message is identified by its Message-ID, unique per run; each is sent once and never retried, so
a copy too many is the gateway's doing (a delivery repeated after a crash), not the client's.

Four roles, each a `Role`: `submission` (port 587 with STARTTLS and AUTH, local recipient, the gateway killed),
`inbound` (port 25 with a trust-space client certificate, gateway B killed), `relay` (submission on A, which signs,
encrypts and relays to B; A killed, so its relay worker dies in the middle of deliveries), `relay-peer` (the same
path with B killed under A's open relay sessions).
"""

from __future__ import annotations

import email.utils
import random
import re
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from config.schema import DatabaseConfig
from gateway.db import make_engine
from gateway.devpki import create_dev_pki
from gateway.spool import Spool
from tests.integration.gateway_support import (
    ALICE,
    BOB,
    GatewayProcess,
    TwoGateways,
    dev_pkis,
    two_gateways,
)

ROLES = ("submission", "inbound", "relay", "relay-peer")

LINE = b"Compte rendu de consultation, ligne de texte pour l'essai de panne.\r\n"
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*<([^>]+)>", re.IGNORECASE | re.MULTILINE)


@dataclass
class Role:
    """Where messages go in, which process dies, and where they must come out."""

    name: str
    victim: GatewayProcess
    connect: Callable[[], smtplib.SMTP]
    sender: str
    recipient: str
    mailbox: Path
    gateways: tuple[GatewayProcess, ...]
    """Every gateway on the path: their spools must be empty before the mailbox is counted."""


@dataclass
class Figures:
    role: str
    sent: int
    acknowledged: int
    refused: int
    """Answered with an error (4xx/5xx): not acknowledged, the client knows."""
    unknown: int
    """The connection died before the answer to DATA: the client cannot know (such a copy may or may not arrive)."""
    delivered: int
    """Acknowledged messages found in the mailbox."""
    lost: int
    duplicated: int
    """Copies beyond the first, over every message of the run."""
    kills: int
    queued_at_kill: list[int]
    """Messages in the victim's spool at each kill: accepted and not finished (being delivered or waiting)."""
    seconds: float
    drained: bool
    """Every spool on the path was empty at the end: nothing left waiting (a message stranded by a kill would be)."""
    released: int
    """Messages deferred by a kill (a peer that was down) and sent on by the operator's `queue retry`."""
    lost_ids: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        at_kills = ", ".join(map(str, self.queued_at_kill)) or "-"
        return [(f"role {self.role}: {self.sent} sent, {self.kills} SIGKILLs (messages in the spool at each: "
                 f"{at_kills}), {self.seconds:.1f} s"),
                (f"  acknowledged {self.acknowledged}  delivered {self.delivered}  lost {self.lost}  "
                 f"duplicated {self.duplicated}  (refused {self.refused}, unanswered at a kill {self.unknown}"
                 f"{f', deferred then retried by the operator {self.released}' if self.released else ''}"
                 f"{'' if self.drained else '; some spool was still not empty at the end'})")]


def message(sender: str, to: str, message_id: str, size: int) -> bytes:
    head = (f"From: {sender}\r\nTo: {to}\r\nSubject: crash test {message_id}\r\nDate: {email.utils.formatdate()}\r\n"
            f"Message-ID: <{message_id}>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            ).encode()
    body = (LINE * (size // len(LINE) + 1))[: max(0, size - len(head) - 2)]
    return head + body + b"\r\n"


def maildir_ids(maildir: Path) -> Counter[str]:
    """Message-IDs in a Maildir's new/ and cur/, with their number of copies (LMTP writes into new/; nobody reads
    the mailbox during a run, so no file moves to cur/ while this looks)."""
    found: Counter[str] = Counter()
    for folder in (maildir / "new", maildir / "cur"):
        for path in folder.iterdir() if folder.is_dir() else ():
            with open(path, "rb") as f:
                head = f.read(65536)
            match = _MESSAGE_ID.search(re.split(rb"\r?\n\r?\n", head, maxsplit=1)[0])
            if match:
                found[match.group(1).decode("ascii", "replace")] += 1
    return found


def retry_deferred(gw: GatewayProcess) -> int:
    """`mssgw queue retry` for every deferred message of `gw` (through the same Spool method, without a process each)."""
    engine = make_engine(DatabaseConfig(url=gw.database_url))
    try:
        spool = Spool(gw.root / "spool", engine)
        return sum(spool.release(entry.id) for entry in spool.entries(("deferred",)))
    finally:
        engine.dispose()


def spool_count(gw: GatewayProcess) -> int:
    msg = gw.root / "spool" / "msg"
    return sum(1 for _ in msg.iterdir()) if msg.is_dir() else 0


class _Load:
    """The shared state of the clients of one run."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.lock = threading.Lock()
        self.next = 0
        self.acknowledged: set[int] = set()
        self.refused: set[int] = set()
        self.unknown: set[int] = set()
        self.done = threading.Event()
        self.errors: list[BaseException] = []

    def take(self) -> int | None:
        with self.lock:
            if self.next >= self.total:
                return None
            self.next += 1
            return self.next - 1

    def acked(self) -> int:
        with self.lock:
            return len(self.acknowledged)


def run(role: Role, *, messages: int, clients: int, kills: int, size: int = 2048, seed: int | None = None,
        drain_timeout: float | None = None, restart_timeout: float = 60) -> Figures:
    """Send `messages` through `role` from `clients` connections while `role.victim` is SIGKILLed `kills` times at
    random moments (each when a random share of the messages has been acknowledged, after a random extra delay;
    kills left when every client is done fall among the deliveries still in progress), then wait for every spool
    on the path to drain and count the recipient's mailbox."""
    rng = random.Random(seed)
    tag = f"crash-{role.name}-{time.time_ns():x}"
    ids = [f"{tag}-{i}@{role.sender.partition('@')[2]}" for i in range(messages)]
    load = _Load(messages)
    thresholds = sorted(rng.sample(range(max(1, messages // 10), max(2, messages * 9 // 10)),
                                   min(kills, max(1, messages * 8 // 10))))
    # Also a random pause after the threshold, so that a gateway just restarted works a while before the next kill.
    delays = [rng.uniform(0.02, 0.3) for _ in thresholds]
    queued_at_kill: list[int] = []
    start = time.monotonic()

    def client() -> None:
        conn: smtplib.SMTP | None = None
        try:
            while (i := load.take()) is not None:
                conn = _connected(conn, role, deadline=time.monotonic() + restart_timeout)
                try:
                    refused = conn.sendmail(role.sender, [role.recipient],
                                            message(role.sender, role.recipient, ids[i], size))
                except smtplib.SMTPResponseException:  # an answer: 4xx/5xx to MAIL, RCPT or DATA
                    with load.lock:
                        load.refused.add(i)
                    _close(conn)
                    conn = None
                except (smtplib.SMTPException, OSError):  # the gateway died under us: no answer to DATA
                    with load.lock:
                        load.unknown.add(i)
                    _close(conn)
                    conn = None
                else:
                    with load.lock:
                        (load.refused if refused else load.acknowledged).add(i)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            load.errors.append(exc)
        finally:
            _close(conn)

    def killer() -> None:
        try:
            for threshold, delay in zip(thresholds, delays):
                while load.acked() < threshold and not load.done.is_set():
                    time.sleep(0.005)
                time.sleep(delay)
                queued_at_kill.append(spool_count(role.victim))
                role.victim.kill()
                role.victim.start(timeout=restart_timeout)
        except BaseException as exc:  # noqa: BLE001
            load.errors.append(exc)

    threads = [threading.Thread(target=client, name=f"crash-client-{n}", daemon=True) for n in range(clients)]
    murderer = threading.Thread(target=killer, name="crash-killer", daemon=True)
    murderer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load.done.set()
    murderer.join()
    if load.errors:
        raise load.errors[0]

    wanted = {ids[i] for i in load.acknowledged}
    deadline = time.monotonic() + (drain_timeout if drain_timeout is not None else max(120.0, messages * 0.2))
    found = maildir_ids(role.mailbox)
    drained, released = False, 0
    while time.monotonic() < deadline:
        drained = not any(spool_count(gw) for gw in role.gateways)
        if wanted <= set(found) and drained:
            break
        # What a kill deferred (the next hop was down) waits 5 minutes for its next attempt: the operator's
        # `mssgw queue retry` sends it now, as after any outage.
        released += sum(retry_deferred(gw) for gw in role.gateways)
        time.sleep(0.5)
        found = maildir_ids(role.mailbox)
    ours = {mid: n for mid, n in found.items() if mid.startswith(tag)}
    lost = sorted(wanted - set(ours))
    return Figures(role.name, messages, len(load.acknowledged), len(load.refused), len(load.unknown),
                   len(wanted & set(ours)), len(lost), sum(n - 1 for n in ours.values()), len(queued_at_kill),
                   queued_at_kill, time.monotonic() - start, drained, released, lost)


def _connected(conn: smtplib.SMTP | None, role: Role, deadline: float) -> smtplib.SMTP:
    """`conn`, or a new connection, tried until the victim is back (it may be restarting)."""
    while conn is None:
        try:
            return role.connect()
        except (smtplib.SMTPException, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    return conn


def _close(conn: smtplib.SMTP | None) -> None:
    if conn is not None:
        try:
            conn.close()
        except OSError:
            pass


# --- The roles' set-ups ----------------------------------------------------------------------------------------------

CLIENT_TIMEOUT = 120.0  # per SMTP command: the acknowledgement waits for fsyncs on a loaded machine


@contextmanager
def submission_role(root: Path, *, log_level: str = "INFO", workers: int = 4) -> Iterator[Role]:
    """One gateway; alice submits to bob, a local mailbox; the gateway is the victim."""
    _searchable(root)
    pki = create_dev_pki(root / "pki")
    gw = GatewayProcess(root / "gw", pki.directory, log_level=log_level, spool_workers=workers)
    gw.start()
    try:
        yield Role("submission", gw, lambda: gw.smtp(ALICE, timeout=CLIENT_TIMEOUT), ALICE, BOB, gw.maildir(BOB),
                   (gw,))
    finally:
        stop(gw)


@contextmanager
def two_gateway_world(root: Path, *, log_level: str = "INFO", workers: int = 4) -> Iterator[TwoGateways]:
    """Gateways A and B as tests/integration/test_secure_relay.py sets them up (gateway_support.two_gateways)."""
    _searchable(root)
    pki_a, pki_b = dev_pkis(root)
    gws = two_gateways(root, pki_a, pki_b, log_level=log_level, spool_workers=workers)
    gws.start()
    try:
        yield gws
    finally:
        for gw in (gws.a, gws.b):
            stop(gw)


def inbound_role(gws: TwoGateways) -> Role:
    """A peer with A's trust-space certificate hands mail for bob to B's port 25; B is the victim."""
    a_domain = gws.alice.partition("@")[2]

    def connect() -> smtplib.SMTP:
        return gws.b.peer_smtp(gws.pki_a.tls_server_chain, gws.pki_a.tls_server_key, f"gw.{a_domain}",
                               timeout=CLIENT_TIMEOUT)

    return Role("inbound", gws.b, connect, gws.alice, gws.bob, gws.b.maildir(gws.bob), (gws.b,))


def relay_role(gws: TwoGateways) -> Role:
    """alice submits on A for bob on B: A signs, encrypts and relays; A is the victim, killed mid-relay."""
    return Role("relay", gws.a, lambda: gws.a.smtp(gws.alice, timeout=CLIENT_TIMEOUT), gws.alice, gws.bob,
                gws.b.maildir(gws.bob), (gws.a, gws.b))


def relay_peer_role(gws: TwoGateways) -> Role:
    """The same path, but B dies: A's relay sessions (kept open between messages) break under it."""
    return Role("relay-peer", gws.b, lambda: gws.a.smtp(gws.alice, timeout=CLIENT_TIMEOUT), gws.alice, gws.bob,
                gws.b.maildir(gws.bob), (gws.a, gws.b))


def stop(gw: GatewayProcess) -> None:
    """Stop a gateway cleanly (its Dovecot with it); a victim is always restarted after its last kill."""
    if gw.proc is not None and gw.proc.poll() is None:
        gw.interrupt()


def _searchable(root: Path) -> None:
    """The mail user must traverse the directory to reach its mailboxes below it."""
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    root.chmod(0o755)
