"""A minimal DER writer (X.690 §8, §10) for the structures we emit on the hot path.

asn1crypto builds a tree of Python objects and copies the content several times while encoding; for a
1 MB message that dominates the cost. CMS output is a handful of nested TLVs around a few large byte
strings, so the writer below joins bytes once. Everything it writes is parsed back by asn1crypto,
OpenSSL and NSS in the tests.
"""

from __future__ import annotations

import datetime
import functools

SEQUENCE, SET, INTEGER, OCTET_STRING, NULL, OID, UTC_TIME, GENERALIZED_TIME = 0x30, 0x31, 0x02, 0x04, 0x05, 0x06, 0x17, \
    0x18


def length(n: int) -> bytes:
    """The definite length octets (X.690 §8.1.3): short form below 128, else long form."""
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def tlv(tag: int, *contents: bytes) -> bytes:
    body = b"".join(contents)
    return bytes((tag,)) + length(len(body)) + body


def sequence(*items: bytes) -> bytes:
    return tlv(SEQUENCE, *items)


def set_of(*items: bytes) -> bytes:
    """A SET OF in DER: elements sorted by their encodings (X.690 §11.6)."""
    return tlv(SET, *sorted(items))


def integer(value: int) -> bytes:
    if value < 0:
        raise ValueError("negative INTEGER not needed here")
    return tlv(INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def octet_string(value: bytes) -> bytes:
    return tlv(OCTET_STRING, value)


@functools.lru_cache(maxsize=64)
def oid(dotted: str) -> bytes:
    """An OBJECT IDENTIFIER (X.690 §8.19)."""
    arcs = [int(a) for a in dotted.split(".")]
    first = [40 * arcs[0] + arcs[1], *arcs[2:]]
    out = bytearray()
    for arc in first:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out.extend(reversed(chunk))
    return tlv(OID, bytes(out))




def implicit(number: int, encoded: bytes, *, constructed: bool) -> bytes:
    """[number] IMPLICIT: the same contents under a context tag instead of the universal one."""
    return bytes((0x80 | (0x20 if constructed else 0) | number,)) + encoded[1:]


def time(when: datetime.datetime) -> bytes:
    """UTCTime up to 2049, GeneralizedTime after (RFC 5652 §11.3), in UTC with seconds."""
    when = when.astimezone(datetime.UTC)
    if when.year < 2050:
        return tlv(UTC_TIME, when.strftime("%y%m%d%H%M%SZ").encode())
    return tlv(GENERALIZED_TIME, when.strftime("%Y%m%d%H%M%SZ").encode())


def wrap(tag: int, pieces: list[bytes]) -> list[bytes]:
    """A TLV as a list of pieces: the header, then the contents untouched (joined once, at the very end)."""
    return [bytes((tag,)) + length(sum(map(len, pieces))), *pieces]


# OIDs of RFC 5652 §4-§6, RFC 5083 §1 and RFC 8551 §2.5
DATA = "1.2.840.113549.1.7.1"
SIGNED_DATA = "1.2.840.113549.1.7.2"
ENVELOPED_DATA = "1.2.840.113549.1.7.3"
AUTH_ENVELOPED_DATA = "1.2.840.113549.1.9.16.1.23"
CONTENT_TYPE = "1.2.840.113549.1.9.3"
MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
SIGNING_TIME = "1.2.840.113549.1.9.5"
ENCRYPTION_KEY_PREFERENCE = "1.2.840.113549.1.9.16.2.11"


def attribute(type_oid: str, value: bytes) -> bytes:
    """An Attribute (RFC 5652 §5.3) with one value."""
    return sequence(oid(type_oid), set_of(value))


def read_header(buf: memoryview, pos: int, end: int) -> tuple[int, int, int] | None:
    """The tag, content start and content end of the definite-length TLV at `pos`; None for BER's
    indefinite length, a multi-byte tag or a length that runs past `end` (the caller falls back to asn1crypto)."""
    if pos + 2 > end:
        return None
    tag, first = buf[pos], buf[pos + 1]
    if tag & 0x1F == 0x1F:
        return None
    if first < 0x80:
        start, size = pos + 2, first
    else:
        count = first & 0x7F
        if count == 0 or count > 8 or pos + 2 + count > end:
            return None
        start, size = pos + 2 + count, int.from_bytes(buf[pos + 2:pos + 2 + count], "big")
    if start + size > end:
        return None
    return tag, start, start + size


def children(buf: memoryview, start: int, end: int) -> list[tuple[int, int, int, int]] | None:
    """The (tag, header start, content start, content end) of each TLV in [start, end), or None if not DER."""
    out = []
    pos = start
    while pos < end:
        tlv_ = read_header(buf, pos, end)
        if tlv_ is None:
            return None
        out.append((tlv_[0], pos, tlv_[1], tlv_[2]))
        pos = tlv_[2]
    return out
