"""Resource limits on what the engine parses, and the scan that enforces the ASN.1 ones.

A received message is hostile until proven otherwise: a MIME tree thousands of levels deep, a million
empty parts, or a BER encoding nested past Python's recursion limit costs the parser far more than it
costs the sender. The limits are checked before any parser (email, asn1crypto) sees the input, by scans
that neither recurse nor copy, and each one hit is a `LimitExceeded` that names it.
"""

from __future__ import annotations

from dataclasses import dataclass

from config.schema import LimitsConfig
from smime.errors import LimitExceeded


@dataclass(frozen=True, slots=True)
class ParseLimits:
    """How much structure one message may carry; the defaults leave room for every honest one.

    `max_mime_depth`: nesting of multipart and message/rfc822 entities (the top entity is level 1;
    Postfix's `mime_nesting_limit` is 100, the email package recurses past ~250).
    `max_mime_parts`: entities in one MIME tree, the top one included.
    `max_asn1_depth`: nesting of constructed ASN.1 values in one CMS structure (a SignedData with its
    certificates is under 20 deep).
    `max_asn1_elements`: TLVs in one CMS structure (BER lets a sender cut an OCTET STRING into
    one-byte chunks, each a Python object once parsed).
    `max_cms_bytes`: size of one CMS structure, after base64 decoding.
    """

    max_mime_depth: int = 50
    max_mime_parts: int = 10_000
    max_asn1_depth: int = 64
    max_asn1_elements: int = 200_000
    max_cms_bytes: int = 64 * 1024 * 1024


DEFAULT_LIMITS = ParseLimits()
_MAX_TAG_BYTES = 5  # a tag number of more than 28 bits is not one any CMS type uses


def check_ber(data: bytes | memoryview, limits: ParseLimits) -> None:
    """Raise `LimitExceeded` when a BER/DER encoding (X.690 §8.1) is too big, too deep or has too many TLVs.

    An iterative walk over the headers only: primitive contents (the ciphertext, the signed content) are
    skipped, not read. A malformed header ends the walk of its enclosing definite-length value, whose
    bytes no parser can read further than that header either; the parser reports the damage itself.
    """
    size = len(data)
    if size > limits.max_cms_bytes:
        raise LimitExceeded("CMS structure size in bytes", size, limits.max_cms_bytes)
    buf = memoryview(data)
    ends: list[int | None] = []  # end offset of each open constructed value; None: indefinite length
    bounds: list[int] = []  # beside each: the end of the innermost definite value (or of the data) at that level
    limit = size  # bounds[-1], or size with nothing open
    pos = 0
    elements = 0
    max_elements, max_depth = limits.max_asn1_elements, limits.max_asn1_depth
    while True:
        while ends and ends[-1] is not None and pos >= ends[-1]:
            ends.pop()
            bounds.pop()
            limit = bounds[-1] if bounds else size
        if pos >= limit:
            if limit == size:
                return
            while True:  # an indefinite value left open inside a definite one: close both
                bounds.pop()
                if ends.pop() is not None:
                    break
            limit = bounds[-1] if bounds else size
            continue
        # The usual header (a one-byte tag, a definite length under 128) read here; `_header` reads the rest.
        first = buf[pos]
        length = buf[pos + 1] if pos + 1 < limit else 0x80
        if first & 0x1F != 0x1F and length < 0x80 and (first or length) and pos + 2 + length <= limit:
            constructed, start, end = bool(first & 0x20), pos + 2, pos + 2 + length
        else:
            header = _header(buf, pos, limit)
            if header is None:
                enclosing = ends[-1] if ends else None
                if enclosing is None:
                    return
                ends.pop()
                bounds.pop()
                limit = bounds[-1] if bounds else size
                pos = enclosing
                continue
            constructed, start, end = header
            if end == -2:  # end-of-contents octets (X.690 §8.1.5)
                if ends and ends[-1] is None:
                    ends.pop()
                    bounds.pop()
                    limit = bounds[-1] if bounds else size
                pos = start
                continue
        elements += 1
        if elements > max_elements:
            raise LimitExceeded("ASN.1 elements in a CMS structure", elements, max_elements)
        if constructed:
            ends.append(None if end == -1 else end)
            if end != -1:
                limit = end
            bounds.append(limit)
            if len(ends) > max_depth:
                raise LimitExceeded("ASN.1 nesting depth", len(ends), max_depth)
            pos = start
        elif end < 0:
            return  # a primitive value cannot have an indefinite length: the parser will say so
        else:
            pos = end


def _header(buf: memoryview, pos: int, limit: int) -> tuple[bool, int, int] | None:
    """(constructed, content start, content end) of the TLV at `pos`; end -1 for an indefinite length,
    -2 for end-of-contents octets; None when the header is malformed or runs past `limit`."""
    if pos + 2 > limit:
        return None
    first = buf[pos]
    i = pos + 1
    if first & 0x1F == 0x1F:
        for _ in range(_MAX_TAG_BYTES):
            if i >= limit:
                return None
            more = buf[i] & 0x80
            i += 1
            if not more:
                break
        else:
            return None
    if i >= limit:
        return None
    length = buf[i]
    i += 1
    if first == 0 and length == 0:
        return False, i, -2
    if length == 0x80:
        return bool(first & 0x20), i, -1
    if length & 0x80:
        count = length & 0x7F
        if count > 8 or i + count > limit:
            return None
        length = int.from_bytes(buf[i:i + count], "big")
        i += count
    if i + length > limit:
        return None
    return bool(first & 0x20), i, i + length


def limits_from_config(cfg: LimitsConfig) -> ParseLimits:
    """The parse limits of the `[limits]` table of the gateway's configuration."""
    return ParseLimits(max_mime_depth=cfg.max_mime_depth, max_mime_parts=cfg.max_mime_parts,
                       max_asn1_depth=cfg.max_asn1_depth, max_asn1_elements=cfg.max_asn1_elements,
                       max_cms_bytes=cfg.max_cms_size)
