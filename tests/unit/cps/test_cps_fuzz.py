"""Random bytes on either side of the APDU line: the card answers with a status word, the host with a typed error."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cps.apdu import ApduChannel
from cps.cps3 import Cps3Card
from cps.errors import CardError
from cps.virtual_os import CardFiles, VirtualCpsOs

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(apdu=st.binary(max_size=300))
def test_virtual_card_answers_any_bytes_with_a_status_word(card_files: CardFiles, apdu: bytes) -> None:
    card = VirtualCpsOs(card_files)
    reply = card.process(apdu)
    assert len(reply) >= 2
    assert reply[-2] in (0x61, 0x62, 0x63, 0x65, 0x67, 0x68, 0x69, 0x6A, 0x6B, 0x6C, 0x6D, 0x6E, 0x6F, 0x90)


@SETTINGS
@given(apdus=st.lists(st.tuples(st.sampled_from([0x00, 0x10]),
                                st.sampled_from([0xA4, 0xB0, 0xCB, 0x20, 0x2C, 0x22, 0x2A, 0x88, 0xC0]),
                                st.integers(0, 255), st.integers(0, 255), st.binary(max_size=60)), max_size=8))
def test_virtual_card_survives_command_sequences(card_files: CardFiles, apdus: list[Any]) -> None:
    card = VirtualCpsOs(card_files)
    for cla, ins, p1, p2, data in apdus:
        apdu = bytes((cla, ins, p1, p2)) + (bytes((len(data),)) + data if data else b"")
        assert len(card.process(apdu)) >= 2
    assert 0 <= card.pin_tries <= 3


class _Garbage:
    def __init__(self, replies: list[bytes]) -> None:
        self.replies = replies

    def transmit(self, apdu: bytes) -> bytes:
        return self.replies.pop(0) if self.replies else b"\x6f\x00"


@SETTINGS
@given(replies=st.lists(st.one_of(st.binary(max_size=40), st.just(b"\x90\x00"),
                                  st.binary(max_size=30).map(lambda b: b + b"\x90\x00"),
                                  st.integers(0, 255).map(lambda n: bytes((0x61, n)))), max_size=12),
       operation=st.sampled_from(["identify", "certs", "tries", "sign", "decipher"]))
def test_host_turns_any_card_answer_into_data_or_a_typed_error(replies: list[bytes], operation: str) -> None:
    card = Cps3Card(ApduChannel(_Garbage(list(replies))))
    try:
        if operation == "identify":
            card.identify(bytes.fromhex("3BAC00402A001225006480000310009000"))
        elif operation == "certs":
            card.read_certificates()
        elif operation == "tries":
            card.pin_tries_left()
        elif operation == "sign":
            card.sign_sha256(b"x" * 100, key_size=256)
        else:
            card.decipher(b"\x01" * 256)
    except CardError:
        pass
