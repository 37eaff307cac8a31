"""The CPS3 command set: exact APDUs against a script, behaviour against the virtual card's OS."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from cps.apdu import ApduChannel
from cps.cps3 import IAS_AID, Cps3Card, encode_pin, recognise
from cps.errors import (
    FileNotFound,
    InvalidPinFormat,
    NotACpsCard,
    PinBlocked,
    PinIncorrect,
    SecurityStatusNotSatisfied,
    WrongIssuer,
)
from cps.sha256 import partial_hash
from cps.virtual_os import CPS3_ATR, CardFiles, VirtualCpsOs
from cps.worker import CardStatus

SELECT_APP = "00A4040C0D" + IAS_AID.hex()
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def card_on(transport: Any) -> Cps3Card:
    return Cps3Card(ApduChannel(transport))


# -- recognition and PIN format --------------------------------------------------------------

def test_atr_mask_accepts_variable_bytes() -> None:
    variant = bytearray(CPS3_ATR)
    variant[1] ^= 0xFF  # masked out (00 in the mask)
    variant[12] ^= 0x01
    assert recognise(bytes(variant)) == "CPS3 contact"


@pytest.mark.parametrize("atr", [
    bytes.fromhex("3BAC00402A001225006480000310009001"),  # last byte is under the mask
    bytes.fromhex("3B8F80010031B86404B0ECC173940180829000" + "0E"),  # contactless: no signature
    CPS3_ATR[:-1],
])
def test_other_atrs_are_refused(atr: bytes) -> None:
    with pytest.raises(NotACpsCard):
        recognise(atr)


def test_pin_is_ascii_padded_with_ff() -> None:
    assert encode_pin("1234") == b"1234\xff\xff\xff\xff"
    assert encode_pin("12345678") == b"12345678"


@pytest.mark.parametrize("pin", ["123", "123456789", "12a4", "１２３４", ""])
def test_bad_pin_format_sends_nothing(pin: str, scripted: Any) -> None:
    transport = scripted([])
    with pytest.raises(InvalidPinFormat):
        card_on(transport).verify_pin(pin)
    assert transport.sent == []


# -- exact APDUs of the signature (mssante.md §3.3) --------------------------------------------

def test_signature_sequence_carries_host_state_and_last_block(scripted: Any) -> None:
    data = bytes(range(200))  # three complete blocks hashed on the host, 8 bytes left for the card
    part = partial_hash(data)
    assert part.bit_count == 3 * 512
    pso_hash = "90" + "28" + part.state.hex() + part.counter.hex() + "80" + "08" + data[192:].hex()
    signature = "5A" * 256
    transport = scripted([
        (SELECT_APP, "9000"),
        ("0022 41AA 03 800140", "9000"),
        ("0022 41B6 06 840181 800142", "9000"),
        (f"002A 90A0 {len(bytes.fromhex(pso_hash)):02X} {pso_hash}", "9000"),
        ("002A 9E9A 00", signature[:0xE7 * 2] + "6119"),
        ("00C0 0000 19", signature[0xE7 * 2:] + "9000"),
    ])
    assert card_on(transport).sign_sha256(data, key_size=256) == bytes.fromhex(signature)
    assert transport.done()


def test_short_input_sends_empty_state(scripted: Any) -> None:
    transport = scripted([
        (SELECT_APP, "9000"),
        ("002241AA03800140", "9000"),
        ("002241B606840181800142", "9000"),
        ("002A90A007" + "9000" + "8003" + b"abc".hex(), "9000"),
        ("002A9E9A80", "11" * 128 + "9000"),  # Le = key length
    ])
    assert card_on(transport).sign_sha256(b"abc", key_size=128) == b"\x11" * 128


def test_pin_counter_read_with_get_data(scripted: Any) -> None:
    transport = scripted([
        ("00A4000C023F00", "9000"),
        ("00CB3FFF0A4D087006BF810102A08000", "700CBF810108A0069A01039B01029000"),
    ])
    assert card_on(transport).pin_tries_left() == 2


# -- behaviour, against the virtual card's OS ------------------------------------------------

def test_identify_and_read_certificates(os_transport: Any, card_files: CardFiles) -> None:
    card = card_on(os_transport)
    identity = card.identify(CPS3_ATR)
    assert identity.kind == "CPS3 contact"
    assert identity.serial.startswith("00008025000001")
    auth, sign = card.read_certificates()
    assert sign == x509.load_der_x509_certificate(card_files.sign_cert_der)
    assert auth == x509.load_der_x509_certificate(card_files.auth_cert_der)


def test_foreign_issuer_is_refused(card_files: CardFiles) -> None:
    foreign = dataclasses.replace(card_files, serial=bytes.fromhex("0000") + bytes.fromhex("8099000001") + b"\0" * 5)
    card = card_on(_Direct(VirtualCpsOs(foreign)))
    with pytest.raises(WrongIssuer) as info:
        card.identify(CPS3_ATR)
    assert info.value.issuer == bytes.fromhex("8099000001")


def test_wrong_pin_decrements_then_blocks_then_unblocks(os_transport: Any) -> None:
    card = card_on(os_transport)
    assert card.pin_tries_left() == 3
    for left in (2, 1, 0):
        with pytest.raises(PinIncorrect) as info:
            card.verify_pin("9999")
        assert info.value.tries_left == left
        assert card.pin_tries_left() == left
    with pytest.raises(PinBlocked):
        card.verify_pin("1234")  # even the right PIN: the card is blocked
    with pytest.raises(PinIncorrect):
        card.unblock_pin("00000000", "4321")
    card.unblock_pin("12345678", "4321")
    assert card.pin_tries_left() == 3
    card.verify_pin("4321")


def test_pin_verified_uses_no_try(os_transport: Any) -> None:
    card = card_on(os_transport)
    assert not card.pin_verified()
    assert card.pin_tries_left() == 3
    card.verify_pin("1234")
    assert card.pin_verified()


def test_right_pin_resets_the_counter(os_transport: Any) -> None:
    card = card_on(os_transport)
    with pytest.raises(PinIncorrect):
        card.verify_pin("0000")
    card.verify_pin("1234")
    assert card.pin_tries_left() == 3


def test_key_use_needs_the_pin(os_transport: Any) -> None:
    card = card_on(os_transport)
    with pytest.raises(SecurityStatusNotSatisfied):
        card.sign_sha256(b"x", key_size=256)
    with pytest.raises(SecurityStatusNotSatisfied):
        card.decipher(b"\x00" * 256)


@pytest.mark.parametrize("length", [0, 63, 64, 164, 700])
def test_card_signature_verifies_with_the_certificate(os_transport: Any, card_files: CardFiles, length: int) -> None:
    card = card_on(os_transport)
    card.verify_pin("1234")
    data = bytes(i % 7 for i in range(length))
    signature = card.sign_sha256(data, key_size=256)
    public = x509.load_der_x509_certificate(card_files.sign_cert_der).public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(InvalidSignature):
        public.verify(signature, data + b"!", padding.PKCS1v15(), hashes.SHA256())


def test_internal_authenticate_uses_the_auth_key(os_transport: Any, card_files: CardFiles) -> None:
    card = card_on(os_transport)
    card.verify_pin("1234")
    digest = hashlib.sha256(b"tls handshake").digest()
    signature = card.internal_authenticate(SHA256_DIGEST_INFO + digest, key_size=256)
    public = card_files.auth_key.public_key()
    public.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    with pytest.raises(ValueError, match="40 %"):
        card.internal_authenticate(b"\x00" * 103, key_size=256)


def test_decipher_with_command_chaining(os_transport: Any, card_files: CardFiles) -> None:
    card = card_on(os_transport)
    card.verify_pin("1234")
    key = bytes(range(32))
    cryptogram = card_files.auth_key.public_key().encrypt(key, padding.PKCS1v15())
    before = card.channel.round_trips
    assert card.decipher(cryptogram) == key
    assert card.channel.round_trips - before == 4  # SELECT, MSE SET CT, two chained PSO DECIPHER


def test_missing_file(os_transport: Any) -> None:
    card = card_on(os_transport)
    card.select_application()
    with pytest.raises(FileNotFound):
        card.read_binary(b"\xee\xee")


def test_power_off_forgets_the_pin(card_os: VirtualCpsOs, os_transport: Any) -> None:
    card = card_on(os_transport)
    card.verify_pin("1234")
    card_os.power_off()
    with pytest.raises(SecurityStatusNotSatisfied):
        card.sign_sha256(b"x", key_size=256)
    assert card.pin_tries_left() == 3


class _Direct:
    def __init__(self, card: VirtualCpsOs) -> None:
        self.card = card

    def transmit(self, apdu: bytes) -> bytes:
        return self.card.process(apdu)


def test_status_names_the_holder_and_rpps(card_files: CardFiles) -> None:
    status = CardStatus(reader="r", present=True,
                        sign_certificate=x509.load_der_x509_certificate(card_files.sign_cert_der))
    assert status.rpps == "10001234567"
    assert status.holder == "Jeanne EXEMPLE"
    assert CardStatus(reader="r", present=False).rpps is None
