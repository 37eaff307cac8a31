"""The operating system of the virtual CPS3 card: files, PIN, security environment, RSA keys.

It answers the same APDUs as the host side in `cps3.py` expects from a real CPS3 card, with the
same status words, so that tests and the demo go through the real PC/SC stack. Only tests, the
demo and the benchmark use it; production code never imports it.

Behaviour kept from the real card: 3 PIN tries then blocked (RESET RETRY COUNTER with the
unblocking code resets it); the PIN state is lost on power-off or reset; private-key operations
need the PIN; responses longer than 0xE7 bytes come in parts (61xx, GET RESPONSE); PSO DECIPHER
takes command chaining; the card finishes SHA-256 from the host's intermediate state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from cps.cps3 import (
    ANS_ISSUER,
    CERT_AUTH_FID,
    CERT_SIGN_FID,
    IAS_AID,
    KEY_AUTH,
    KEY_SIGN,
    MAX_RESPONSE,
)
from cps.sha256 import INITIAL_STATE, finish

log = logging.getLogger(__name__)

CPS3_ATR = bytes.fromhex("3BAC00402A001225006480000310009000")
MAX_TRIES = 3

SW_OK = b"\x90\x00"


class _Reply(Exception):
    """An error status word, raised inside a command handler."""

    def __init__(self, sw: int) -> None:
        super().__init__(f"{sw:04X}")
        self.sw = sw


@dataclass(slots=True)
class CardFiles:
    """The files the virtual card holds, and its keys."""

    sign_key: rsa.RSAPrivateKey
    auth_key: rsa.RSAPrivateKey
    sign_cert_der: bytes
    auth_cert_der: bytes
    serial: bytes = bytes.fromhex("0000") + ANS_ISSUER + bytes.fromhex("0012345678")


@dataclass(slots=True)
class _Security:
    ht_algo: int | None = None
    dst: tuple[int, int] | None = None
    at_key: int | None = None
    ct_key: int | None = None
    digest: bytes | None = None


@dataclass(slots=True)
class VirtualCpsOs:
    """A CPS3 card's behaviour, one APDU at a time. `latency` (seconds) is added to VERIFY and key use."""

    files: CardFiles
    pin: str = "1234"
    puk: str = "12345678"
    latency: float = 0.0
    pin_tries: int = MAX_TRIES
    puk_tries: int = MAX_TRIES
    _verified: bool = False
    _in_app: bool = False
    _ef: bytes | None = None
    _se: _Security = field(default_factory=_Security)
    _pending: bytes = b""
    _chain: bytes = b""

    @property
    def atr(self) -> bytes:
        return CPS3_ATR

    def power_off(self) -> None:
        """Power-off or reset: the security state is lost, the PIN counters are kept."""
        self._verified = False
        self._in_app = False
        self._ef = None
        self._se = _Security()
        self._pending = b""
        self._chain = b""

    def process(self, apdu: bytes) -> bytes:
        """One C-APDU in, one R-APDU out."""
        try:
            if len(apdu) < 4:
                raise _Reply(0x6700)
            cla, ins, p1, p2 = apdu[:4]
            data, le = _parse(apdu)
            if ins != 0xC0:
                self._pending = b""
            if cla & 0x10 and ins != 0x2A:
                raise _Reply(0x6884)
            return self._dispatch(cla, ins, p1, p2, data, le)
        except _Reply as reply:
            return reply.sw.to_bytes(2, "big")

    def _dispatch(self, cla: int, ins: int, p1: int, p2: int, data: bytes, le: int) -> bytes:
        handlers = {
            0xA4: self._select, 0xB0: self._read_binary, 0xCB: self._get_data, 0x20: self._verify,
            0x2C: self._reset_retry_counter, 0x22: self._mse, 0x2A: self._pso, 0x88: self._internal_authenticate,
            0xC0: self._get_response,
        }
        handler = handlers.get(ins)
        if handler is None:
            raise _Reply(0x6D00)
        return handler(cla, p1, p2, data, le)

    def _respond(self, body: bytes, le: int) -> bytes:
        """Send at most min(Le, 0xE7) bytes now; announce the rest with 61xx."""
        cap = min(le or 256, MAX_RESPONSE)
        if len(body) <= cap:
            return body + SW_OK
        self._pending = body[cap:]
        return body[:cap] + bytes((0x61, min(len(self._pending), 256) & 0xFF))

    def _get_response(self, cla: int, p1: int, p2: int, data: bytes, le: int) -> bytes:
        if not self._pending:
            raise _Reply(0x6985)
        body, self._pending = self._pending, b""
        return self._respond(body, le)

    def _select(self, cla: int, p1: int, p2: int, data: bytes, le: int) -> bytes:
        if p1 == 0x04:
            if data != IAS_AID:
                raise _Reply(0x6A82)
            self._in_app, self._ef = True, None
        elif p1 in (0x00, 0x01, 0x02) and data == b"\x3f\x00":
            self._in_app, self._ef = False, None
        elif p1 in (0x00, 0x01) and data == b"\x00\x01" and not self._in_app:
            self._in_app, self._ef = True, None
        elif p1 in (0x00, 0x02):
            self._ef = self._file(self._in_app, data)
        elif p1 in (0x08, 0x09):
            path = data[2:] if data[:2] == b"\x3f\x00" else data
            in_app = False
            for i in range(0, len(path) - 2, 2):
                if path[i:i + 2] != b"\x00\x01" or in_app:
                    raise _Reply(0x6A82)
                in_app = True
            self._in_app, self._ef = in_app, self._file(in_app, path[-2:]) if path else None
        else:
            raise _Reply(0x6A86)
        return SW_OK

    def _file(self, in_app: bool, fid: bytes) -> bytes:
        if in_app:
            files = {CERT_AUTH_FID: self.files.auth_cert_der, CERT_SIGN_FID: self.files.sign_cert_der}
        else:
            files = {b"\xd0\x03": self.files.serial,
                     b"\xd0\x10": bytes.fromhex("EC12810720250101000000820720300101000000")}
        if fid not in files:
            raise _Reply(0x6A82)
        return files[fid]

    def _read_binary(self, cla: int, p1: int, p2: int, data: bytes, le: int) -> bytes:
        if self._ef is None:
            raise _Reply(0x6986)
        offset = (p1 << 8) | p2
        if offset > len(self._ef):
            raise _Reply(0x6B00)
        return self._respond(self._ef[offset:offset + (le or 256)], le)

    def _get_data(self, cla: int, p1: int, p2: int, data: bytes, le: int) -> bytes:
        if (p1, p2) != (0x3F, 0xFF) or bytes.fromhex("BF8101") not in data:
            raise _Reply(0x6A88)
        docp = bytes((0x9A, 0x01, MAX_TRIES, 0x9B, 0x01, self.pin_tries))
        sdo = bytes.fromhex("BF8101") + bytes((len(docp) + 2, 0xA0, len(docp))) + docp
        return self._respond(bytes((0x70, len(sdo))) + sdo, le)

    def _verify(self, cla: int, p1: int, p2: int, data: bytes, le: int) -> bytes:
        if (p1, p2) != (0x00, 0x01):
            raise _Reply(0x6A88)
        if self.pin_tries == 0:
            raise _Reply(0x6983)
        if not data:
            if self._verified:
                return SW_OK
            raise _Reply(0x63C0 | self.pin_tries)
        self._wait()
        if data == _pad(self.pin):
            self.pin_tries = MAX_TRIES
            self._verified = True
            return SW_OK
        self._verified = False
        self.pin_tries -= 1
        raise _Reply(0x63C0 | self.pin_tries)

    def _reset_retry_counter(self, cla: int, p1: int, p2: int, data: bytes, le: int) -> bytes:
        if (p1, p2) != (0x00, 0x01) or len(data) != 16:
            raise _Reply(0x6A86)
        if self.puk_tries == 0:
            raise _Reply(0x6983)
        if data[:8] != _pad(self.puk):
            self.puk_tries -= 1
            raise _Reply(0x63C0 | self.puk_tries)
        new_pin = data[8:].rstrip(b"\xff")
        if not 4 <= len(new_pin) <= 8 or not new_pin.isdigit():
            raise _Reply(0x6A80)
        self.puk_tries = MAX_TRIES
        self.pin = new_pin.decode("ascii")
        self.pin_tries = MAX_TRIES
        return SW_OK

    def _mse(self, cla: int, p1: int, p2: int, data: bytes, le: int) -> bytes:
        if p1 != 0x41:
            raise _Reply(0x6A86)
        tags = _simple_tlv(data)
        self._se.digest = None
        if p2 == 0xAA:
            self._se.ht_algo = tags.get(0x80, b"\x00")[0]
        elif p2 == 0xB6:
            self._se.dst = (tags.get(0x84, b"\x00")[0], tags.get(0x80, b"\x00")[0])
        elif p2 == 0xA4:
            self._se.at_key = tags.get(0x84, b"\x00")[0]
        elif p2 == 0xB8:
            self._se.ct_key = tags.get(0x84, b"\x00")[0]
        else:
            raise _Reply(0x6A86)
        return SW_OK

    def _pso(self, cla: int, p1: int, p2: int, data: bytes, le: int) -> bytes:
        if (p1, p2) == (0x80, 0x86):
            return self._decipher(cla, data, le)
        if cla & 0x10:
            raise _Reply(0x6884)
        if (p1, p2) == (0x90, 0xA0):
            return self._hash(data)
        if (p1, p2) == (0x9E, 0x9A):
            return self._compute_signature(le)
        raise _Reply(0x6A86)

    def _hash(self, data: bytes) -> bytes:
        if self._se.ht_algo != 0x40:
            raise _Reply(0x6985)
        tags = _simple_tlv(data)
        if 0x90 not in tags or 0x80 not in tags:
            raise _Reply(0x6A80)
        pre = tags[0x90]
        if pre and len(pre) != 40:
            raise _Reply(0x6A80)
        state = pre[:32] if pre else b"".join(x.to_bytes(4, "big") for x in INITIAL_STATE)
        bit_count = int.from_bytes(pre[32:], "big") if pre else 0
        try:
            self._se.digest = finish(state, bit_count, tags[0x80])
        except ValueError:
            raise _Reply(0x6A80) from None
        return SW_OK

    def _compute_signature(self, le: int) -> bytes:
        self._require_pin()
        if self._se.dst != (KEY_SIGN, 0x42) or self._se.digest is None:
            raise _Reply(0x6985)
        digest, self._se.digest = self._se.digest, None
        self._wait()
        signature = self.files.sign_key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        return self._respond(signature, le)

    def _internal_authenticate(self, cla: int, p1: int, p2: int, data: bytes, le: int) -> bytes:
        self._require_pin()
        if self._se.at_key != KEY_AUTH:
            raise _Reply(0x6985)
        key = self.files.auth_key
        k = key.key_size // 8
        if len(data) > k * 4 // 10:
            raise _Reply(0x6700)
        self._wait()
        block = b"\x00\x01" + b"\xff" * (k - len(data) - 3) + b"\x00" + data
        numbers = key.private_numbers()
        value = pow(int.from_bytes(block, "big"), numbers.d, numbers.public_numbers.n)
        return self._respond(value.to_bytes(k, "big"), le)

    def _decipher(self, cla: int, data: bytes, le: int) -> bytes:
        self._chain += data
        if cla & 0x10:
            return SW_OK
        message, self._chain = self._chain, b""
        self._require_pin()
        if self._se.ct_key != KEY_AUTH:
            raise _Reply(0x6985)
        if message[:1] != b"\x81":
            raise _Reply(0x6A80)
        self._wait()
        try:
            plain = self.files.auth_key.decrypt(message[1:], padding.PKCS1v15())
        except ValueError:
            raise _Reply(0x6A80) from None
        return self._respond(plain, le)

    def _require_pin(self) -> None:
        if not self._verified:
            raise _Reply(0x6982)

    def _wait(self) -> None:
        if self.latency > 0:
            time.sleep(self.latency)


def _pad(pin: str) -> bytes:
    return pin.encode("ascii").ljust(8, b"\xff")


def _parse(apdu: bytes) -> tuple[bytes, int]:
    """(data, Le) of a short APDU; Le 0 means "up to 256"."""
    body = apdu[4:]
    if not body:
        return b"", 0
    if len(body) == 1:
        return b"", body[0]
    lc = body[0]
    if len(body) == 1 + lc:
        return body[1:], 0
    if len(body) == 2 + lc:
        return body[1:1 + lc], body[-1]
    raise _Reply(0x6700)


def _simple_tlv(data: bytes) -> dict[int, bytes]:
    """One-byte tags, one-byte lengths, as in MSE and PSO HASH data."""
    out: dict[int, bytes] = {}
    i = 0
    while i + 2 <= len(data):
        tag, length = data[i], data[i + 1]
        out[tag] = data[i + 2:i + 2 + length]
        i += 2 + length
    if i != len(data):
        raise _Reply(0x6A80)
    return out
