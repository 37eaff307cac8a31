"""Fuzz targets of smime/: generated CMS structures and MIME trees get a result or a SmimeError, nothing else.

tests/unit/smime/test_fuzz.py flips and cuts bytes of good messages; these build structure instead
(subtrees replaced, nested hundreds deep, BER indefinite lengths and chunked strings; MIME trees with
odd boundaries, RFC 2231 parameters, S/MIME parts in every position), to reach the code behind the parsers.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from smime import der
from smime.envelope import decrypt_content
from smime.errors import LimitExceeded, MalformedCms, SmimeError
from smime.inspect import inspect_entity
from smime.limits import ParseLimits
from smime.message import open_message
from smime.mime import build_pkcs7_mime, canonicalize, check_structure, content_type
from smime.signing import sign_entity
from smime.verify import verify_signed_data
from tests.fuzz.strategies import message_of, mime_entities, mutated_ber, parse_der
from tests.fuzz.support import cms_samples, email_view, fuzz_settings, keys

SAMPLES = cms_samples()
CONTENT = b"Content-Type: text/plain\r\n\r\nBonjour.\r\n"


def _read_cms(which: str, der: bytes) -> None:
    k = keys()
    if which in ("opaque", "detached"):
        report = verify_signed_data(der, CONTENT if which == "detached" else None, trust=k.trust,
                                    identity_check=None)
        assert report.valid or report.failures
    else:
        asyncio.run(decrypt_content(der, k.paul_auth))
    kind = "signed-data" if which in ("opaque", "detached") else "enveloped-data"
    inspect_entity(build_pkcs7_mime(der, kind))


@fuzz_settings()
@given(data=st.data(), which=st.sampled_from(sorted(SAMPLES)))
def test_cms_structures(data: st.DataObject, which: str) -> None:
    der = data.draw(mutated_ber(SAMPLES[which]))
    try:
        _read_cms(which, der)
    except SmimeError:
        pass


@fuzz_settings()
@given(entity=mime_entities(SAMPLES))
@example(entity=b"Content-Type: application/pkcs7-mime; name*=idna''%ff\r\n\r\nAAAA\r\n")
@example(entity=b"Content-Type: text/plain; name*=utf-8''%ff; name*0*=utf-8''; name*1=\r\n\r\nx\r\n")
@example(entity=b"Content-Type: multipart/signed; boundary=\xff\r\n\r\n--\xff\r\n\r\nx\r\n--\xff\r\n"
                b"Content-Type: application/pkcs7-signature\r\n\r\nMA==\r\n--\xff--\r\n")
@example(entity=b"Content-Type: multipart/signed; boundary*=utf-16''%00%d8\r\n\r\n--x\r\n")
def test_open_message(entity: bytes) -> None:
    k = keys()
    try:
        opened = asyncio.run(open_message(message_of(entity), decrypter=k.paul_auth, trust=k.trust))
    except SmimeError:
        return
    assert all(r.valid or r.failures for r in opened.reports)


@fuzz_settings()
@given(entity=mime_entities(SAMPLES))
def test_inspect(entity: bytes) -> None:
    try:
        layer = inspect_entity(entity)
    except SmimeError:
        return
    assert layer.mime_type == content_type(entity.split(b"\n\n")[0].split(b"\r\n\r\n")[0] + b"\r\n").mime_type \
        or layer.mime_type


@fuzz_settings()
@given(entity=mime_entities(SAMPLES))
def test_sign_any_entity(entity: bytes) -> None:
    """What a client submits is signed after the queue: canonicalize re-encodes 8-bit parts with the email package."""
    try:
        signed = asyncio.run(sign_entity(entity, keys().jeanne_sign))
    except SmimeError:
        return
    assert signed.startswith(b"Content-Type: multipart/signed;")


@fuzz_settings()
@given(entity=mime_entities(SAMPLES))
def test_structure_scan_sees_at_least_what_the_email_package_builds(entity: bytes) -> None:
    """The limit holds only if the scan never counts fewer levels or parts than the parser it protects."""
    try:
        depth, parts = email_view(entity)
    except (TypeError, ValueError, LookupError, IndexError):  # the email package itself fails on this header
        depth = parts = 0  # so canonicalize (below) must refuse it, typed
    if depth > 1:
        with pytest.raises(LimitExceeded):
            check_structure(entity, ParseLimits(max_mime_depth=depth - 1))
    if parts > 1:
        with pytest.raises(LimitExceeded):
            check_structure(entity, ParseLimits(max_mime_parts=parts - 1))
    try:
        canonicalize(entity)
    except SmimeError:
        pass  # over a limit, or a header the email package cannot read: refused, typed


def test_duplicated_certificate_extension_is_malformed() -> None:
    """Found fuzzing (a subtree doubled): cryptography raised DuplicateExtension, not a ValueError, on first use
    of the signer certificate's extensions, out of verify_signed_data."""
    root = parse_der(SAMPLES["opaque"])
    san = der.oid("2.5.29.17")[2:]
    extension = next(node for _, node in root.walk()
                     if node.children and node.children[0].tag == b"\x06" and node.children[0].contents == san)
    parent = next(p for p, node in root.walk() if node is extension)
    assert parent is not None and parent.children is not None
    parent.children.append(extension)
    with pytest.raises(MalformedCms, match="DuplicateExtension"):
        verify_signed_data(root.encode(), None, trust=keys().trust, identity_check=None)
