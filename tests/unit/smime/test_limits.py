"""Resource limits on parsing (smime.limits): each one hit is a LimitExceeded, checked before any parser runs."""

from __future__ import annotations

import pytest

from smime import der
from smime.cms import load_content_info
from smime.envelope import decrypt_content, encrypt_content
from smime.errors import LimitExceeded, SmimeError
from smime.filekeys import FileKey
from smime.limits import DEFAULT_LIMITS, ParseLimits, check_ber
from smime.message import open_message, sign_and_encrypt
from smime.mime import (
    canonicalize,
    check_structure,
    content_type,
    split_message,
    split_multipart_signed,
)
from smime.signing import sign_message
from smime.verify import verify_signed_data
from tests.fuzz.support import email_view

LEAF = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nd\xc3\xa9j\xc3\xa0\r\n"


def nested_multipart(levels: int, leaf: bytes = LEAF) -> bytes:
    entity = leaf
    for i in range(levels):
        b = b"n%d" % i
        entity = (b"Content-Type: multipart/mixed; boundary=" + b + b"\r\n\r\n--" + b + b"\r\n" + entity
                  + b"\r\n--" + b + b"--\r\n")
    return entity


def many_parts(count: int) -> bytes:
    return (b"Content-Type: multipart/mixed; boundary=B\r\n\r\n" + b"--B\r\n" + b"--B\r\n".join([LEAF] * count)
            + b"--B--\r\n")


def message(entity: bytes) -> bytes:
    return b"From: jeanne.exemple@dev.mssante.test\r\nSubject: x\r\nMIME-Version: 1.0\r\n" + entity


def test_limit_error_is_an_smime_error_that_names_the_limit():
    with pytest.raises(LimitExceeded) as caught:
        check_structure(nested_multipart(3), ParseLimits(max_mime_depth=2))
    assert isinstance(caught.value, SmimeError)
    assert caught.value.what == "MIME nesting depth" and caught.value.limit == 2
    assert "limit of 2" in str(caught.value)


async def test_mime_depth_refused_on_receipt(trust):
    deep = message(nested_multipart(DEFAULT_LIMITS.max_mime_depth + 5))
    with pytest.raises(LimitExceeded, match="MIME nesting depth"):
        await open_message(deep, decrypter=None, trust=trust)
    opened = await open_message(deep, decrypter=None, trust=trust, limits=ParseLimits(max_mime_depth=100))
    assert opened.layers == ()


async def test_mime_depth_refused_before_the_email_package_recurses(jeanne_sign):
    """300 levels made the email package raise RecursionError inside canonicalize (the signing path)."""
    with pytest.raises(LimitExceeded, match="MIME nesting depth"):
        await sign_message(message(nested_multipart(300)), jeanne_sign)
    with pytest.raises(LimitExceeded):
        canonicalize(nested_multipart(300))


async def test_mime_part_count(trust, jeanne_sign):
    with pytest.raises(LimitExceeded, match="MIME parts"):
        await open_message(message(many_parts(101)), decrypter=None, trust=trust,
                           limits=ParseLimits(max_mime_parts=100))
    await open_message(message(many_parts(99)), decrypter=None, trust=trust, limits=ParseLimits(max_mime_parts=100))
    with pytest.raises(LimitExceeded, match="MIME parts"):
        await sign_message(message(many_parts(50)), jeanne_sign, limits=ParseLimits(max_mime_parts=10))


@pytest.mark.parametrize("entity", [
    nested_multipart(6),
    many_parts(7),
    # no closing delimiters: the last part of each level runs to the end
    nested_multipart(5).replace(b"--\r\n", b"\r\n"),
    # message/rfc822 bodies are entered, and the parts of a multipart/digest default to message/rfc822
    b"Content-Type: message/rfc822\r\n\r\n" + b"Subject: x\r\n" + nested_multipart(3),
    b"Content-Type: multipart/digest; boundary=D\r\n\r\n--D\r\n\r\n" + nested_multipart(2) + b"\r\n--D--\r\n",
    # a line that is not a header field ends the header block, as in the email package
    b"Content-Type: multipart/mixed; boundary=Q\r\nnot a header\r\n--Q\r\n" + nested_multipart(2) + b"\r\n--Q--\r\n",
])
def test_mime_scan_sees_what_the_email_package_sees(entity):
    depth, parts = email_view(entity)
    check_structure(entity, ParseLimits(max_mime_depth=depth, max_mime_parts=parts))
    with pytest.raises(LimitExceeded):
        check_structure(entity, ParseLimits(max_mime_depth=depth - 1))
    with pytest.raises(LimitExceeded):
        check_structure(entity, ParseLimits(max_mime_parts=parts - 1))


def test_rfc2231_parameter_in_a_codec_that_cannot_be_lenient():
    """Found fuzzing the MIME parser: `name*=idna''...` made collapse_rfc2231_value raise UnicodeError."""
    ctype = content_type(b"Content-Type: application/pkcs7-mime; name*=idna''%ff.p7m\r\n")
    assert ctype.mime_type == "application/pkcs7-mime"
    assert (ctype.param("name") or "").endswith(".p7m")


@pytest.mark.parametrize("field", [
    b"Content-Type:\x80\xc2\x80 multipart/signed; boundary=x\r\n",  # UnicodeEncodeError in the email package
    b"Content-Type multipart/signed\r\n",  # no colon: IndexError
])
def test_an_invalid_content_type_field_is_text_plain(field):
    """Found by tests/unit/smime/test_fuzz.py in CI: RFC 2045 §5.2 takes an invalid Content-Type as text/plain."""
    assert content_type(field).mime_type == "text/plain"


def _deep_definite(levels: int) -> bytes:
    inner = b"\x05\x00"
    for _ in range(levels):
        inner = der.sequence(inner)
    return der.sequence(der.oid(der.SIGNED_DATA), der.tlv(0xA0, inner))


@pytest.mark.parametrize("ber", [
    _deep_definite(5000),  # asn1crypto's `.native` recursed on this: RecursionError
    b"\x30\x80" + der.oid(der.SIGNED_DATA) + b"\xa0\x80" + b"\x30\x80" * 5000 + b"\x00\x00" * 5002,
    b"\x30\x80" * 100_000,  # never closed
])
async def test_asn1_depth(ber, trust, paul_auth):
    with pytest.raises(LimitExceeded, match="ASN.1 nesting depth"):
        load_content_info(ber)
    with pytest.raises(LimitExceeded):
        verify_signed_data(ber, None, trust=trust, identity_check=None)
    with pytest.raises(LimitExceeded):
        await decrypt_content(ber, paul_auth)


def test_asn1_depth_of_real_messages_is_far_below_the_limit(paul_auth, jeanne_sign):
    sealed = encrypt_content(b"x" * 100, [paul_auth.certificate])
    check_ber(sealed, ParseLimits(max_asn1_depth=16))
    with pytest.raises(LimitExceeded):
        check_ber(sealed, ParseLimits(max_asn1_depth=3))


async def test_asn1_element_count_bounds_chunked_ber(paul_auth):
    """BER lets an OCTET STRING come in one-byte chunks (X.690 §8.7.3): each would be an object once parsed."""
    chunks = b"\x04\x01x" * 50_000
    ber = (b"\x30\x80" + der.oid(der.ENVELOPED_DATA) + b"\xa0\x80\x30\x80\x02\x01\x00\x31\x00"
           + b"\x30\x80" + der.oid(der.DATA) + der.sequence(der.oid("2.16.840.1.101.3.4.1.2"), der.octet_string(b"i" * 16))
           + b"\xa0\x80" + chunks + b"\x00\x00" * 5)
    with pytest.raises(LimitExceeded, match="ASN.1 elements"):
        await decrypt_content(ber, paul_auth, limits=ParseLimits(max_asn1_elements=10_000))
    with pytest.raises(SmimeError) as caught:
        await decrypt_content(ber, paul_auth)
    assert not isinstance(caught.value, LimitExceeded)  # under the default limit: parsed, then refused as not ours


async def test_cms_size(jeanne_sign, paul_auth, trust):
    msg = message(b"Content-Type: text/plain\r\n\r\n" + b"bonjour\r\n" * 2000)
    sealed = await sign_and_encrypt(msg, jeanne_sign, [paul_auth.certificate])
    with pytest.raises(LimitExceeded, match="CMS structure size"):
        await open_message(sealed, decrypter=paul_auth, trust=trust, limits=ParseLimits(max_cms_bytes=10_000))
    opened = await open_message(sealed, decrypter=paul_auth, trust=trust)
    assert opened.reports[0].valid


def test_limits_come_from_the_limits_table(tmp_path):
    """`[limits]` of the configuration carries every parse limit; its defaults are the engine's."""
    from config.schema import LimitsConfig
    from smime.limits import limits_from_config

    assert limits_from_config(LimitsConfig()) == DEFAULT_LIMITS
    assert limits_from_config(LimitsConfig(max_mime_depth=7, max_cms_size=1000)) == \
        ParseLimits(max_mime_depth=7, max_cms_bytes=1000)


def test_zip_limits_in_the_limits_table_match_the_directory_defaults():
    from config.schema import LimitsConfig
    from directory_sync.extracts import DEFAULT_ZIP_LIMITS

    cfg = LimitsConfig()
    assert (cfg.max_zip_member_size, cfg.max_zip_ratio) == (DEFAULT_ZIP_LIMITS.max_member_bytes,
                                                             DEFAULT_ZIP_LIMITS.max_ratio)


def _der_shape(data: bytes) -> tuple[int, int]:
    """(TLVs, deepest nesting of constructed values) of a DER encoding, walked recursively (the test's own reading)."""
    elements, deepest = 0, 0

    def walk(start: int, end: int, depth: int) -> None:
        nonlocal elements, deepest
        pos = start
        while pos < end:
            tag, length, pos = data[pos], data[pos + 1], pos + 2
            if length & 0x80:
                count = length & 0x7F
                length, pos = int.from_bytes(data[pos:pos + count], "big"), pos + count
            elements += 1
            if tag & 0x20:
                deepest = max(deepest, depth + 1)
                walk(pos, pos + length, depth + 1)
            pos += length

    walk(0, len(data), 0)
    return elements, deepest


async def test_asn1_limits_are_exact_on_a_real_signed_data(jeanne_sign: FileKey) -> None:
    """The scan counts every TLV and level of a real SignedData (certificates included), to the unit."""
    signed = await sign_message(message(LEAF), jeanne_sign, chain=jeanne_sign.chain)
    signature = split_multipart_signed(split_message(signed)[1]).signature
    elements, depth = _der_shape(signature)
    assert elements > 100 and depth > 5
    check_ber(signature, ParseLimits(max_asn1_elements=elements, max_asn1_depth=depth))
    with pytest.raises(LimitExceeded, match="ASN.1 elements"):
        check_ber(signature, ParseLimits(max_asn1_elements=elements - 1))
    with pytest.raises(LimitExceeded, match="ASN.1 nesting depth"):
        check_ber(signature, ParseLimits(max_asn1_depth=depth - 1))


def test_a_remembered_content_type_cannot_be_changed_by_one_caller() -> None:
    block = b"Content-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; boundary=b1\r\n"
    first = content_type(block)
    with pytest.raises(TypeError):
        first.params["boundary"] = "b2"  # type: ignore[index]
    assert content_type(block).param("boundary") == "b1"
