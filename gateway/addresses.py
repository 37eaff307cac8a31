"""Strict parsing of SMTP envelope addresses (RFC 5321 §4.1.2), closing the open-relay tricks.

Only `dot-atom@domain` is accepted: no source routes (`@a,@b:u@c`), no `%` or `!` routing
hacks, no quoted local parts, no address literals. A gateway for a closed trust space has no
use for them, and each has been used to slip mail past relay checks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ATEXT = r"[A-Za-z0-9#$&'*+/=?^_`{|}~-]"
_LOCAL = re.compile(rf"{_ATEXT}+(\.{_ATEXT}+)*")
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


@dataclass(frozen=True, slots=True)
class Mailbox:
    local: str
    domain: str
    """Lower-cased (domains are case-insensitive, RFC 5321 §2.4)."""

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


class AddressError(ValueError):
    """An envelope address this gateway does not accept; the message says why."""


def parse_mailbox(address: str) -> Mailbox:
    if len(address) > 254:
        raise AddressError("address too long")
    local, sep, domain = address.rpartition("@")
    if not sep or not local or not domain:
        raise AddressError("an address must be local-part@domain")
    if len(local) > 64:
        raise AddressError("local part too long")
    if not _LOCAL.fullmatch(local):  # fullmatch: `$` would let a final line feed through
        raise AddressError("source routes, quoted local parts and %/! routing are not accepted")
    if domain.startswith("["):
        raise AddressError("address literals are not accepted")
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels):
        raise AddressError("not a valid domain name")
    return Mailbox(local, domain.lower())
