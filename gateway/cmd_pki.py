"""`mssgw pki`: create and inspect the development PKI (IGC-Santé shaped, see gateway/devpki.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from gateway import devpki
from gateway.cli import add_command


def register(sub: Any) -> None:
    pki = add_command(sub, "pki", _usage, "development PKI shaped like IGC-Santé (test certificates only)")
    pki_sub = pki.add_subparsers(dest="pki_command", required=True, metavar="ACTION")

    init = add_command(pki_sub, "dev-init", cmd_dev_init,
                       "create the development PKI in DIR, or report the one already there (never overwrites)")
    init.add_argument("directory", metavar="DIR", type=Path)
    init.add_argument("--domain", default="dev.mssante.test", help="mail domain of the test mailboxes")
    init.add_argument("--hostname", default="gw.dev.mssante.test", help="DNS name in the gateway's TLS certificate")

    show = add_command(pki_sub, "show", cmd_show, "list every certificate of the development PKI in DIR")
    show.add_argument("directory", metavar="DIR", type=Path)


def _usage(args: argparse.Namespace) -> int:
    raise AssertionError("argparse requires an ACTION")  # unreachable: the sub-command is required


def cmd_dev_init(args: argparse.Namespace) -> int:
    directory: Path = args.directory
    existed = (directory / devpki.MANIFEST).exists()
    pki = devpki.create_dev_pki(directory, domain=args.domain, gateway_hostname=args.hostname)
    if existed:
        print(f"development PKI already in {pki.directory} (domain {pki.domain}); nothing changed")
    else:
        print(f"created development PKI in {pki.directory} (domain {pki.domain})")
    print(f"  trust anchors   {pki.ca_bundle}")
    print(f"  CRLs            {pki.crls_pem}")
    print(f"  gateway TLS     {pki.tls_server_cert} (key {pki.tls_server_key.name}) for {pki.gateway_hostname}")
    for p in pki.practitioners:
        print(f"  practitioner    {p.id_nat} {p.given_name} {p.surname} <{p.email}>  {p.sign_cert.parent}")
    print(f"  organisation    {pki.organisation.email}  {pki.organisation.cert.parent}")
    print(f"  revoked signer  {pki.revoked.id_nat} <{pki.revoked.email}>  {pki.revoked.sign_cert.parent}")
    return 0


_SHORT_NAMES = {NameOID.SURNAME: "SN", NameOID.GIVEN_NAME: "GN", NameOID.TITLE: "title"}


def describe(role: str, cert: x509.Certificate) -> str:
    """One line: role, subject (RFC 4514), serial, not after, SHA-256 fingerprint (never the key, never the PEM)."""
    fingerprint = cert.fingerprint(hashes.SHA256()).hex(":").upper()
    not_after = cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{role:<32} {cert.subject.rfc4514_string(_SHORT_NAMES)}  serial={cert.serial_number:x}  notAfter={not_after}  " \
           f"sha256={fingerprint}"


def cmd_show(args: argparse.Namespace) -> int:
    pki = devpki.load_dev_pki(args.directory)
    for role, path in pki.certificates():
        print(describe(role, devpki.load_certificate(path)))
    return 0
