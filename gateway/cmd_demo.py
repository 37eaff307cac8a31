"""`mssgw demo setup|run|send`: the `make run` demo, two gateways of two operators on one machine.

The first gateway (config/dev.toml, dev.mssante.test) holds the practitioners' mailboxes, which sign with
their CPS card; its peer (config/dev-peer.toml, peer.mssante.test) is another operator's gateway with an
organisation mailbox and its key file. Mail between them is what the product exists for: signed and
encrypted by the first, relayed over mutually authenticated TLS, decrypted and verified by the peer.

- `setup` makes each gateway's development PKI and accounts (`mssgw dev-setup`), writes the trust anchors
  and CRLs of both PKIs and the trust-space list naming both domains with their operator DN, and seeds each
  one's directory with the other's mailboxes (gateway.devdirectory). Idempotent.
- `run` runs both gateways as child processes, their output prefixed with their domain, until Ctrl-C
  (SIGINT or SIGTERM), which stops both; a gateway that stops on its own stops the other.
- `send` submits a message the way a mail client does (SMTP submission, STARTTLS, AUTH with the development
  account), follows it through the queue to the peer's mailbox, and says how to read it there.

A card's PIN is never asked for nor sent here: the operator gives it once with `mssgw card unlock`, and a
message held for the locked card leaves then. Development and tests only.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import imaplib
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import IO, Any

from config.loader import load
from config.schema import GatewayConfig, SmimeConfig
from gateway.cli import add_command
from gateway.cmd_run import DEV_CREDENTIALS, dev_pki_dir, read_dev_credentials
from gateway.errors import GatewayError
from gateway.spool import Spool

DEFAULT_PEER_CONFIG = "config/dev-peer.toml"
DEMO_CARD_PIN = "1234"  # the virtual card's default PIN (cps/virtual_card.py); a test value, not a secret
READY_MARK = b"mssgw is running"
STOP_TIMEOUT = 60.0


def register(sub: Any) -> None:
    p = add_command(sub, "demo", _usage, "the `make run` demo: two gateways, a signed and encrypted message")
    d = p.add_subparsers(dest="demo_command", required=True, metavar="ACTION")
    setup = add_command(d, "setup", _setup, "make both gateways' PKIs, accounts, trust space and directories")
    run = add_command(d, "run", _run, "run this gateway and its peer until Ctrl-C")
    send = add_command(d, "send", _send, "submit a message to the peer's mailbox and follow it")
    for q in (setup, run, send):
        q.add_argument("--peer-config", default=DEFAULT_PEER_CONFIG,
                       help=f"the peer gateway's configuration (default: {DEFAULT_PEER_CONFIG})")
    send.add_argument("--from", dest="sender", help="the sending account (default: the first card holder's)")
    send.add_argument("--to", dest="recipient", help="the peer's mailbox (default: its first key file's account)")
    send.add_argument("--wait", type=float, default=30.0, help="seconds to follow the message (default 30)")


def _usage(args: argparse.Namespace) -> int:
    return 2


# --- setup ---------------------------------------------------------------------------------------------------------

def _smime(cfg: GatewayConfig) -> SmimeConfig:
    if cfg.smime is None:
        raise GatewayError(f"{cfg.source}: the demo needs an [smime] table (keys, cards, trust anchors)")
    return cfg.smime


def _trust_files(cfg: GatewayConfig) -> tuple[Path, Path, Path]:
    """tls.ca, smime.trust_anchors and smime.crls: the files `setup` writes for both PKIs."""
    smime = _smime(cfg)
    if cfg.tls.ca is None or smime.crls is None:
        raise GatewayError(f"{cfg.source}: the demo needs tls.ca and smime.crls")
    return cfg.tls.ca, smime.trust_anchors, smime.crls


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.exists() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _setup(args: argparse.Namespace) -> int:
    from gateway.cli import main as mssgw
    from gateway.db import create_tables, make_engine
    from gateway.devdirectory import DirectoryMailbox, operator_dn, seed_directory, whitelist_xml
    from gateway.devpki import DevPki, load_dev_pki

    gateways = [load(args.config), load(args.peer_config)]
    for cfg in gateways:  # the PKI and the accounts, as `make dev-setup` always made them
        if mssgw(["-c", str(cfg.source), "dev-setup", "--pki-dir", str(dev_pki_dir(cfg))]) != 0:
            return 1
    pkis = [load_dev_pki(dev_pki_dir(cfg)) for cfg in gateways]
    anchors = b"".join(p.ca_bundle.read_bytes() for p in pkis)
    crls = b"".join(p.crls_pem.read_bytes() for p in pkis)
    for cfg in gateways:
        tls_ca, trust_anchors, crl_file = _trust_files(cfg)
        for path, data in ((tls_ca, anchors), (trust_anchors, anchors), (crl_file, crls)):
            _write_if_changed(path, data)
    trust_list = _trust_files(gateways[0])[0].parent / "listeblanche.xml"
    _write_if_changed(trust_list, whitelist_xml({domain: operator_dn(cfg.tls.cert) for cfg in gateways
                                                 for domain in cfg.local_domains}).encode())

    def published(cfg: GatewayConfig, pki: DevPki) -> list[DirectoryMailbox]:
        """The mailboxes of `cfg` that have a key: what the other gateway's directory lists."""
        smime = _smime(cfg)
        boxes = [DirectoryMailbox(k.account, k.cert) for k in smime.keys]
        for card in smime.cards:
            try:
                p = pki.practitioner(card.rpps)
            except KeyError:
                raise GatewayError(f"{cfg.source}: no practitioner of RPPS {card.rpps} in the development PKI "
                                   f"{pki.directory}") from None
            boxes.append(DirectoryMailbox(card.account, p.auth_cert, p.rpps, p.surname, p.given_name))
        return boxes

    (first, peer), (first_pki, peer_pki) = gateways, pkis
    for cfg, other, other_pki in ((first, peer, peer_pki), (peer, first, first_pki)):
        engine = make_engine(cfg.database)
        try:
            create_tables(engine)
            boxes = published(other, other_pki)
            seed_directory(engine, trust_list, boxes)
        finally:
            engine.dispose()
        print(f"{cfg.hostname}: trust space {', '.join(d for g in gateways for d in g.local_domains)}; "
              f"directory lists {', '.join(b.address for b in boxes)}")
    print(f"Trust anchors of both gateways: {gateways[0].tls.ca}")
    return 0


# --- run -----------------------------------------------------------------------------------------------------------

DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "TERM", "--"]
"""util-linux's setpriv sets the parent-death signal (prctl PR_SET_PDEATHSIG) before it execs the gateway: a
gateway gets SIGTERM when the launcher dies, however it dies, so nothing is left running."""


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    ready: threading.Event

    def relay(self, out: IO[str]) -> None:
        """Copy the child's output, each line prefixed with its domain; note when it is ready."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if READY_MARK in line:
                self.ready.set()
            out.write(f"[{self.name}] {line.decode('utf-8', 'replace')}")
            out.flush()


def _run(args: argparse.Namespace) -> int:
    gateways = [load(args.config), load(args.peer_config)]
    children = [_Child(cfg.local_domains[0], subprocess.Popen(
        [*DIE_WITH_PARENT, sys.executable, "-m", "gateway.cli", "-c", str(cfg.source), "run"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True),
        threading.Event()) for cfg in gateways]
    # Each gateway in a session of its own: Ctrl-C reaches this launcher only, which stops both, once.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    relays = [threading.Thread(target=c.relay, args=(sys.stdout,), daemon=True) for c in children]
    for t in relays:
        t.start()
    announced = False
    while not stop.is_set() and all(c.process.poll() is None for c in children):
        if not announced and all(c.ready.is_set() for c in children):
            announced = True
            _print_next_steps(gateways)
        stop.wait(0.2)
    failed = [c.name for c in children if c.process.poll() is not None]
    for c in children:
        if c.process.poll() is None:
            c.process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_TIMEOUT
    for c in children:
        try:
            c.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"mssgw demo: {c.name} did not stop within {STOP_TIMEOUT:g} s; killing it", file=sys.stderr)
            c.process.kill()
            c.process.wait()
    for t in relays:
        t.join(5)
    if failed and not stop.is_set():
        print(f"mssgw demo: the gateway of {', '.join(failed)} stopped on its own (see its output above); "
              "the other was stopped too", file=sys.stderr)
        return 1
    print("mssgw demo: both gateways stopped", flush=True)
    return 0


def _unlock_command() -> str:
    """The operator's command that gives the demo card its PIN (slot 0 of the vpcd reader, cps/devstack.py)."""
    from cps.devstack import reader_name

    return (f'.venv/bin/mssgw card unlock --reader "{reader_name(0)}"'
            f"   # the virtual demo card's PIN is {DEMO_CARD_PIN}")


def _print_next_steps(gateways: list[GatewayConfig]) -> None:
    first, peer = gateways
    print(f"""
The demo is running: {first.local_domains[0]} (submission {first.submission.listen.port}, IMAP \
{first.mailboxes.imap.port}) and its peer {peer.local_domains[0]} (submission {peer.submission.listen.port}, \
IMAP {peer.mailboxes.imap.port}).
In another terminal:
  {_unlock_command()}
  .venv/bin/mssgw demo send
Ctrl-C here stops both gateways.
""", flush=True)


# --- send ----------------------------------------------------------------------------------------------------------

def _password(cfg: GatewayConfig, address: str) -> str:
    """The development account's password, from the file `mssgw dev-setup` keeps beside the PKI."""
    creds = dev_pki_dir(cfg).parent / DEV_CREDENTIALS
    password = read_dev_credentials(creds).get(address)
    if password is None:
        raise GatewayError(f"{address} is not a development account (see {creds}; run `make dev-setup`)")
    return password


def _letter(sender: str, recipient: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"] = sender, recipient
    msg["Subject"] = "Démo MSSanté : compte rendu signé et chiffré"
    msg["Date"] = formatdate()
    msg["Message-ID"] = make_msgid("demo", sender.rpartition("@")[2])
    msg.set_content("Bonjour,\n\n"
                    "Ce message de démonstration a été signé par l'expéditeur (sa carte CPS, ou le\n"
                    "certificat de son organisation), chiffré pour le destinataire, relayé entre deux\n"
                    "passerelles MSSanté, puis déchiffré et vérifié par la passerelle du destinataire.\n\n"
                    "Bien cordialement.\n")
    return msg


def _submit(cfg: GatewayConfig, sender: str, recipient: str, msg: EmailMessage) -> str:
    """SMTP submission as a mail client does it; returns the queue id of the `250` reply."""
    listen = cfg.submission.listen
    try:
        return _submission_session(cfg, sender, recipient, msg)
    except smtplib.SMTPException as exc:
        raise GatewayError(f"SMTP submission at {listen.host}:{listen.port}: {exc}") from None
    except OSError as exc:
        raise GatewayError(f"cannot reach the gateway at {listen.host}:{listen.port} ({exc}); "
                           "is `make run` running?") from None


def _submission_session(cfg: GatewayConfig, sender: str, recipient: str, msg: EmailMessage) -> str:
    from gateway.tls import client_context

    listen = cfg.submission.listen
    with smtplib.SMTP(listen.host, listen.port, timeout=60) as s:
        s.starttls(context=client_context(str(cfg.tls.ca)))
        s.login(sender, _password(cfg, sender))
        version = s.sock.version() if isinstance(s.sock, ssl.SSLSocket) else "?"
        print(f"Submitted over SMTP submission {listen.host}:{listen.port} (STARTTLS {version}, "
              f"AUTH as {sender}):")
        steps: list[Callable[[], tuple[int, bytes]]] = [
            lambda: s.mail(sender), lambda: s.rcpt(recipient),
            lambda: s.data(msg.as_bytes(policy=email.policy.SMTP))]
        for step in steps:  # one command at a time: a refusal is shown as the gateway worded it
            code, reply = step()
            print(f"  {code} {reply.decode('utf-8', 'replace')}")
            if code >= 400:
                raise GatewayError(f"the gateway refused the message: {code} {reply.decode('utf-8', 'replace')}")
    return reply.decode().rsplit(" ", 1)[-1]


def _fetch_by_message_id(peer: GatewayConfig, recipient: str, password: str, message_id: str) -> bytes | None:
    from gateway.tls import client_context

    with imaplib.IMAP4(peer.mailboxes.imap.host, peer.mailboxes.imap.port, timeout=30) as c:
        c.starttls(ssl_context=client_context(str(peer.tls.ca)))
        c.login(recipient, password)
        c.select("INBOX", readonly=True)
        _, data = c.search(None, "HEADER", "Message-ID", message_id)
        numbers = data[0].split() if data and data[0] else []
        if not numbers:
            return None
        _, fetched = c.fetch(numbers[-1], "(BODY.PEEK[])")
        part = fetched[0]
        return part[1] if isinstance(part, tuple) else None


def _send(args: argparse.Namespace) -> int:
    from gateway.db import make_engine

    cfg, peer = load(args.config), load(args.peer_config)
    smime, peer_smime = _smime(cfg), _smime(peer)
    sender = args.sender or (smime.cards[0].account if smime.cards else None)
    recipient = args.recipient or (peer_smime.keys[0].account if peer_smime.keys else None)
    if sender is None or recipient is None:
        raise GatewayError("name the sender (--from) and the recipient (--to)")
    msg = _letter(sender, recipient)
    queue_id = _submit(cfg, sender, recipient, msg)
    engine = make_engine(cfg.database)
    spool = Spool(cfg.spool.dir, engine)
    try:
        received = _follow(spool, queue_id, peer, recipient, str(msg["Message-ID"]), args.wait)
    finally:
        engine.dispose()
    if received is not None:
        shown = email.message_from_bytes(received, policy=email.policy.default)
        print(f"Delivered to {recipient} on {peer.hostname}, decrypted; the peer's security headers:")
        for name in ("MSSGW-Security", "Authentication-Results"):
            for value in shown.get_all(name, []):
                print(f"  {name}: {' '.join(str(value).split())}")
    _print_how_to_read(peer, recipient)
    return 0


def _follow(spool: Spool, queue_id: str, peer: GatewayConfig, recipient: str, message_id: str,
            wait: float) -> bytes | None:
    """Follow the message until it is in the recipient's mailbox (returned), held, failed or `wait` is over."""
    try:
        password: str | None = _password(peer, recipient)
    except GatewayError:
        password = None  # not a development account: the reader logs in themselves
    deadline = time.monotonic() + wait
    last_state = imap_error = ""
    while time.monotonic() < deadline:
        entry = next((e for e in spool.entries() if e.id == queue_id), None)
        state = entry.state if entry is not None else "done"
        if state != last_state:
            last_state = state
            print(f"  queue {queue_id}: {state}")
        if state == "hold":
            print(f"Held: {entry.last_error if entry is not None else ''}\n"
                  f"It leaves by itself once the card is unlocked:\n  {_unlock_command()}")
            return None
        if state in ("failed", "deferred") and entry is not None:
            print(f"Not delivered ({state}): {entry.last_error or ''}")
            for address, rcpt_state, reply in entry.recipients:
                print(f"  {address}: {rcpt_state} {reply or ''}")
            print("The gateway tries again later (is the peer running?)" if state == "deferred" else
                  "A failure notice (DSN) is in the sender's inbox.")
            print(f"`.venv/bin/mssgw queue show {queue_id}` tells more.")
            return None
        if state == "done" and password is not None:
            try:
                found = _fetch_by_message_id(peer, recipient, password, message_id)
            except (imaplib.IMAP4.error, OSError) as exc:
                imap_error = f" (the peer's IMAP: {exc})"
            else:
                if found is not None:
                    return found
        time.sleep(0.5)
    print(f"Not in {recipient}'s mailbox after {wait:g} s{imap_error}; `.venv/bin/mssgw queue list` and the "
          "gateways' output tell where it is.")
    return None


def _print_how_to_read(peer: GatewayConfig, recipient: str) -> None:
    imap = peer.mailboxes.imap
    creds = dev_pki_dir(peer).parent / DEV_CREDENTIALS
    print(f"""
Read it on the peer over IMAP (password of {recipient} in {creds}):
  openssl s_client -quiet -starttls imap -connect {imap.host}:{imap.port} -CAfile {peer.tls.ca}
  a LOGIN {recipient} PASSWORD
  b SELECT INBOX
  c FETCH * (BODY.PEEK[HEADER.FIELDS (FROM SUBJECT MSSGW-SECURITY AUTHENTICATION-RESULTS)] BODY.PEEK[TEXT])
  d LOGOUT
Or in Thunderbird: IMAP {imap.host} port {imap.port}, STARTTLS, normal password, user name {recipient}
(import the test CA {dev_pki_dir(peer) / 'ca-bundle.pem'} first, see README.md).""")
