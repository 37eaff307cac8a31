"""Damaged input of every shape ends in a SmimeError or a failed check, never in another exception."""

from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smime.envelope import decrypt_content, encrypt_content
from smime.errors import SmimeError
from smime.message import open_message, sign_and_encrypt
from smime.signing import build_signed_data, sign_message

SETTINGS = settings(max_examples=int(os.environ.get("SMIME_FUZZ_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CONTENT = b"Content-Type: text/plain\r\n\r\nBonjour.\r\n"


@st.composite
def damage(draw: st.DrawFn, data: bytes) -> bytes:
    """Flip, cut, insert or delete a few bytes of `data`."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[pos] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del out[pos:]
        elif kind == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif out:
            del out[pos:pos + draw(st.integers(1, 16))]
    return bytes(out)


@pytest.fixture(scope="module")
def samples(jeanne_sign, paul_auth) -> dict[str, bytes]:
    return {
        "opaque": asyncio.run(build_signed_data(CONTENT, jeanne_sign, detached=False, chain=jeanne_sign.chain)),
        "cbc": encrypt_content(CONTENT, [paul_auth.certificate]),
        "gcm-oaep": encrypt_content(CONTENT, [paul_auth.certificate], cipher="aes256-gcm", key_transport="oaep"),
    }


@SETTINGS
@given(data=st.data(), which=st.sampled_from(["opaque", "cbc", "gcm-oaep"]))
def test_damaged_cms(samples, paul_auth, trust, data, which):
    from smime.verify import verify_signed_data
    broken = data.draw(damage(samples[which]))
    try:
        if which == "opaque":
            report = verify_signed_data(broken, None, trust=trust, identity_check=None)
            assert report.valid or report.failures
        else:
            asyncio.run(decrypt_content(broken, paul_auth))
    except SmimeError:
        pass


@SETTINGS
@given(data=st.data(), sealed=st.booleans())
def test_damaged_mime(jeanne_sign, paul_auth, trust, message, data, sealed):
    if sealed:
        good = asyncio.run(sign_and_encrypt(message, jeanne_sign, [paul_auth.certificate], detached=False))
    else:
        good = asyncio.run(sign_message(message, jeanne_sign))
    broken = data.draw(damage(good))
    try:
        opened = asyncio.run(open_message(broken, decrypter=paul_auth, trust=trust))
    except SmimeError:
        return
    assert all(r.valid or r.failures for r in opened.reports)
