"""Submission throughput and latency: the gateway (durable accept + LMTP delivery to Dovecot)
beside bare aiosmtpd (same TLS + AUTH, a handler that discards), measured in the same run.

    .venv/bin/python bench/submission.py [--messages 300] [--size 10240]

Prints, for 1 and 8 concurrent clients, messages per second accepted *and delivered* (the
clock stops when the last message is in the mailbox), the bare aiosmtpd rate, their ratio
(target: at least 60 %), and the median latency from the end of DATA to the message being
readable over IMAP, over sequential messages. Needs root and Dovecot (as `make test`).
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import imaplib
import os
import shutil
import signal
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config.schema import DatabaseConfig
from gateway.accounts import AccountStore
from gateway.db import create_tables, make_engine
from gateway.devpki import create_dev_pki

DOMAIN = "dev.mssante.test"
ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
PASSWORD = "benchmark-password"

BARE_SERVER = textwrap.dedent("""
    import asyncio, logging, ssl, sys
    from aiosmtpd.smtp import SMTP, AuthResult
    logging.getLogger("mail.log").setLevel(logging.ERROR)

    class Discard:
        async def handle_DATA(self, server, session, envelope):
            return "250 2.0.0 Ok: discarded"

    async def main():
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(sys.argv[2], sys.argv[3])
        auth = lambda *a: AuthResult(success=True)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(Discard(), hostname="bare", tls_context=ctx, require_starttls=True,
                         auth_required=True, authenticator=auth, data_size_limit=26214400),
            "127.0.0.1", int(sys.argv[1]))
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def message(i: int, size: int) -> bytes:
    head = (f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: bench {i}\r\nDate: {email.utils.formatdate()}\r\n"
            f"Message-ID: <bench-{i}-{time.monotonic_ns()}@{DOMAIN}>\r\n\r\n").encode()
    line = b"Compte rendu de consultation, ligne de texte de longueur raisonnable pour un courrier.\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head) - 2)]
    return head + body + b"\r\n"


def tls_context(ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    return ctx


def send_all(port: int, ca: Path, clients: int, per_client: int, size: int) -> float:
    """Each client: one connection, STARTTLS, AUTH, then `per_client` messages. Returns the start time."""
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            c = smtplib.SMTP("127.0.0.1", port, timeout=60)
            c.starttls(context=tls_context(ca))
            c.login(ALICE, PASSWORD)
            msgs = [message(n * per_client + i, size) for i in range(per_client)]
            barrier.wait()
            for m in msgs:
                c.sendmail(ALICE, [BOB], m)
            c.quit()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return start


def count_delivered(maildir: Path) -> int:
    return sum(len(os.listdir(maildir / d)) for d in ("new", "cur") if (maildir / d).exists())


class Gateway:
    def __init__(self, root: Path, pki: Path) -> None:
        self.smtp_port, self.imap_port = free_port(), free_port()
        self.ca = pki / "ca-bundle.pem"
        self.maildir = root / "mail" / DOMAIN / "bob" / "Maildir"
        self.lmtp = f"unix:{root / 'dc' / 'lmtp'}"
        cfg = root / "gateway.toml"
        cfg.write_text(f"""hostname = "gw.dev.mssante.test"
local_domains = ["{DOMAIN}"]
[tls]
cert = "{pki / 'gateway' / 'tls-server-chain.pem'}"
key = "{pki / 'gateway' / 'tls-server.key'}"
[database]
url = "sqlite:///gateway.db"
[spool]
dir = "spool"
workers = 8
[submission]
listen = {{ host = "127.0.0.1", port = {self.smtp_port} }}
[mailboxes]
mode = "embedded"
imap = {{ host = "127.0.0.1", port = {self.imap_port} }}
base_dir = "dc"
mail_dir = "mail"
[logging]
level = "WARNING"
file = "gateway.log"
""")
        engine = make_engine(DatabaseConfig(url=f"sqlite:///{root / 'gateway.db'}"))
        create_tables(engine)
        store = AccountStore(engine)
        store.add(ALICE, PASSWORD)
        store.add(BOB, PASSWORD)
        engine.dispose()
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "-c", str(cfg), "run"], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            if b"is running" in raw:
                break
        else:
            raise SystemExit("the gateway did not start; see its log in " + str(root))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)


def run_gateway(gw: Gateway, clients: int, total: int, size: int) -> float:
    before = count_delivered(gw.maildir)
    start = send_all(gw.smtp_port, gw.ca, clients, total // clients, size)
    target = before + (total // clients) * clients
    while count_delivered(gw.maildir) < target:
        time.sleep(0.002)
    return (target - before) / (time.perf_counter() - start)


def run_bare(port: int, ca: Path, clients: int, total: int, size: int) -> float:
    start = send_all(port, ca, clients, total // clients, size)
    return (total // clients) * clients / (time.perf_counter() - start)


def run_lmtp_only(gw: Gateway, clients: int, total: int, size: int) -> float:
    """The ceiling set by the mailbox store: Dovecot's LMTP alone, `clients` deliveries at a time."""
    from gateway import lmtp

    async def go() -> float:
        sem = asyncio.Semaphore(clients)
        msgs = [message(20_000_000 + i, size) for i in range(total)]

        async def one(m: bytes) -> None:
            async with sem:
                await lmtp.deliver(gw.lmtp, ALICE, [BOB], m)
        start = time.perf_counter()
        await asyncio.gather(*(one(m) for m in msgs))
        return total / (time.perf_counter() - start)
    return asyncio.run(go())


def imap_latency(gw: Gateway, samples: int, size: int) -> list[float]:
    """Seconds from the 250 after DATA until the message can be read over IMAP (NOOP polling).

    Polling, not IDLE: Dovecot batches IDLE notifications for half a second, which would
    measure Dovecot's timer rather than the gateway.
    """
    imap = imaplib.IMAP4("127.0.0.1", gw.imap_port, timeout=30)
    imap.starttls(ssl_context=tls_context(gw.ca))
    imap.login(BOB, PASSWORD)
    _, data = imap.select("INBOX")
    seen = int(data[0])
    smtp = smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=30)
    smtp.starttls(context=tls_context(gw.ca))
    smtp.login(ALICE, PASSWORD)
    out = []
    for i in range(samples):
        m = message(10_000_000 + i, size)
        smtp.mail(ALICE)
        smtp.rcpt(BOB)
        smtp.putcmd("data")
        smtp.getreply()
        smtp.send(smtplib._quote_periods(m) + b".\r\n")  # type: ignore[attr-defined]
        code, _ = smtp.getreply()
        t0 = time.perf_counter()
        assert code == 250
        while True:
            imap.noop()
            exists = imap.untagged_responses.pop("EXISTS", None)
            if exists and int(exists[-1]) > seen:
                seen = int(exists[-1])
                break
            time.sleep(0.001)
        out.append(time.perf_counter() - t0)
    smtp.quit()
    imap.logout()
    return out


def measure(_label: str, fn: Callable[[], float], repeats: int) -> float:
    values = [fn() for _ in range(repeats)]
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=240, help="messages per measurement (default 240)")
    ap.add_argument("--size", type=int, default=10 * 1024, help="message size in bytes (default 10240)")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per figure; the median is printed")
    ap.add_argument("--latency-samples", type=int, default=30)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (the embedded Dovecot stores mail as the mail user), e.g. via `make bench`")

    root = Path(tempfile.mkdtemp(prefix="mssgw-bench-", dir="/tmp"))
    root.chmod(0o755)
    pki = create_dev_pki(root / "pki")
    bare_port = free_port()
    bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(bare_port), str(pki.tls_server_chain),
                             str(pki.tls_server_key)], stdout=subprocess.PIPE)
    assert bare.stdout is not None
    bare.stdout.readline()
    gw = Gateway(root, pki.directory)
    try:
        print(f"submission benchmark: {args.messages} messages of {args.size} B per measurement, "
              f"median of {args.repeats}; STARTTLS + AUTH, one connection per client")
        print("(Dovecot LMTP alone: the same messages handed straight to the mailbox store, a ceiling for the gateway)")
        print(f"{'clients':>7}  {'gateway msg/s':>13}  {'bare aiosmtpd msg/s':>19}  {'ratio':>6}  {'target':>6}"
              f"  {'Dovecot LMTP alone':>18}  {'gateway/LMTP':>12}")
        for clients in (1, 8):
            g = measure("gateway", lambda c=clients: run_gateway(gw, c, args.messages, args.size), args.repeats)
            b = measure("bare", lambda c=clients: run_bare(bare_port, pki.ca_bundle, c, args.messages, args.size),
                        args.repeats)
            d = measure("lmtp", lambda c=clients: run_lmtp_only(gw, c, args.messages, args.size), args.repeats)
            print(f"{clients:>7}  {g:>13.1f}  {b:>19.1f}  {g / b:>6.0%}  {'>= 60%':>6}  {d:>18.1f}  {g / d:>12.0%}")
        lat = imap_latency(gw, args.latency_samples, args.size)
        print(f"latency, end of DATA to readable over IMAP (NOOP polling): median {statistics.median(lat) * 1000:.1f} ms, "
              f"p90 {statistics.quantiles(lat, n=10)[-1] * 1000:.1f} ms over {len(lat)} messages")
    finally:
        gw.stop()
        bare.terminate()
        bare.wait(10)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
