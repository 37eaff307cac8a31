"""A gateway as a real process (`mssgw run`) for integration tests, with its own directory,
accounts and log, and the clients that talk to it."""

from __future__ import annotations

import imaplib
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from config.schema import DatabaseConfig
from gateway.accounts import AccountStore
from gateway.db import create_tables, make_engine
from gateway.devdirectory import DirectoryMailbox, operator_dn, seed_directory, whitelist_xml
from gateway.devpki import DevPki, Practitioner, create_dev_pki

DOMAIN = "dev.mssante.test"
ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
PASSWORDS = {ALICE: "alice-long-password", BOB: "bob-long-password"}
ROOT = Path(__file__).resolve().parents[2]


CARD_HOLDER_PASSWORD = "card-holder-password-1"


T = TypeVar("T")


def inbox_messages(c: imaplib.IMAP4) -> list[bytes]:
    """Every message of the INBOX of a logged-in IMAP session, whole, oldest first."""
    c.select("INBOX")
    _, data = c.search(None, "ALL")
    return [part[1] for n in data[0].split() for part in c.fetch(n, "(BODY.PEEK[])")[1] if isinstance(part, tuple)]


def wait_until(predicate: Callable[[], T], timeout: float = 60.0) -> T:
    """Poll `predicate` every 0.25 s until it returns something true or `timeout` passes; its last value."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.25)
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_tmpdir() -> Path:
    """Short (unix socket paths are limited to 107 bytes) and reachable by the mail user."""
    path = Path(tempfile.mkdtemp(prefix="mssgw-e2e-", dir="/tmp"))
    path.chmod(0o755)
    return path


class GatewayProcess:
    """`python -m gateway.cli -c CONFIG run` in its own process, with its log in a file.

    `extra` is appended to the configuration (e.g. [relay], [smime], [inbound] tables); `ca`
    replaces the trust anchors of the PKI (two gateways trust each other's roots). Benchmarks
    lower `log_level` (DEBUG costs) and raise `spool_workers`.
    """

    def __init__(self, root: Path, pki: Path, database_url: str | None = None, *, domain: str = DOMAIN,
                 hostname: str = "gw.dev.mssante.test", accounts: Mapping[str, str] | None = None,
                 ca: Path | None = None, extra: str = "", log_level: str = "DEBUG", spool_workers: int = 4,
                 inbound_port: int | None = None, more_domains: Sequence[str] = ()) -> None:
        self.root = root
        root.mkdir(mode=0o755, exist_ok=True)
        self.database_url = database_url or f"sqlite:///{root / 'gateway.db'}"
        self.smtp_port, self.imap_port = free_port(), free_port()
        self.inbound_port = inbound_port or free_port()
        self.passwords = dict(accounts if accounts is not None else PASSWORDS)
        self.config = root / "gateway.toml"
        self.config.write_text(f"""
hostname = "{hostname}"
local_domains = [{", ".join(f'"{d}"' for d in (domain, *more_domains))}]
[tls]
cert = "{pki / 'gateway' / 'tls-server-chain.pem'}"
key = "{pki / 'gateway' / 'tls-server.key'}"
ca = "{ca or pki / 'ca-bundle.pem'}"
[database]
url = "{self.database_url}"
[spool]
dir = "spool"
workers = {spool_workers}
[submission]
listen = {{ host = "127.0.0.1", port = {self.smtp_port} }}
[mailboxes]
mode = "embedded"
imap = {{ host = "127.0.0.1", port = {self.imap_port} }}
base_dir = "dc"
mail_dir = "mail"
[logging]
level = "{log_level}"
{extra.replace("INBOUND_PORT", str(self.inbound_port))}
""", encoding="utf-8")
        self.ca = str(ca or pki / "ca-bundle.pem")
        self.log = root / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        engine = make_engine(DatabaseConfig(url=self.database_url))
        create_tables(engine)
        store = AccountStore(engine)
        for address, password in self.passwords.items():
            store.add(address, password)
        engine.dispose()

    def mssgw(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """An operator command against this gateway's configuration."""
        return subprocess.run([sys.executable, "-m", "gateway.cli", "-c", str(self.config), *args], cwd=ROOT,
                              input=stdin, capture_output=True, text=True, check=False)

    def start(self, timeout: float = 30) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        out = open(self.log, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "-c", str(self.config), "run"],
                                     cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        deadline = time.monotonic() + timeout
        # "gateway ready" is logged at INFO; the banner on stdout (into the same file) follows it at any log level.
        while not any(mark in self.log.read_bytes()[offset:] for mark in (b"gateway ready", b"mssgw is running")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the gateway did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def interrupt(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(30)

    def smtp_as(self, user: str, password: str) -> smtplib.SMTP:
        c = smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=15)
        c.starttls(context=self._tls())
        c.login(user, password)
        return c

    def smtp(self, user: str = ALICE, *, timeout: float = 15) -> smtplib.SMTP:
        c = smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=timeout)
        c.starttls(context=self._tls())
        c.login(user, self.passwords[user])
        return c

    def peer_smtp(self, cert: Path, key: Path, helo: str, *, timeout: float = 15) -> smtplib.SMTP:
        """A peer gateway on the inbound port: STARTTLS with `cert` (leaf then chain) as client certificate."""
        c = smtplib.SMTP("127.0.0.1", self.inbound_port, timeout=timeout, local_hostname=helo)
        ctx = self._tls()
        ctx.load_cert_chain(cert, key)
        c.starttls(context=ctx)
        return c

    def maildir(self, address: str) -> Path:
        """Where the embedded Dovecot keeps `address`'s INBOX (mail_dir/<domain>/<local part>/Maildir)."""
        local, _, domain = address.partition("@")
        return self.root / "mail" / domain / local / "Maildir"

    def imap(self, user: str = BOB) -> imaplib.IMAP4:
        c = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=15)
        c.starttls(ssl_context=self._tls())
        c.login(user, self.passwords[user])
        return c

    def _tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.check_hostname = False  # the certificate names gw.dev.mssante.test; we dial 127.0.0.1
        return ctx




# --- Two gateways, one domain each (issue 6, item 7), shared by tests/integration/test_secure_relay.py and
# bench/relay_bench.py so that the benchmark measures the set-up the test checks.

A, B = "a.mssante.test", "b.mssante.test"

def whitelist(*domains: str, operators: Mapping[str, str | None] | None = None) -> str:
    """The ANS trust-space list (`ListeBlanche`) naming `domains`, each with the operator DN `operators` gives
    (none when absent)."""
    dns = dict(operators or {})
    return whitelist_xml({d: dns.get(d) for d in domains} | dns)


@dataclass
class TwoGateways:
    """Gateway A (domain a.mssante.test, account `alice`) relaying to gateway B (b.mssante.test, account `bob`)."""

    root: Path
    pki_a: DevPki
    pki_b: DevPki
    a: GatewayProcess
    b: GatewayProcess
    alice: str
    bob: str
    plain_bob: str | None = None
    """bob's mailbox in B's second domain, reached by a plain relay (two_gateways' `plain_domain`)."""

    def start(self) -> None:
        self.b.start()
        self.a.start()

    def stop(self) -> None:
        for gw in (self.a, self.b):
            if gw.proc is not None and gw.proc.poll() is None:
                gw.interrupt()


def dev_pkis(root: Path) -> tuple[DevPki, DevPki]:
    """One dev PKI per gateway, each naming its own domain and gateway host."""
    return (create_dev_pki(root / "pki-a", domain=A, gateway_hostname=f"gw.{A}"),
            create_dev_pki(root / "pki-b", domain=B, gateway_hostname=f"gw.{B}"))


def two_gateways(root: Path, pki_a: DevPki, pki_b: DevPki, *, routes: Mapping[str, str] | None = None,
                 mailboxes: Sequence[tuple[str, Path]] = (), log_level: str = "DEBUG",
                 spool_workers: int = 4, card_holders: Sequence[Practitioner] = (),
                 operators: Mapping[str, str | None] | None = None, plain_domain: str | None = None,
                 inbound_processes: int = 0) -> TwoGateways:
    """Configure (not start) A and B: both trust both PKIs' roots and CRLs and the trust space {A, B, routed
    domains}, A and B with the subject of their gateway certificate as operator DN (`operators` adds domains
    or replaces the DN given, None for none); each signs/decrypts with its organisation key file; A routes B's
    domain to B's inbound listener (plus `routes`, domain -> "[host]:port"), and its directory gives bob's
    encryption certificate (plus `mailboxes`: (address, encryption certificate) of other domains).
    `card_holders`: practitioners of PKI A whose accounts on A sign with their CPS card (`[[smime.cards]]`),
    published with their RPPS number in B's directory (which checks the signer's RPPS against the From
    address). The directories are seeded as `mssgw demo setup` seeds the demo's (gateway.devdirectory).
    `plain_domain`: a second domain of B, with a mailbox `bob` of its own, to which A relays WITHOUT S/MIME
    (`relay.plain_domains`): the plain relay through the same two gateways (bench/relay_bench.py).
    `inbound_processes`: `smime.processes` of both (inbound mail opened in worker processes)."""
    anchors, crls = root / "anchors.pem", root / "crls.pem"
    anchors.write_bytes(pki_a.ca_bundle.read_bytes() + pki_b.ca_bundle.read_bytes())
    crls.write_bytes(pki_a.crls_pem.read_bytes() + pki_b.crls_pem.read_bytes())
    alice, bob = pki_a.organisation.email, pki_b.organisation.email
    extra_routes = dict(routes or {})
    dns = {A: operator_dn(pki_a.tls_server_cert), B: operator_dn(pki_b.tls_server_cert), **(operators or {})}
    plain_bob = f"{bob.partition('@')[0]}@{plain_domain}" if plain_domain else None
    if plain_domain:
        dns[plain_domain] = dns[B]
    (root / "trust.xml").write_text(whitelist(A, B, *extra_routes, *([plain_domain] if plain_domain else []),
                                              operators=dns), encoding="utf-8")

    def smime(account: str, pki: DevPki, cards: Sequence[Practitioner] = ()) -> str:
        bindings = ", ".join(f'{{ account = "{p.email}", rpps = "{p.rpps}" }}' for p in cards)
        return (f'[smime]\ntrust_anchors = "{anchors}"\ncrls = "{crls}"\n'
                f'keys = [{{ account = "{account}", cert = "{pki.organisation.cert}", '
                f'key = "{pki.organisation.key}" }}]\ncards = [{bindings}]\nprocesses = {inbound_processes}\n')

    inbound = '[inbound]\nlisten = { host = "127.0.0.1", port = INBOUND_PORT }\n'
    a_inbound = free_port()  # B routes A's domain back to it (MDNs)
    b = GatewayProcess(root / "b", pki_b.directory, domain=B, hostname=f"gw.{B}",
                       accounts={bob: "bob-password-1", **({plain_bob: "bob-password-1"} if plain_bob else {})},
                       ca=anchors, extra=inbound + smime(bob, pki_b)
                       + f'[relay]\nroutes = {{ "{A}" = "[127.0.0.1]:{a_inbound}" }}\n',
                       log_level=log_level, spool_workers=spool_workers,
                       more_domains=[plain_domain] if plain_domain else [])
    b_routes = {B: f"[127.0.0.1]:{b.inbound_port}", **({plain_domain: f"[127.0.0.1]:{b.inbound_port}"}
                                                        if plain_domain else {})}
    table = ", ".join(f'"{d}" = "{hop}"' for d, hop in {**b_routes, **extra_routes}.items())
    plain = f'plain_domains = ["{plain_domain}"]\n' if plain_domain else ""
    a = GatewayProcess(root / "a", pki_a.directory, domain=A, hostname=f"gw.{A}",
                       accounts={alice: "alice-password-1", **{p.email: CARD_HOLDER_PASSWORD for p in card_holders}},
                       ca=anchors, extra=inbound + smime(alice, pki_a, card_holders)
                       + f"[relay]\nroutes = {{ {table} }}\n{plain}",
                       log_level=log_level, spool_workers=spool_workers, inbound_port=a_inbound)
    seed(a, root / "trust.xml", [DirectoryMailbox(bob, pki_b.organisation.cert),
                                 # Any certificate of its own (one mailbox per certificate): nobody encrypts to it.
                                 *([DirectoryMailbox(plain_bob, pki_b.tls_server_cert)] if plain_bob else []),
                                 *(DirectoryMailbox(address, cert) for address, cert in mailboxes)])
    # B's directory knows alice (for MDNs) and the card holders with their RPPS numbers.
    seed(b, root / "trust.xml", [DirectoryMailbox(alice, pki_a.organisation.cert),
                                 *(DirectoryMailbox(p.email, p.auth_cert, p.rpps, p.surname, p.given_name)
                                   for p in card_holders)])
    return TwoGateways(root, pki_a, pki_b, a, b, alice, bob, plain_bob)


def seed(gw: GatewayProcess, trust_list: Path, mailboxes: Sequence[DirectoryMailbox]) -> None:
    engine = make_engine(DatabaseConfig(url=gw.database_url))
    try:
        seed_directory(engine, trust_list, mailboxes)
    finally:
        engine.dispose()
