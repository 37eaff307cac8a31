"""Property tests on random MIME trees: sign→verify and encrypt→decrypt give the content back exactly."""

from __future__ import annotations

import asyncio
import email
import email.policy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smime.envelope import decrypt_content, encrypt_content
from smime.mime import canonicalize, split_multipart_signed
from smime.signing import sign_entity
from smime.verify import verify_signed_data

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

_ascii_line = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
_text_line = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=80)


@st.composite
def leaves(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """One leaf part: (its bytes as sent, its decoded payload)."""
    kind = draw(st.sampled_from(["7bit", "8bit", "binary", "long"]))
    if kind == "binary":
        payload = draw(st.binary(max_size=300))
        head = b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        return head + payload, payload
    if kind == "long":
        payload = b"x" * draw(st.integers(999, 1500)) + b"\r\n"
        return b"Content-Type: text/plain; charset=us-ascii\r\n\r\n" + payload, payload
    lines = draw(st.lists(_ascii_line if kind == "7bit" else _text_line, min_size=1, max_size=6))
    payload = "\r\n".join(lines).encode() + b"\r\n"
    head = f"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: {kind}\r\n\r\n".encode()
    return head + payload, payload


def trees(depth: int = 2) -> st.SearchStrategy[tuple[bytes, list[bytes]]]:
    """A MIME entity and the decoded payloads of its leaves, in order."""
    leaf = leaves().map(lambda lp: (lp[0], [lp[1]]))
    if depth == 0:
        return leaf

    @st.composite
    def multipart(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
        children = draw(st.lists(trees(depth - 1), min_size=1, max_size=3))
        boundary = f"b{depth}-{draw(st.integers(0, 10**9))}".encode()
        body = b"".join(b"--" + boundary + b"\r\n" + child + b"\r\n" for child, _ in children)
        entity = (b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"\r\n\r\n" + body
                  + b"--" + boundary + b"--\r\n")
        return entity, [p for _, payloads in children for p in payloads]

    return st.one_of(leaf, multipart())


def _payloads(entity: bytes) -> list[bytes]:
    msg = email.message_from_bytes(entity, policy=email.policy.compat32)
    out: list[bytes] = []
    for part in msg.walk():
        if not part.is_multipart():
            data = part.get_payload(decode=True)
            out.append(data if isinstance(data, bytes) else b"")
    return out


def _same_text(a: bytes, b: bytes) -> bool:
    return a.replace(b"\r\n", b"\n").rstrip(b"\n") == b.replace(b"\r\n", b"\n").rstrip(b"\n")


@SETTINGS
@given(tree=trees())
def test_sign_verify_gives_back_the_signed_content(jeanne_sign, trust, tree):
    entity, payloads = tree
    signed = asyncio.run(sign_entity(entity, jeanne_sign))
    assert all(b < 0x80 for b in signed)
    parts = split_multipart_signed(signed)
    report = verify_signed_data(parts.signature, parts.content, trust=trust, micalg=parts.micalg,
                                identity_check=None)
    assert report.valid, report.summary()
    assert report.content == canonicalize(entity)
    lines = entity.split(b"\r\n")
    if b"8bit" not in entity and b"binary" not in entity and all(len(x) <= 998 for x in lines) \
            and not any(x.endswith((b" ", b"\t")) or x.startswith(b"From ") for x in lines):
        assert report.content == entity  # 7-bit input is signed exactly as given
    got = _payloads(report.content)
    assert len(got) == len(payloads)
    for want, have in zip(payloads, got, strict=True):
        assert have == want or _same_text(have, want)


@SETTINGS
@given(content=st.binary(max_size=4096), cipher=st.sampled_from(["aes128-cbc", "aes256-cbc", "aes128-gcm",
                                                                  "aes256-gcm"]))
def test_encrypt_decrypt_gives_back_the_bytes(paul_auth, content, cipher):
    der = encrypt_content(content, [paul_auth.certificate], cipher=cipher)
    assert asyncio.run(decrypt_content(der, paul_auth)).content == content


@SETTINGS
@given(tree=trees(), cipher=st.sampled_from(["aes256-cbc", "aes128-gcm"]))
def test_sign_then_encrypt_message_round_trip(jeanne_sign, paul_auth, trust, tree, cipher):
    from smime.message import open_message, sign_and_encrypt
    from smime.mime import join_message
    entity, _ = tree
    message = join_message([b"From: jeanne.exemple@dev.mssante.test\r\n", b"Subject: x\r\n"], entity)
    sealed = asyncio.run(sign_and_encrypt(message, jeanne_sign, [paul_auth.certificate], cipher=cipher))
    opened = asyncio.run(open_message(sealed, decrypter=paul_auth, trust=trust))
    assert opened.reports[0].valid, opened.reports[0].summary()
    assert opened.entity == canonicalize(entity)
