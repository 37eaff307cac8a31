"""The byte scanners that replace per-message regexes and Python loops in smime.mime give the same answers."""

from __future__ import annotations

import base64
import re

from hypothesis import given
from hypothesis import strategies as st

from smime.mime import (
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
