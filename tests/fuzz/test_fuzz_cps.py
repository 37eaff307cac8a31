"""Fuzz targets of the host side of the card line (cps/): whatever a card answers, the host gets data or a
CardError. tests/unit/cps/test_cps_fuzz.py sends random replies; these build structured ones: nested
BER-TLV in the PIN SDO, DER lengths of certificate EFs, status words and response chaining."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from cps.apdu import ApduChannel, Command, Response, raise_for_status
from cps.cps3 import Cps3Card
from cps.errors import CardError
from tests.fuzz.support import fuzz_settings

OK = b"\x90\x00"


@fuzz_settings()
@given(raw=st.binary(max_size=300), ins=st.integers(0, 255))
def test_response_decoder(raw: bytes, ins: int) -> None:
    try:
        response = Response.decode(raw)
        raise_for_status(response.sw, ins)
    except CardError:
        return
    assert response.sw == 0x9000 and response.data == raw[:-2]


def _length(n: int, long_form: bool) -> bytes:
    if n < 0x80 and not long_form:
        return bytes((n,))
    body = n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")
    return bytes((0x80 | len(body),)) + body


@st.composite
def ber_tlv(draw: st.DrawFn, depth: int = 0) -> bytes:
    """A BER-TLV element as ISO/IEC 7816-4 §5.2 writes them: one- to three-byte tags, short or long lengths,
    constructed ones nested, now and then a length that lies or a chain of wrappers hundreds deep."""
    tag = draw(st.sampled_from([b"\x9b", b"\x4d", b"\x70", b"\xbf\x81\x01", b"\xa0", b"\x80", b"\x5f\x20",
                                b"\x7f\x49", b"\x1f", b"\x3f\xff\xff\x01", b"\x00"]))
    constructed = bool(tag[0] & 0x20)
    if constructed and depth < 4:
        value = b"".join(draw(st.lists(ber_tlv(depth + 1), max_size=3)))
    else:
        value = draw(st.binary(max_size=6))
    length = len(value) + draw(st.sampled_from([0, 0, 0, 1, -1, 1000]))
    element = tag + _length(max(length, 0), draw(st.booleans())) + value
    wrap = draw(st.sampled_from([0, 0, 0, 2, 50, 3000]))
    for _ in range(wrap):
        element = b"\x70" + _length(len(element), False) + element
    return element


def _nested(levels: int) -> bytes:
    element = b"\x9b\x01\x03"
    for _ in range(levels):
        element = b"\x70" + _length(len(element), False) + element
    return element


class _Card:
    """A scripted card: SELECT and MSE answer 9000, GET DATA the drawn answer, READ BINARY the drawn file."""

    def __init__(self, get_data: bytes, ef: bytes, sw_after: bytes, endless: bool = False) -> None:
        self.get_data = get_data
        self.ef = ef
        self.sw_after = sw_after
        self.endless = endless  # past its end, the file reads as zeros (a broken or hostile card)
        self.calls = 0

    def transmit(self, apdu: bytes) -> bytes:
        self.calls += 1
        assert self.calls < 10_000, "the host keeps asking: no bound on a read loop"
        ins = apdu[1]
        if ins == 0xCB:
            return self.get_data[:65_000] + OK
        if ins == 0xB0:
            offset = (apdu[2] << 8) | apdu[3]
            le = apdu[4] or 256
            chunk = self.ef[offset:offset + le] or (bytes(le) if self.endless else b"")
            return chunk + (OK if chunk or offset < len(self.ef) else self.sw_after)
        return OK


@fuzz_settings()
@given(answer=ber_tlv())
@example(answer=_nested(3000))  # nested past Python's recursion limit: RecursionError before the depth bound
def test_pin_tries_from_any_sdo(answer: bytes) -> None:
    card = Cps3Card(ApduChannel(_Card(answer, b"", OK)))
    try:
        tries = card.pin_tries_left()
    except CardError:
        return
    assert 0 <= tries <= 255


@fuzz_settings()
@given(head=st.sampled_from([b"\x30\x82", b"\x30\x83", b"\x30\x84", b"\x30\x80", b"\x30\x81", b"\x04\x00"]),
       size=st.integers(0, 2**24), body=st.binary(max_size=400), sw=st.sampled_from([OK, b"\x6b\x00", b"\x6a\x82"]), endless=st.booleans())
@example(head=b"\x30\x83", size=0xFFFFFF, body=b"", sw=OK, endless=True)  # 16 MB announced: 72,000 READ BINARY
def test_certificate_ef_of_any_length(head: bytes, size: int, body: bytes, sw: bytes, endless: bool) -> None:
    width = {0x81: 1, 0x82: 2, 0x83: 3, 0x84: 4}.get(head[1], 0)
    ef = head + (size % (1 << (8 * width))).to_bytes(width, "big") + body if width else head + body
    card = Cps3Card(ApduChannel(_Card(b"", ef, sw, endless)))
    try:
        card.read_certificates()
    except CardError:
        pass


@fuzz_settings()
@given(replies=st.lists(st.one_of(st.integers(0, 255).map(lambda n: bytes((0x61, n))),
                                  st.integers(0, 255).map(lambda n: bytes((0x6C, n))),
                                  st.binary(max_size=255).map(lambda b: b + OK),
                                  st.binary(max_size=255).map(lambda b: b + b"\x61\x00")), max_size=400))
def test_response_chaining(replies: list[bytes]) -> None:
    class Scripted:
        def transmit(self, apdu: bytes) -> bytes:
            return replies.pop(0) if replies else b"\x6f\x00"

    try:
        data = ApduChannel(Scripted()).send(Command(0x00, 0xCA, 0x00, 0x00, le=256))
    except CardError:
        return
    assert len(data) <= 65_536 + 256
