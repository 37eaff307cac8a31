"""The CPS3 (IAS-ECC "CPx") command set, over an `ApduChannel`. Blocking; run it on the card's thread.

Sources: ANS reference notes (reference/mssante.md §3), ISO/IEC 7816-4 and 7816-8, OpenSC's
IAS-ECC driver (card-iasecc.c, iasecc-sdo.c) for what the public texts leave open. Choices made:

- PIN format: ASCII digits padded with 0xFF to 8 bytes, as OpenSC's IAS-ECC family drivers do
  (pad_char 0xFF, pad_length = max length 8); VERIFY is `00 20 00 01` (PIN reference 01, the
  CHV SDO BF 81 01 under the MF; P2 = the bare reference, as OpenSC sends it).
- PIN tries counter: GET DATA `00 CB 3F FF` on the CHV SDO with the header list
  `4D 08 70 06 BF 81 01 02 A0 80`; the answer is the SDO's DOCP template `A0`, in which tag 9B
  is the remaining tries and 9A the maximum (OpenSC's IASECC_DOCP_TAG_TRIES_*).
- Certificates: a real card lists them in its PKCS#15 EF.CDF, which OpenSC parses. This host
  reads the two certificate EFs directly by FID inside the IAS application (`CERT_AUTH_FID`,
  `CERT_SIGN_FID`, **[unverified]** on a physical card: change the constants if a card
  disagrees). The EF holds the DER certificate; READ BINARY goes in 0xE7-byte steps (the
  Cryptolib's cap) and stops at the DER length.
- PSO HASH with the host's intermediate state: `90 28 <H(i) ‖ 8-byte bit count> 80 <n> <tail>`,
  or `90 00 80 <n> <tail>` when nothing was hashed yet, as OpenSC's iasecc_compute_signature_dst.
- PSO DECIPHER: padding indicator 0x81 then the cryptogram, command chaining, and the card
  returns the unpadded key (PKCS#1 v1.5 removed on the card).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509

from cps.apdu import ApduChannel, Command
from cps.errors import (
    InvalidPinFormat,
    MalformedResponse,
    NotACpsCard,
    PinBlocked,
    PinIncorrect,
    SecurityStatusNotSatisfied,
    WrongIssuer,
)
from cps.sha256 import partial_hash

log = logging.getLogger(__name__)

IAS_AID = bytes.fromhex("E828BD080F8025000001FF0010")
ANS_ISSUER = bytes.fromhex("8025000001")
EF_SN_ICC = bytes.fromhex("D003")
CERT_AUTH_FID = bytes.fromhex("C001")
CERT_SIGN_FID = bytes.fromhex("C002")
PIN_REFERENCE = 0x01
KEY_SIGN = 0x81
KEY_AUTH = 0x82
PIN_LENGTH = 8
MAX_RESPONSE = 0xE7
MAX_EF_BYTES = 16 * 1024  # a CPS certificate EF holds under 2 KB; a card announcing more is broken
MAX_TLV_DEPTH = 8  # the PIN SDO nests 3 deep (4D > 70 > BF8101 > A0 > 9B)
ALGO_SHA256 = 0x40
ALGO_PKCS1_SHA256 = 0x42

# (ATR, mask, name): ATR & mask == pattern & mask (reference/mssante.md §3.1). Only the CPS3 contact
# interface is listed: contactless allows no signature, and CPS4 (NXP ChipDoc) works on logical
# channel 1 without INTERNAL AUTHENTICATE, which this host does not implement yet.
KNOWN_ATRS: tuple[tuple[bytes, bytes, str], ...] = (
    (bytes.fromhex("3BAC00402A001225006480000310009000"),
     bytes.fromhex("FF00000000FFFFFFFFFFFF000000FFFFFF"), "CPS3 contact"),
)


def recognise(atr: bytes) -> str:
    """Name the card type of `atr`, or raise NotACpsCard."""
    for pattern, mask, name in KNOWN_ATRS:
        if len(atr) == len(pattern) and all(a & m == p & m for a, m, p in zip(atr, mask, pattern, strict=True)):
            return name
    raise NotACpsCard(atr)


def encode_pin(pin: str) -> bytes:
    """4 to 8 ASCII digits, padded with 0xFF to 8 bytes. Checked here so a typo costs no try."""
    if not (4 <= len(pin) <= PIN_LENGTH and pin.isascii() and pin.isdigit()):
        raise InvalidPinFormat("a CPS PIN is 4 to 8 digits")
    return pin.encode("ascii").ljust(PIN_LENGTH, b"\xff")


def _tlv_find(data: bytes, wanted: int, depth: int = 0) -> bytes | None:
    """Depth-first search of a BER-TLV value by tag (one- to three-byte tags, short/long lengths).

    A card's answer is at most 64 KB, so nesting is bounded here and not by Python's recursion limit.
    """
    if depth > MAX_TLV_DEPTH:
        raise MalformedResponse(f"BER-TLV nested more than {MAX_TLV_DEPTH} deep")
    i = 0
    while i < len(data):
        tag = data[i]
        i += 1
        if tag & 0x1F == 0x1F:
            while i < len(data) and data[i] & 0x80:
                tag = (tag << 8) | data[i]
                i += 1
            tag = (tag << 8) | data[i]
            i += 1
        length = data[i]
        i += 1
        if length & 0x80:
            n = length & 0x7F
            length = int.from_bytes(data[i:i + n], "big")
            i += n
        value = data[i:i + length]
        i += length
        if tag == wanted:
            return value
        first = tag
        while first > 0xFF:
            first >>= 8
        if first & 0x20:
            found = _tlv_find(value, wanted, depth + 1)
            if found is not None:
                return found
    return None


@dataclass(frozen=True, slots=True)
class CardIdentity:
    """What the card says about itself before any PIN."""

    kind: str
    atr: bytes
    serial: str


class Cps3Card:
    """One CPS card behind an `ApduChannel`. Stateless apart from what the card itself remembers."""

    def __init__(self, channel: ApduChannel) -> None:
        self.channel = channel

    def select_mf(self) -> None:
        self.channel.send(Command(0x00, 0xA4, 0x00, 0x0C, bytes.fromhex("3F00")))

    def select_application(self) -> None:
        """SELECT by AID, no FCI (`00 A4 04 0C`): the IAS application in contact mode."""
        self.channel.send(Command(0x00, 0xA4, 0x04, 0x0C, IAS_AID))

    def read_binary(self, fid: bytes, *, size: int | None = None) -> bytes:
        """SELECT the EF by FID in the current DF, then READ BINARY in 0xE7-byte steps.

        With `size` None the EF is a DER object and reading stops at its encoded length.
        """
        self.channel.send(Command(0x00, 0xA4, 0x02, 0x0C, fid))
        out = b""
        while size is None or len(out) < size:
            want = MAX_RESPONSE if size is None else min(MAX_RESPONSE, size - len(out))
            chunk = self.channel.send(Command(0x00, 0xB0, len(out) >> 8, len(out) & 0xFF, le=want))
            out += chunk
            if size is None and len(out) >= 4:
                size = _der_length(out)
                if size > MAX_EF_BYTES:
                    raise MalformedResponse(f"EF announces {size} bytes, more than {MAX_EF_BYTES}")
            if not chunk:
                break
        return out if size is None else out[:size]

    def check_issuer(self) -> str:
        """Read EF.SN.ICC (3F00/D003, 12 bytes) and require the ANS issuer 80 25 00 00 01 in bytes 2-6."""
        self.select_mf()
        sn = self.read_binary(EF_SN_ICC, size=12)
        if len(sn) < 7:
            raise MalformedResponse(f"EF.SN.ICC of {len(sn)} bytes")
        if sn[2:7] != ANS_ISSUER:
            raise WrongIssuer(sn[2:7])
        return sn.hex().upper()

    def identify(self, atr: bytes) -> CardIdentity:
        kind = recognise(atr)
        serial = self.check_issuer()
        self.select_application()
        return CardIdentity(kind=kind, atr=atr, serial=serial)

    def read_certificates(self) -> tuple[x509.Certificate, x509.Certificate]:
        """(authentication certificate, signature certificate), readable without the PIN."""
        self.select_application()
        return _certificate(self.read_binary(CERT_AUTH_FID)), _certificate(self.read_binary(CERT_SIGN_FID))

    def pin_tries_left(self) -> int:
        """GET DATA on the PIN SDO BF 81 01 (from the MF); tag 9B holds the remaining tries."""
        self.select_mf()
        answer = self.channel.send(Command(0x00, 0xCB, 0x3F, 0xFF, bytes.fromhex("4D087006BF810102A080"),
                                           le=256))
        try:
            tries = _tlv_find(answer, 0x9B)
        except IndexError:
            raise MalformedResponse("PIN SDO is not valid BER-TLV") from None
        if tries is None or len(tries) != 1:
            raise MalformedResponse("PIN SDO without a tries-remaining (9B) element")
        return tries[0]

    def verify_pin(self, pin: str) -> None:
        """VERIFY PIN 01. Raises PinIncorrect(tries_left) or PinBlocked; the caller never retries."""
        data = encode_pin(pin)
        self.select_mf()
        self.channel.send(Command(0x00, 0x20, 0x00, PIN_REFERENCE, data))

    def pin_verified(self) -> bool:
        """VERIFY without data (ISO/IEC 7816-4 §7.5.6): 9000 if the PIN is verified; uses no try."""
        self.select_mf()
        try:
            self.channel.send(Command(0x00, 0x20, 0x00, PIN_REFERENCE))
        except (PinIncorrect, SecurityStatusNotSatisfied, PinBlocked):
            return False
        return True

    def unblock_pin(self, puk: str, new_pin: str) -> None:
        """RESET RETRY COUNTER, P1=00: unblocking code then new PIN (ISO/IEC 7816-4 §7.5.10)."""
        data = encode_pin(puk) + encode_pin(new_pin)
        self.select_mf()
        self.channel.send(Command(0x00, 0x2C, 0x00, PIN_REFERENCE, data))

    def sign_sha256(self, data: bytes, *, key_size: int) -> bytes:
        """Non-repudiation signature with key 0x81: MSE SET HT, MSE SET DST, PSO HASH, PSO CDS.

        The host hashes the complete blocks; the card finishes SHA-256 and returns
        RSASSA-PKCS1-v1_5 (RFC 8017 §8.2) over the result.
        """
        return self.sign_sha256_many([data], key_size=key_size)[0]

    def sign_sha256_many(self, items: Sequence[bytes], *, key_size: int) -> list[bytes]:
        """`sign_sha256` of each item in turn after one SELECT of the application (for several signatures in
        one PC/SC transaction). Each keeps its whole sequence, MSE SET included (mssante.md §3.3)."""
        self.select_application()
        return [self._sign_selected(data, key_size) for data in items]

    def _sign_selected(self, data: bytes, key_size: int) -> bytes:
        part = partial_hash(data)
        self.channel.send(Command(0x00, 0x22, 0x41, 0xAA, bytes((0x80, 0x01, ALGO_SHA256))))
        self.channel.send(Command(0x00, 0x22, 0x41, 0xB6, bytes((0x84, 0x01, KEY_SIGN, 0x80, 0x01,
                                                                  ALGO_PKCS1_SHA256))))
        if part.bit_count:
            state = bytes((0x90, len(part.state) + 8)) + part.state + part.counter
        else:
            state = b"\x90\x00"
        self.channel.send(Command(0x00, 0x2A, 0x90, 0xA0, state + bytes((0x80, len(part.tail))) + part.tail))
        return self._expect(self.channel.send(Command(0x00, 0x2A, 0x9E, 0x9A, le=_le(key_size))), key_size)

    def internal_authenticate(self, digest_info: bytes, *, key_size: int) -> bytes:
        """Raw PKCS#1 v1.5 signature with key 0x82 (MSE SET AT, INTERNAL AUTHENTICATE).

        The input (a DigestInfo, or a TLS hash) must be at most 40 % of the modulus (IAS-ECC).
        """
        if len(digest_info) > key_size * 4 // 10:
            raise ValueError("INTERNAL AUTHENTICATE input exceeds 40 % of the modulus")
        self.select_application()
        self.channel.send(Command(0x00, 0x22, 0x41, 0xA4, bytes((0x84, 0x01, KEY_AUTH, 0x80, 0x01, 0x02))))
        return self._expect(self.channel.send(Command(0x00, 0x88, 0x00, 0x00, digest_info, le=_le(key_size))),
                            key_size)

    def decipher(self, cryptogram: bytes) -> bytes:
        """PSO DECIPHER with key 0x82: RSAES-PKCS1-v1_5 key transport (RFC 8017 §7.2)."""
        self.select_application()
        self.channel.send(Command(0x00, 0x22, 0x41, 0xB8, bytes((0x84, 0x01, KEY_AUTH, 0x80, 0x01, 0x1A))))
        return self.channel.send_chained(0x00, 0x2A, 0x80, 0x86, b"\x81" + cryptogram, le=256)

    @staticmethod
    def _expect(signature: bytes, key_size: int) -> bytes:
        if len(signature) != key_size:
            raise MalformedResponse(f"signature of {len(signature)} bytes for a {key_size * 8}-bit key")
        return signature


def _le(key_size: int) -> int:
    return min(key_size, 256)


def _certificate(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise MalformedResponse("certificate EF does not hold a DER X.509 certificate") from None


def _der_length(head: bytes) -> int:
    """Total length of the DER object starting at `head` (tag, then short or long length)."""
    if head[1] < 0x80:
        return 2 + head[1]
    n = head[1] & 0x7F
    if n == 0 or n > 3 or len(head) < 2 + n:
        raise MalformedResponse("certificate EF does not start with a DER length")
    return 2 + n + int.from_bytes(head[2:2 + n], "big")
