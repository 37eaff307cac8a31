"""`mssgw smime`: sign, encrypt, decrypt, verify and inspect .eml files, for sysadmins and scripts.

Exit codes a script can rely on: 0 done (verify: every check passed), 1 verify: a signature check failed,
2 usage error (bad option, unreadable file, wrong key password), 3 the message cannot be processed
(malformed, not encrypted to this key, decryption failed), 4 verify: no signature in the message.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
from pathlib import Path
from typing import Any

from cryptography import x509

from gateway.cli import add_command
from gateway.errors import GatewayError
from smime.certpath import TrustStore, ValidationPolicy
from smime.envelope import decrypt_content
from smime.errors import SmimeError
from smime.filekeys import FileKey, KeyLoadError
from smime.inspect import inspect_entity
from smime.keys import KeyTransportPadding
from smime.message import encrypt_message, open_message, sign_and_encrypt, smime_kind
from smime.mime import (
    decode_body,
    join_message,
    split_header_body,
    split_message,
    to_crlf,
)
from smime.signing import sign_message

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_UNPROCESSABLE, EXIT_UNSIGNED = 0, 1, 2, 3, 4


class SmimeCommandError(GatewayError):
    """A usage problem of `mssgw smime` (missing option, unreadable file): exit 2 with one clear line."""


def register(sub: Any) -> None:
    smime = add_command(sub, "smime", _usage, "sign, encrypt, decrypt, verify or inspect S/MIME messages (.eml)")
    actions = smime.add_subparsers(dest="smime_command", required=True, metavar="ACTION")

    sign = add_command(actions, "sign", cmd_sign, "sign a message (multipart/signed unless --opaque)")
    _input_output(sign)
    _key_options(sign, required=True)
    sign.add_argument("--hash", choices=["sha256", "sha384", "sha512"], default="sha256")
    sign.add_argument("--pss", action="store_true", help="RSA-PSS instead of PKCS#1 v1.5")
    sign.add_argument("--opaque", action="store_true", help="application/pkcs7-mime signed-data")

    enc = add_command(actions, "encrypt", cmd_encrypt, "encrypt a message to recipients (signed first with --key/--p12)")
    _input_output(enc)
    enc.add_argument("--to", dest="recipients", action="append", type=Path, required=True, metavar="CERT",
                     help="recipient certificate (PEM); repeat for each recipient")
    enc.add_argument("--cipher", choices=["aes256-cbc", "aes128-cbc", "aes256-gcm", "aes128-gcm"], default="aes256-cbc")
    enc.add_argument("--oaep", action="store_true", help="RSA-OAEP (SHA-256) key transport instead of PKCS#1 v1.5")
    _key_options(enc, required=False)

    dec = add_command(actions, "decrypt", cmd_decrypt, "remove the encryption layer with our key")
    _input_output(dec)
    _key_options(dec, required=True)

    ver = add_command(actions, "verify", cmd_verify, "verify every signature (decrypting first with --key/--p12)")
    ver.add_argument("input", type=Path, metavar="FILE")
    _trust_options(ver)
    _key_options(ver, required=False)
    ver.add_argument("--at", type=_parse_time, help="verify at this time (ISO 8601, e.g. 2026-01-31T12:00:00Z)")
    ver.add_argument("--no-sender-check", action="store_true", help="do not compare From with the certificate")
    ver.add_argument("-o", "--output", type=Path, help="write the message without its S/MIME layers here")

    ins = add_command(actions, "inspect", cmd_inspect, "print the CMS layers, algorithms, signers and recipients")
    ins.add_argument("input", type=Path, metavar="FILE")
    _key_options(ins, required=False)


def _usage(args: argparse.Namespace) -> int:
    raise AssertionError("argparse requires an ACTION")  # unreachable: the sub-command is required


def _input_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, metavar="FILE", help="the .eml message ('-' for standard input)")
    p.add_argument("-o", "--output", type=Path, help="where to write the result (default: standard output)")


def _key_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    g = p.add_argument_group("key" + ("" if required else " (optional)"))
    g.add_argument("--key", type=Path, help="private key (PEM)")
    g.add_argument("--cert", type=Path, help="certificate of the key (PEM)")
    g.add_argument("--chain", type=Path, help="intermediate certificates to send along (PEM)")
    g.add_argument("--p12", type=Path, help="PKCS#12 file holding key, certificate and chain")
    g.add_argument("--password-file", type=Path, help="file holding the key's password (never on the command line)")
    p.set_defaults(key_required=required)


def _trust_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust", type=Path, required=True, help="PEM bundle of trust anchors (and intermediates)")
    p.add_argument("--crls", type=Path, help="PEM or DER CRLs")
    p.add_argument("--revocation", choices=["require", "soft-fail", "off"], default="require")


def _parse_time(value: str) -> datetime.datetime:
    try:
        when = datetime.datetime.fromisoformat(value)  # Python 3.11 reads a trailing Z
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {value}") from None
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)


def _read(path: Path) -> bytes:
    try:
        return sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise SmimeCommandError(f"cannot read {path}: {exc.strerror}") from None


def _write(path: Path | None, data: bytes) -> None:
    if path is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        # What this writes is often a decrypted message: readable by whoever ran the command only (issue 7, item 7).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise SmimeCommandError(f"cannot write {path}: {exc.strerror}") from None


def _load_key(args: argparse.Namespace) -> FileKey | None:
    password = _read(args.password_file).rstrip(b"\r\n") if args.password_file else None
    try:
        if args.p12:
            return FileKey.from_pkcs12(_read(args.p12), password)
        if args.key and args.cert:
            return FileKey.from_pem(_read(args.key), _read(args.cert), password,
                                    _read(args.chain) if args.chain else b"")
    except KeyLoadError as exc:
        raise SmimeCommandError(str(exc)) from None
    if args.key or args.cert:
        raise SmimeCommandError("--key and --cert go together")
    if args.key_required:
        raise SmimeCommandError("a key is needed: --p12 FILE, or --key FILE with --cert FILE")
    return None


def _certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as exc:
        raise SmimeCommandError(f"{path}: not a PEM certificate ({exc})") from None


def _processing(handler: Any) -> Any:
    """Run a handler; an S/MIME error on the input is one line on stderr and exit 3."""
    def wrapped(args: argparse.Namespace) -> int:
        try:
            result: int = handler(args)
        except SmimeError as exc:
            print(f"mssgw smime: {exc}", file=sys.stderr)
            return EXIT_UNPROCESSABLE
        return result
    wrapped.__doc__ = handler.__doc__
    return wrapped


@_processing
def cmd_sign(args: argparse.Namespace) -> int:
    key = _load_key(args)
    assert key is not None
    signed = asyncio.run(sign_message(_read(args.input), key, hash_name=args.hash,
                                      padding="pss" if args.pss else "pkcs1v15", detached=not args.opaque,
                                      chain=key.chain))
    _write(args.output, signed)
    return EXIT_OK


@_processing
def cmd_encrypt(args: argparse.Namespace) -> int:
    message = _read(args.input)
    recipients = [_certificate(p) for p in args.recipients]
    key = _load_key(args)
    transport: KeyTransportPadding = "oaep" if args.oaep else "pkcs1v15"
    if key is not None:
        out = asyncio.run(sign_and_encrypt(message, key, recipients, chain=key.chain, cipher=args.cipher,
                                           key_transport=transport))
    else:
        out = encrypt_message(message, recipients, cipher=args.cipher, key_transport=transport)
    _write(args.output, out)
    return EXIT_OK


@_processing
def cmd_decrypt(args: argparse.Namespace) -> int:
    key = _load_key(args)
    assert key is not None
    outer, entity = split_message(_read(args.input))
    if smime_kind(entity) != "enveloped":
        raise SmimeCommandError(f"{args.input} is not encrypted")
    decrypted = asyncio.run(decrypt_content(decode_body(*split_header_body(entity)), key))
    print(f"decrypted: {decrypted.structure}, {decrypted.cipher}, key transport {decrypted.key_transport}",
          file=sys.stderr)
    _write(args.output, join_message(outer, to_crlf(decrypted.content)))
    return EXIT_OK


@_processing
def cmd_verify(args: argparse.Namespace) -> int:
    trust = TrustStore.from_pem(_read(args.trust), _read(args.crls) if args.crls else b"")
    policy = ValidationPolicy(revocation=args.revocation)
    kwargs: dict[str, Any] = {"identity_check": None} if args.no_sender_check else {}
    opened = asyncio.run(open_message(_read(args.input), decrypter=_load_key(args), trust=trust, at=args.at,
                                      policy=policy, **kwargs))
    for layer in opened.layers:
        print(f"layer: {layer.kind}, {layer.detail}")
        if layer.report is not None:
            print(layer.report.summary())
    if args.output:
        _write(args.output, opened.message)
    if not opened.reports:
        print("no signature found", file=sys.stderr)
        return EXIT_UNSIGNED
    valid = all(r.valid for r in opened.reports)
    print("verdict: " + ("valid" if valid else "INVALID"))
    return EXIT_OK if valid else EXIT_INVALID


@_processing
def cmd_inspect(args: argparse.Namespace) -> int:
    key = _load_key(args)
    _, entity = split_message(_read(args.input))
    for depth in range(8):
        layer = inspect_entity(entity)
        print("\n".join(("  " * depth) + line for line in layer.lines()))
        if layer.cms_type is None:
            break
        if layer.inner is not None:
            entity = layer.inner
        elif key is not None:
            entity = to_crlf(asyncio.run(decrypt_content(decode_body(*split_header_body(entity)), key)).content)
        else:
            print(("  " * (depth + 1)) + "(encrypted: give --key/--cert or --p12 to look inside)")
            break
    return EXIT_OK
