"""SHA-256 with an exposed intermediate state (FIPS 180-4 §6.2), for PSO HASH on a CPS3 card.

The IAS-ECC signature rule is that the card computes the last hash step: the host hashes every
complete 64-byte block, then sends the intermediate state H(i) (eight big-endian 32-bit words),
the number of bits hashed so far (8 bytes, big-endian) and the remaining bytes (0 to 63); the
card pads and finishes. `hashlib` does not expose H(i), so the compression function is written
here from the standard. `finish()` is the card side (used by the virtual card and the tests).

The compression function runs in libcrypto when the process can reach it (`SHA256_Update` on a `SHA256_CTX`,
whose H(i) is read and written here through ctypes): the pure Python one costs about 0.13 ms a block, 0.4 ms for
the signed attributes of a message (RFC 5652 §5.4), taken while the card thread holds the interpreter lock that
the event loop needs. The libcrypto path is checked against the Python one when first used and set aside if they
ever differ; without libcrypto the Python one serves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

BLOCK = 64

_K = (
    0x428A2F98, 0x71374491, 0xB5C0FBCF, 0xE9B5DBA5, 0x3956C25B, 0x59F111F1, 0x923F82A4, 0xAB1C5ED5,
    0xD807AA98, 0x12835B01, 0x243185BE, 0x550C7DC3, 0x72BE5D74, 0x80DEB1FE, 0x9BDC06A7, 0xC19BF174,
    0xE49B69C1, 0xEFBE4786, 0x0FC19DC6, 0x240CA1CC, 0x2DE92C6F, 0x4A7484AA, 0x5CB0A9DC, 0x76F988DA,
    0x983E5152, 0xA831C66D, 0xB00327C8, 0xBF597FC7, 0xC6E00BF3, 0xD5A79147, 0x06CA6351, 0x14292967,
    0x27B70A85, 0x2E1B2138, 0x4D2C6DFC, 0x53380D13, 0x650A7354, 0x766A0ABB, 0x81C2C92E, 0x92722C85,
    0xA2BFE8A1, 0xA81A664B, 0xC24B8B70, 0xC76C51A3, 0xD192E819, 0xD6990624, 0xF40E3585, 0x106AA070,
    0x19A4C116, 0x1E376C08, 0x2748774C, 0x34B0BCB5, 0x391C0CB3, 0x4ED8AA4A, 0x5B9CCA4F, 0x682E6FF3,
    0x748F82EE, 0x78A5636F, 0x84C87814, 0x8CC70208, 0x90BEFFFA, 0xA4506CEB, 0xBEF9A3F7, 0xC67178F2,
)
INITIAL_STATE = (0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19)
_MASK = 0xFFFFFFFF


def compress(state: tuple[int, ...], block: bytes) -> tuple[int, ...]:
    """One application of the SHA-256 compression function to a 64-byte block (FIPS 180-4 §6.2.2)."""
    if len(block) != BLOCK:
        raise ValueError("a SHA-256 block is 64 bytes")
    m = _MASK
    w = list(struct.unpack(">16L", block))
    for t in range(16, 64):
        x, y = w[t - 15], w[t - 2]
        s0 = ((x >> 7) | (x << 25)) ^ ((x >> 18) | (x << 14)) ^ (x >> 3)
        s1 = ((y >> 17) | (y << 15)) ^ ((y >> 19) | (y << 13)) ^ (y >> 10)
        w.append((w[t - 16] + s0 + w[t - 7] + s1) & m)
    a, b, c, d, e, f, g, h = state
    for k, wt in zip(_K, w, strict=True):
        s1 = ((e >> 6) | (e << 26)) ^ ((e >> 11) | (e << 21)) ^ ((e >> 25) | (e << 7))
        t1 = (h + (s1 & m) + ((e & f) ^ (~e & g)) + k + wt) & m
        s0 = ((a >> 2) | (a << 30)) ^ ((a >> 13) | (a << 19)) ^ ((a >> 22) | (a << 10))
        t2 = ((s0 & m) + ((a & b) ^ (a & c) ^ (b & c))) & m
        h, g, f, e, d, c, b, a = g, f, e, (d + t1) & m, c, b, a, (t1 + t2) & m
    return tuple((x + y) & m for x, y in zip(state, (a, b, c, d, e, f, g, h), strict=True))


@dataclass(frozen=True, slots=True)
class PartialHash:
    """What PSO HASH carries: H(i) after the complete blocks, the bits hashed, the tail (< 64 bytes)."""

    state: bytes
    bit_count: int
    tail: bytes

    @property
    def counter(self) -> bytes:
        """The bit count as the 8 big-endian bytes PSO HASH expects."""
        return self.bit_count.to_bytes(8, "big")


Blocks = Callable[[tuple[int, ...], bytes], tuple[int, ...]]
"""State after compressing the whole blocks of some bytes (a multiple of 64) into a state."""


def _python_blocks(state: tuple[int, ...], blocks: bytes) -> tuple[int, ...]:
    for offset in range(0, len(blocks), BLOCK):
        state = compress(state, blocks[offset:offset + BLOCK])
    return state


class _Sha256Ctx(ctypes.Structure):
    """OpenSSL's SHA256_CTX (openssl/sha.h, unchanged since 0.9.8): H(i), the bit count, the pending block."""

    _fields_ = [("h", ctypes.c_uint32 * 8), ("Nl", ctypes.c_uint32), ("Nh", ctypes.c_uint32),
                ("data", ctypes.c_uint32 * 16), ("num", ctypes.c_uint), ("md_len", ctypes.c_uint)]


def _libcrypto_blocks() -> Blocks | None:
    """`SHA256_Update` of libcrypto on a context given our state; None when libcrypto cannot be loaded."""
    name = ctypes.util.find_library("crypto")
    try:
        update = ctypes.CDLL(name or "libcrypto.so.3").SHA256_Update
    except (OSError, AttributeError):
        return None
    update.argtypes = (ctypes.POINTER(_Sha256Ctx), ctypes.c_char_p, ctypes.c_size_t)
    update.restype = ctypes.c_int

    def blocks(state: tuple[int, ...], data: bytes) -> tuple[int, ...]:
        ctx = _Sha256Ctx()
        ctx.h[:] = state
        ctx.md_len = 32
        if not update(ctypes.byref(ctx), data, len(data)) or ctx.num:
            raise ValueError("libcrypto's SHA256_Update failed")
        return tuple(ctx.h)

    return blocks


@functools.cache
def _blocks() -> Blocks:
    """The libcrypto compression if it gives the standard's answers (FIPS 180-4 examples, two blocks), else Python's."""
    fast = _libcrypto_blocks()
    if fast is not None:
        sample = bytes(range(128))
        try:
            if fast(INITIAL_STATE, sample) == _python_blocks(INITIAL_STATE, sample):
                return fast
        except (ValueError, ctypes.ArgumentError):
            pass
        log.warning("libcrypto's SHA-256 does not match FIPS 180-4 here: the Python one is used")
    return _python_blocks


def partial_hash(data: bytes) -> PartialHash:
    """Hash every complete block of `data` on the host; keep the rest for the card."""
    full = len(data) - len(data) % BLOCK
    state = _blocks()(INITIAL_STATE, data[:full]) if full else INITIAL_STATE
    return PartialHash(state=struct.pack(">8L", *state), bit_count=full * 8, tail=data[full:])


def finish(state: bytes, bit_count: int, tail: bytes) -> bytes:
    """Finish a hash from H(i): pad the tail with the total length (FIPS 180-4 §5.1.1), compress, output."""
    if len(state) != 32 or bit_count % 512 or len(tail) >= BLOCK:
        raise ValueError("inconsistent intermediate SHA-256 state")
    total_bits = bit_count + 8 * len(tail)
    padded = tail + b"\x80" + b"\x00" * ((55 - len(tail)) % BLOCK) + total_bits.to_bytes(8, "big")
    return struct.pack(">8L", *_blocks()(struct.unpack(">8L", state), padded))
