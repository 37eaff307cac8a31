"""Errors of the directory: one base class, subclasses that carry what went wrong.

A gateway caller maps `DirectoryUnavailable` to a transient SMTP reply (`451`); the others are
operator-facing (CLI, sync-run records) and never reach an SMTP client.
"""

from __future__ import annotations

from pathlib import Path


class DirectoryError(Exception):
    """Base class of the directory's errors."""


class DirectoryUnavailable(DirectoryError):
    """The database cannot answer right now: callers retry later (SMTP `451 4.4.3`)."""

    def __init__(self, cause: str) -> None:
        self.cause = cause
        super().__init__(f"the directory is unavailable: {cause}")


class UnknownExtract(DirectoryError):
    """A file whose header matches none of the known RPPS / MSSanté extracts."""

    def __init__(self, path: Path | str, header: tuple[str, ...]) -> None:
        self.path = str(path)
        self.header = header
        shown = " | ".join(header[:4])
        super().__init__(f"{self.path}: not a known RPPS/MSSanté extract (header starts with: {shown})")


class MissingColumns(DirectoryError):
    """An extract whose header lacks columns the sync needs (mapping is by header name)."""

    def __init__(self, path: Path | str, kind: str, missing: tuple[str, ...]) -> None:
        self.path = str(path)
        self.kind = kind
        self.missing = missing
        super().__init__(f"{self.path}: {kind} extract without the columns: {', '.join(missing)}")


class RowRejected(DirectoryError):
    """One extract line a table cannot use; the sync counts it as malformed, with its line number."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class ArchiveRefused(DirectoryError):
    """A ZIP of extracts that is damaged, encrypted, or inflates past the configured limits (a zip bomb)."""

    def __init__(self, path: Path | str, member: str | None, reason: str) -> None:
        self.path = str(path)
        self.member = member
        self.reason = reason
        where = f"{self.path}!{member}" if member else self.path
        super().__init__(f"{where}: archive refused: {reason}")

    def __reduce__(self) -> tuple[type[ArchiveRefused], tuple[str, str | None, str]]:
        """Picklable, so that the extract worker process can hand it to the importing one."""
        return ArchiveRefused, (self.path, self.member, self.reason)


class InvalidCertificate(DirectoryError):
    """A certificate offered to the directory that cannot be stored (not DER X.509, no owner, ...)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"not a usable certificate: {reason}")


class DeletionBrake(DirectoryError):
    """A sync would delete more than the allowed share of a table: refused unless forced.

    This protects the directory against a truncated or empty download.
    """

    def __init__(self, table: str, would_delete: int, existing: int, max_share: float) -> None:
        self.table = table
        self.would_delete = would_delete
        self.existing = existing
        self.max_share = max_share
        super().__init__(
            f"refusing to delete {would_delete} of {existing} rows of {table} "
            f"(more than {max_share:.0%}); check the file, or force the sync"
        )


class WhitelistError(DirectoryError):
    """The trust-space list (listeblanchemssante.xml) cannot be parsed."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class FhirError(DirectoryError):
    """The Annuaire Santé FHIR API answered with an error after the retries."""

    def __init__(self, url: str, status: int | None, reason: str) -> None:
        self.url = url
        self.status = status
        self.reason = reason
        super().__init__(f"FHIR request {url} failed ({status if status is not None else 'no answer'}): {reason}")
