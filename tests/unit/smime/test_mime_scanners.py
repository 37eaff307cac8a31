"""The byte scanners that replace per-message regexes and Python loops in smime.mime give the same answers."""

from __future__ import annotations

import base64
import re

from hypothesis import given
from hypothesis import strategies as st

from smime.mime import (
    _needs_reencoding,
    base64_lines,
    base64_pieces,
    signed_delimiters,
    split_multipart_signed,
)

PIECES = [b"--b", b"--", b"b", b" ", b"\t", b"\r", b"\n", b"\r\n", b"x", b"-"]


def _regex_delimiters(body: bytes, boundary: bytes) -> list[tuple[int, int, bool]]:
    """What split_multipart_signed used to compute: the delimiter lines by a regex of RFC 2046 §5.1.1."""
    delim = re.compile(rb"(?m)^--" + re.escape(boundary) + rb"(--)?[ \t]*(?:\r?\n|\Z)")
    return [(m.start(), m.end(), m.group(1) is not None) for m in delim.finditer(body)]


@given(st.lists(st.sampled_from(PIECES), max_size=20))
def test_signed_delimiters_find_what_the_regex_found(pieces: list[bytes]) -> None:
    body = b"".join(pieces)
    assert list(signed_delimiters(body, b"--b")) == _regex_delimiters(body, b"b")


def test_signed_delimiters_on_the_edges() -> None:
    cases = {
        b"--b\r\nx\r\n--b--": [(0, 5, False), (8, 13, True)],
        b"--b \t\nx\n--b-- \r\n": [(0, 6, False), (8, 16, True)],
        b"x--b\r\n--bb\r\n--b\r\r\n--b----\r\n": [],  # not at a line start, longer name, bare CR, four dashes
    }
    for body, expected in cases.items():
        assert list(signed_delimiters(body, b"--b")) == expected == _regex_delimiters(body, b"b")


def test_split_multipart_signed_with_bare_lf_and_padding() -> None:
    entity = (b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary="q"\n\n'
              b"preamble\n--q \nContent-Type: text/plain\n\nhello\n--q\t\n"
              b"Content-Type: application/pkcs7-signature\nContent-Transfer-Encoding: base64\n\nAAEC\n--q--")
    parts = split_multipart_signed(entity)
    assert parts.content == b"Content-Type: text/plain\n\nhello"
    assert parts.signature == b"\x00\x01\x02"


@given(st.binary(max_size=400))
def test_base64_lines_are_encodebytes_with_crlf(data: bytes) -> None:
    assert base64_lines(data) == base64.encodebytes(data).replace(b"\n", b"\r\n")
    assert all(len(line) <= 76 for line in base64_lines(data).split(b"\r\n"))


def test_base64_of_nothing_is_no_piece() -> None:
    assert base64_pieces(b"") == []


def _needed_reencoding(entity: bytes) -> bool:
    """What canonicalize used to test, substring by substring (the reference for the one-split version)."""
    if not entity.isascii() or b"\0" in entity:
        return True
    if any(s in entity for s in (b" \r\n", b"\t\r\n", b" \n", b"\t\n")):
        return True
    if entity.startswith(b"From ") or b"\nFrom " in entity:
        return True
    if re.search(rb"(?im)^content-transfer-encoding:[ \t]*(8bit|binary)", entity):
        return True
    *ended, last = entity.split(b"\n")
    return max(map(len, ended), default=0) > 999 or len(last) > 1000


ENTITY_PIECES = [b" ", b"\t", b"\r", b"\n", b"\r\n", b"x", b"From ", b"content-transfer-encoding: 8bit", b"\xe9",
                 b"y" * 500]


@given(st.lists(st.sampled_from(ENTITY_PIECES), max_size=16))
def test_needs_reencoding_as_the_substring_tests_said(pieces: list[bytes]) -> None:
    entity = b"".join(pieces)
    assert _needs_reencoding(entity) == _needed_reencoding(entity)
