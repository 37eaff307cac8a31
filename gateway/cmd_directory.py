"""`mssgw directory import|sync-fhir|whitelist|lookup|stats|add-cert|generate|migrate`: the RPPS / MSSanté directory.

Imports print a progress bar on a terminal (a line per phase otherwise) and a summary at the
end. A refused or failed sync exits 2 with one line saying why; the previous directory stays.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from config.loader import load
from directory_sync.certificates import add_certificate
from directory_sync.database import engine_from_config, migrate
from directory_sync.errors import DirectoryError
from directory_sync.extracts import ZipLimits
from directory_sync.fhir import (
    PRODUCTION_BASE_URL,
    FhirClient,
    FhirSettings,
    last_successful_sync,
    sync_fhir,
)
from directory_sync.lookup import DirectoryLookup
from directory_sync.stats import directory_stats
from directory_sync.sync import DEFAULT_MAX_DELETE_SHARE, import_paths
from directory_sync.synthetic import (
    mssante_lines,
    personne_activite_lines,
    write_extract,
)
from directory_sync.whitelist import import_whitelist
from gateway.cli import add_command
from gateway.errors import GatewayError


def register(sub: Any) -> None:
    p = add_command(sub, "directory", _usage, "the RPPS / MSSanté directory: import, sync, look up")
    d = p.add_subparsers(dest="directory_command", required=True, metavar="ACTION")
    add_command(d, "migrate", _migrate, "create or upgrade the directory tables")
    q = add_command(d, "import", _import, "import extract files (txt or zip; kind detected from the header)")
    q.add_argument("files", nargs="+", type=Path, metavar="FILE")
    _brake_options(q)
    q.add_argument("--quiet", action="store_true", help="no progress output")
    q.add_argument("--full-compare", action="store_true",
                   help="compare every key in SQL instead of only the lines that changed since the last import")
    q = add_command(d, "sync-fhir", _sync_fhir, "apply the Annuaire Santé FHIR API's mailboxes")
    q.add_argument("--since", help="ISO date-time of the increment (_lastUpdated=ge...), or 'last' for the start "
                                   "of the last complete FHIR sync; default: every mailbox")
    q.add_argument("--base-url", default=os.environ.get("ESANTE_FHIR_URL", PRODUCTION_BASE_URL))
    q.add_argument("--api-key-file", type=Path, help="file holding the ESANTE-API-KEY (default: $ESANTE_API_KEY)")
    q.add_argument("--rate", type=int, default=17, help="requests per second at most (default 17)")
    q = add_command(d, "whitelist", _whitelist, "import the trust-space list (listeblanchemssante.xml)")
    q.add_argument("file", type=Path)
    _brake_options(q)
    add_command(d, "lookup", _lookup, "show what the directory knows of an address").add_argument("address")
    add_command(d, "stats", _stats, "counts and the last sync runs")
    q = add_command(d, "add-cert", _add_cert, "store a recipient certificate (PEM or DER)")
    q.add_argument("certificate", type=Path)
    owner = q.add_mutually_exclusive_group(required=True)
    owner.add_argument("--address")
    owner.add_argument("--id-nat-ps")
    q.add_argument("--usage", default="encryption", choices=("encryption", "signature", "any"))
    q = add_command(d, "generate", _generate, "write a synthetic extract (fake values, exact headers)")
    q.add_argument("kind", choices=("personne-activite", "mssante"))
    q.add_argument("rows", type=int)
    q.add_argument("output", type=Path)
    q.add_argument("--seed", type=int, default=1)
    q.add_argument("--changed", type=float, default=0.0, help="share of entries changed (e.g. 0.01)")
    q.add_argument("--removed", type=float, default=0.0, help="share of entries dropped")
    q.add_argument("--zip", action="store_true")


def _brake_options(q: argparse.ArgumentParser) -> None:
    q.add_argument("--force", action="store_true", help="apply even a deletion above the brake")
    q.add_argument("--max-delete", type=float, default=DEFAULT_MAX_DELETE_SHARE,
                   help=f"largest share of a table one run may delete (default {DEFAULT_MAX_DELETE_SHARE})")


def _usage(args: argparse.Namespace) -> int:
    return 2


def _engine(args: argparse.Namespace) -> Engine:
    engine = engine_from_config(load(args.config).database)
    migrate(engine)
    return engine


def _migrate(args: argparse.Namespace) -> int:
    _engine(args)
    print("directory tables are up to date")
    return 0


class _Bar:
    """A progress bar on stderr when it is a terminal; one line per finished phase otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.phase = ""

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self.quiet:
            return
        self.phase = phase
        share = done / total if total else 1.0
        took = time.monotonic() - self.t0
        if self.tty:
            filled = int(share * 30)
            sys.stderr.write(f"\r  {phase:8} [{'#' * filled}{'.' * (30 - filled)}] {share:4.0%} "
                             f"{done / 1e6:8.1f}/{total / 1e6:.1f} MB {took:6.1f} s")
            if done >= total:
                sys.stderr.write("\n")
        elif done >= total:
            sys.stderr.write(f"  {phase}: {total / 1e6:.1f} MB in {took:.1f} s\n")
        if done >= total:
            self.t0 = time.monotonic()
        sys.stderr.flush()


def _guard(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except DirectoryError as exc:
        raise GatewayError(str(exc)) from exc


def _import(args: argparse.Namespace) -> int:
    def run() -> int:
        engine = _engine(args)
        limits = load(args.config).limits
        bar = _Bar(args.quiet)
        for path in args.files:
            if not path.exists():
                raise GatewayError(f"{path}: no such file")
        reports = import_paths(engine, args.files, max_delete_share=args.max_delete, force=args.force,
                               full_compare=args.full_compare, progress=bar,
                               zip_limits=ZipLimits(limits.max_zip_member_size, limits.max_zip_ratio))
        for r in reports:
            print(r.summary())
            for m in r.malformed[:20]:
                print(f"  line {m.line}: {m.reason}")
            if r.malformed_count > 20:
                print(f"  ... and {r.malformed_count - 20} more malformed lines")
        return 0
    return _guard(run)


def _sync_fhir(args: argparse.Namespace) -> int:
    def run() -> int:
        if args.api_key_file is not None:
            key = args.api_key_file.read_text(encoding="utf-8").strip()
        else:
            key = os.environ.get("ESANTE_API_KEY", "")
        if not key:
            raise GatewayError("no API key: pass --api-key-file or set ESANTE_API_KEY")
        since = None
        engine = _engine(args)
        if args.since == "last":
            since = last_successful_sync(engine)
        elif args.since:
            try:
                since = dt.datetime.fromisoformat(args.since)
            except ValueError:
                raise GatewayError(f"--since {args.since!r} is not an ISO date-time") from None
            if since.tzinfo is None:
                since = since.replace(tzinfo=dt.UTC)
        settings = FhirSettings(base_url=args.base_url, api_key=key, rate_per_second=args.rate)

        async def go() -> str:
            async with FhirClient(settings) as client:
                return (await sync_fhir(engine, client, since=since)).summary()

        print(asyncio.run(go()))
        return 0
    return _guard(run)


def _whitelist(args: argparse.Namespace) -> int:
    def run() -> int:
        report = import_whitelist(_engine(args), args.file, max_delete_share=args.max_delete, force=args.force)
        print(report.summary())
        for index, reason in report.malformed[:20]:
            print(f"  Domaine #{index}: {reason}")
        return 0
    return _guard(run)


def _lookup(args: argparse.Namespace) -> int:
    def run() -> int:
        lookup = DirectoryLookup(_engine(args), threads=1)
        try:
            r = lookup.lookup_blocking(args.address)
        finally:
            lookup.close()
        if r is None:
            print(f"{args.address}: not in the directory")
            return 1
        rows = [("address", r.address), ("type", r.mailbox_type), ("idNat_PS", r.id_nat_ps), ("RPPS", r.rpps),
                ("name", " ".join(x for x in (r.civility, r.first_name, r.last_name) if x) or None),
                ("profession", r.profession), ("structure", r.structure_name), ("structure id", r.structure_id),
                ("service", r.service), ("liste rouge", "yes" if r.liste_rouge else "no")]
        for label, value in rows:
            if value:
                print(f"{label:13} {value}")
        for c in r.certificates:
            print(f"{'certificate':13} {c.fingerprint_sha256}  {c.subject}  until {c.not_after:%Y-%m-%d}")
        if not r.certificates:
            print(f"{'certificate':13} none usable for encryption")
        return 0
    return _guard(run)


def _stats(args: argparse.Namespace) -> int:
    def run() -> int:
        s = directory_stats(_engine(args))
        for name, n in s.counts.items():
            print(f"{name:14} {n:>10}")
        if s.mailboxes_by_type:
            print("mailboxes by type: " + ", ".join(f"{k} {v}" for k, v in sorted(s.mailboxes_by_type.items())))
        for run_ in s.last_runs:
            print(f"run {run_.id:>4} {run_.finished_at} {run_.kind:34} {run_.status:9} +{run_.inserted} "
                  f"~{run_.updated} -{run_.deleted} ({run_.rows_malformed} malformed)")
        return 0
    return _guard(run)


def _add_cert(args: argparse.Namespace) -> int:
    def run() -> int:
        data = args.certificate.read_bytes()
        if b"-----BEGIN CERTIFICATE-----" in data:
            from cryptography import x509
            from cryptography.hazmat.primitives.serialization import Encoding

            data = x509.load_pem_x509_certificate(data).public_bytes(Encoding.DER)
        fp = add_certificate(_engine(args), data, address=args.address, id_nat_ps=args.id_nat_ps, usage=args.usage)
        print(f"certificate {fp} stored")
        return 0
    return _guard(run)


def _generate(args: argparse.Namespace) -> int:
    lines: Iterator[str]
    if args.kind == "personne-activite":
        lines = personne_activite_lines(args.rows, seed=args.seed, changed_share=args.changed,
                                        removed_share=args.removed)
        member = "PS_LibreAcces_Personne_activite_202608260800.txt"
    else:
        lines = mssante_lines(args.rows, seed=args.seed, changed_share=args.changed, removed_share=args.removed)
        member = "Extraction_Correspondance_MSSante_202608260800.txt"
    write_extract(args.output, lines, zipped=args.zip, member=member)
    print(f"{args.output}: {args.rows} rows")
    return 0
