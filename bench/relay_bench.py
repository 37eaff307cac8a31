"""Secure relay end to end: messages per second and latency from submission on gateway A to bob's
mailbox on gateway B (A signs with the organisation key file and encrypts, relays over mutual TLS to
B's port-25 listener; B decrypts, verifies, marks and delivers over LMTP), beside a plain baseline
measured in the same run by the same harness.

    .venv/bin/python bench/relay_bench.py [--messages 60] [--size 20480] [--repeats 3] [--paced-seconds 10]

The two gateways are the ones tests/integration/test_secure_relay.py checks (gateway_support.two_gateways).
Every figure is taken the same way: clients send over STARTTLS (+ AUTH on submission), one connection
each; an IMAP session on B polls with NOOP every `--poll-ms` (not IDLE: Dovecot batches IDLE notifications)
and reads the Subject of each new message, so a message counts when bob can read it. The gateway relays
IMAP to Dovecot on its own event loop (gateway/dovecot.py, _splice), so polling loads B a little: 10 ms
rather than the 1-2 ms of bench/submission.py. Latency runs from the 250 after
DATA to that moment. Throughput stops the clock at the last arrival. Medians over `--repeats`.

The plain baseline. The relay cannot be run with S/MIME switched off: A signs and encrypts everything it
sends to another gateway (gateway/pipeline.py, Pipeline._outbound has no plain path, and the MSSanté policy
refuses unsigned mail between gateways), so an A without [smime] keys fails every message. Without a
config switch for it, two baselines bracket the plain relay:
  * B local: bob submits on B to himself (submission, spool, LMTP): the same gateway code minus the
    relay hop and minus S/MIME; the ratio against it is the target's figure (it over-states the S/MIME
    cost a little, since the plain relay would also pay A's spool and the TLS hop).
  * B inbound plain: the message as a plain relay would send it, straight into B's port 25 over mutual
    TLS with A's certificate (B delivers it marked `unsigned`): the receiving half of a plain relay.
Needs root and Dovecot (as `make test`).
"""

from __future__ import annotations

import argparse
import email.parser
import email.utils
import imaplib
import itertools
import os
import shutil
import smtplib
import ssl
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.gateway_support import (
    GatewayProcess,
    TwoGateways,
    dev_pkis,
    short_tmpdir,
    two_gateways,
)

RUN = itertools.count()
LINE = b"Compte rendu de consultation, ligne de texte de longueur raisonnable pour un courrier.\r\n"


def message(sender: str, to: str, subject: str, size: int) -> bytes:
    head = (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: {email.utils.formatdate()}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}-{time.monotonic_ns()}@bench>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n").encode()
    body = (LINE * (size // len(LINE) + 1))[: max(0, size - len(head) - 2)]
    return head + body + b"\r\n"


def client_tls(gw: GatewayProcess, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=gw.ca)
    ctx.check_hostname = False  # the certificate names gw.<domain>; we dial 127.0.0.1
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


@dataclass
class Route:
    """One way into B's mailbox: where to connect, as whom, and the envelope."""

    label: str
    connect: Callable[[], smtplib.SMTP]
    sender: str
    recipient: str


def paths(gws: TwoGateways) -> tuple[Route, Route, Route]:
    a, b = gws.a, gws.b

    def submission(gw: GatewayProcess, user: str) -> Callable[[], smtplib.SMTP]:
        def connect() -> smtplib.SMTP:
            c = smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=120)
            c.starttls(context=client_tls(gw))
            c.login(user, gw.passwords[user])
            return c
        return connect

    def inbound_as_a() -> smtplib.SMTP:
        c = smtplib.SMTP("127.0.0.1", b.inbound_port, timeout=120, local_hostname=f"gw.{gws.alice.split('@')[1]}")
        c.starttls(context=client_tls(b, gws.pki_a.tls_server_chain, gws.pki_a.tls_server_key))
        return c

    return (Route("S/MIME relay A->B", submission(a, gws.alice), gws.alice, gws.bob),
            Route("B local (plain)", submission(b, gws.bob), gws.bob, gws.bob),
            Route("B inbound plain", inbound_as_a, gws.alice, gws.bob))


@dataclass
class Watcher:
    """bob's INBOX on B, polled with NOOP (RFC 9051 §6.1.2); records when each Subject became readable."""

    gw: GatewayProcess
    user: str
    arrivals: dict[str, float] = field(default_factory=dict)
    verdicts: dict[str, str] = field(default_factory=dict)
    poll: float = 0.01
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.imap = imaplib.IMAP4("127.0.0.1", self.gw.imap_port, timeout=60)
        self.imap.starttls(ssl_context=client_tls(self.gw))
        self.imap.login(self.user, self.gw.passwords[self.user])
        _, data = self.imap.select("INBOX")
        self.seen = int(data[0] or 0)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        parser = email.parser.BytesHeaderParser()
        while not self.stop.is_set():
            self.imap.noop()
            exists = self.imap.untagged_responses.pop("EXISTS", None)
            last = int(exists[-1]) if exists else 0  # type: ignore[arg-type]  # an EXISTS count is bytes
            if last > self.seen:
                now = time.perf_counter()
                _, data = self.imap.fetch(f"{self.seen + 1}:{last}",
                                          "(BODY.PEEK[HEADER.FIELDS (SUBJECT MSSGW-SECURITY)])")
                with self.lock:
                    for part in data:
                        if isinstance(part, tuple):
                            headers = parser.parsebytes(part[1])
                            subject = str(headers.get("Subject", ""))
                            self.arrivals[subject] = now
                            self.verdicts[subject] = str(headers.get("MSSGW-Security", "")).split(";")[0].strip()
                self.seen = last
            time.sleep(self.poll)

    def wait_for(self, subjects: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                missing = [s for s in subjects if s not in self.arrivals]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"{len(missing)} of {len(subjects)} messages never reached bob's mailbox "
                                 f"(first: {missing[0]!r}); see the gateways' logs (keep them with MSSGW_KEEP_TEST_DIRS=1)")
            time.sleep(0.01)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.imap.logout()


@dataclass
class Result:
    rate: float
    latencies: list[float]
    verdicts: set[str]


def run(path: Route, watcher: Watcher, *, clients: int, total: int, size: int, pace: float | None = None) -> Result:
    """`clients` connections share `total` messages: back to back, or, with `pace` (messages per second
    offered), each message sent at its slot of an open-loop schedule whatever the others are doing."""
    n = next(RUN)
    subjects = [f"bench {n}-{i}" for i in range(total)]
    msgs = [message(path.sender, path.recipient, s, size) for s in subjects]
    sent: dict[str, float] = {}
    counter = itertools.count()
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []
    start = 0.0

    def client() -> None:
        try:
            c = path.connect()
            barrier.wait()
            while (i := next(counter)) < total:
                if pace is not None:
                    time.sleep(max(0.0, start + i / pace - time.perf_counter()))
                refused = c.sendmail(path.sender, [path.recipient], msgs[i])
                sent[subjects[i]] = time.perf_counter()  # the 250 after DATA
                if refused:
                    raise RuntimeError(f"refused: {refused}")
            c.quit()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    start = time.perf_counter() + 0.01
    barrier.wait()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    watcher.wait_for(subjects, timeout=max(120.0, total))
    with watcher.lock:
        arrivals = [watcher.arrivals[s] for s in subjects]
        verdicts = {watcher.verdicts[s] for s in subjects}
    return Result(total / (max(arrivals) - start), [watcher.arrivals[s] - sent[s] for s in subjects], verdicts)


def ms(values: list[float], q: float) -> str:
    if len(values) < 2:
        return f"{values[0] * 1000:.0f}"
    return f"{statistics.quantiles(values, n=100, method='inclusive')[round(q * 100) - 1] * 1000:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=60, help="messages per throughput measurement (default 60)")
    ap.add_argument("--size", type=int, default=20 * 1024, help="message size in bytes (default 20480)")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per figure; the median is printed")
    ap.add_argument("--paced-rate", type=float, default=20.0, help="offered load of the paced run (msg/s)")
    ap.add_argument("--paced-seconds", type=float, default=10.0, help="length of the paced run (default 10 s)")
    ap.add_argument("--poll-ms", type=float, default=10.0, help="IMAP NOOP polling interval on B (default 10 ms)")
    ap.add_argument("--workers", type=int, default=8, help="spool workers on each gateway (default 8)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (the embedded Dovecot stores mail as the mail user), e.g. via `make bench`")

    root = short_tmpdir()
    pki_a, pki_b = dev_pkis(root)
    gws = two_gateways(root, pki_a, pki_b, log_level="WARNING", spool_workers=args.workers)
    gws.start()
    watcher = Watcher(gws.b, gws.bob, poll=args.poll_ms / 1000)
    smime, local, inbound = paths(gws)
    try:
        run(smime, watcher, clients=1, total=3, size=args.size)  # warm-up: connections, caches, directory
        print(f"secure relay benchmark: {args.messages} messages of {args.size} B per measurement, median of "
              f"{args.repeats}; organisation key file; {args.workers} spool workers per gateway")
        print("plain baseline = B local: bob -> bob on gateway B (submission, spool, LMTP, no S/MIME, no relay hop),")
        print("  because A cannot relay with S/MIME off (Pipeline._outbound always signs and encrypts); the ratio")
        print("  over-states the S/MIME cost slightly. B inbound plain = an unsigned message into B's port 25 over")
        print("  mutual TLS with A's certificate (the receiving half of a plain relay), for comparison.")
        print(f"{'clients':>7}  {'S/MIME msg/s':>12}  {'p50 ms':>6}  {'p99 ms':>6}  {'plain msg/s':>11}  {'ratio':>6}  "
              f"{'target':>6}  {'B inbound plain msg/s':>21}")
        for clients in (1, 8):
            results: dict[str, list[Result]] = {r.label: [] for r in (smime, local, inbound)}
            for _ in range(args.repeats):  # interleaved, so that drift on a shared machine hits all three alike
                for route in (smime, local, inbound):
                    results[route.label].append(run(route, watcher, clients=clients, total=args.messages, size=args.size))
            rate = {k: statistics.median(r.rate for r in v) for k, v in results.items()}
            lat = [x for r in results[smime.label] for x in r.latencies]
            verdicts = set().union(*(r.verdicts for r in results[smime.label]))
            secure, plain = rate[smime.label], rate[local.label]
            print(f"{clients:>7}  {secure:>12.1f}  {ms(lat, 0.5):>6}  {ms(lat, 0.99):>6}  {plain:>11.1f}  "
                  f"{secure / plain:>6.0%}  "
                  f"{'>= 70%':>6}  {rate[inbound.label]:>21.1f}")
            if verdicts != {"verified"}:
                print(f"  WARNING: S/MIME relay messages arrived with verdicts {sorted(verdicts)}, not all 'verified'")
        total = max(1, round(args.paced_rate * args.paced_seconds))
        paced = run(smime, watcher, clients=8, total=total, size=args.size, pace=args.paced_rate)
        p99 = statistics.quantiles(paced.latencies, n=100, method="inclusive")[98]
        print(f"paced: {total} messages offered at {args.paced_rate:g} msg/s (open loop, 8 connections): "
              f"delivered {paced.rate:.1f} msg/s, latency p50 {ms(paced.latencies, 0.5)} ms, "
              f"p99 {p99 * 1000:.0f} ms (target < 500 ms: {'met' if p99 < 0.5 else 'NOT met'})")
        if paced.rate < 0.95 * args.paced_rate:
            print(f"  the offered load exceeds what the relay delivers ({paced.rate:.1f} msg/s): the queue grows for the "
                  "whole run and the latency measures that queue")
        print(f"latency: from the 250 after DATA on A to the message readable by bob on B over IMAP (NOOP polling "
              f"every {args.poll_ms:g} ms)")
    finally:
        watcher.close()
        gws.stop()
        if not os.environ.get("MSSGW_KEEP_TEST_DIRS"):
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")


if __name__ == "__main__":
    main()
