"""The host/card split of SHA-256 must give exactly SHA-256 (FIPS 180-4), whatever the length."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cps import sha256
from cps.sha256 import BLOCK, INITIAL_STATE, compress, finish, partial_hash


@pytest.mark.parametrize("length", [0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 164, 1000])
def test_partial_then_finish_is_sha256(length: int) -> None:
    data = bytes(i % 251 for i in range(length))
    part = partial_hash(data)
    assert part.bit_count == (length - length % BLOCK) * 8
    assert part.tail == data[len(data) - len(data) % BLOCK:]
    assert finish(part.state, part.bit_count, part.tail) == hashlib.sha256(data).digest()


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=400))
def test_any_input(data: bytes) -> None:
    part = partial_hash(data)
    assert len(part.tail) < BLOCK
    assert finish(part.state, part.bit_count, part.tail) == hashlib.sha256(data).digest()


def test_counter_is_eight_big_endian_bytes() -> None:
    part = partial_hash(b"a" * 130)
    assert part.counter == (128 * 8).to_bytes(8, "big")


def test_known_answer_for_one_block() -> None:
    # "abc" padded by hand (FIPS 180-4 §5.1.1), one compression from H(0): the standard's example digest.
    block = b"abc" + b"\x80" + b"\x00" * 52 + (24).to_bytes(8, "big")
    words = compress(INITIAL_STATE, block)
    assert b"".join(w.to_bytes(4, "big") for w in words).hex() == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


@pytest.mark.parametrize(("state", "bits", "tail"), [(b"\x00" * 31, 0, b""), (b"\x00" * 32, 8, b""),
                                                     (b"\x00" * 32, 0, b"x" * 64)])
def test_finish_rejects_inconsistent_state(state: bytes, bits: int, tail: bytes) -> None:
    with pytest.raises(ValueError, match="inconsistent"):
        finish(state, bits, tail)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=64, max_size=64), max_size=6), st.lists(st.integers(0, 2**32 - 1), min_size=8,
                                                                             max_size=8))
def test_libcrypto_compression_is_the_standard_one(blocks: list[bytes], state: list[int]) -> None:
    """The compression served by libcrypto (when there) gives what the FIPS 180-4 one written here gives, from
    any state: the card's H(i) and the virtual card's finish depend on it."""
    fast = sha256._libcrypto_blocks()
    if fast is None:
        pytest.skip("no libcrypto in this process")
    data = b"".join(blocks)
    assert fast(tuple(state), data) == sha256._python_blocks(tuple(state), data)


def test_without_libcrypto_the_python_compression_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sha256, "_libcrypto_blocks", lambda: None)
    sha256._blocks.cache_clear()
    try:
        assert sha256._blocks() is sha256._python_blocks
        part = partial_hash(b"x" * 150)
        assert finish(part.state, part.bit_count, part.tail) == hashlib.sha256(b"x" * 150).digest()
    finally:
        sha256._blocks.cache_clear()
