"""Signing and verifying with our own code: forms, digests, paddings, canonical MIME, the report's content."""

from __future__ import annotations

import datetime

import pytest

from smime.certpath import TrustStore, ValidationPolicy
from smime.message import open_message
from smime.mime import split_message, split_multipart_signed
from smime.report import Check
from smime.signing import sign_entity, sign_message
from smime.verify import verify_signed_data


@pytest.mark.parametrize("hash_name", ["sha256", "sha384", "sha512"])
@pytest.mark.parametrize("padding", ["pkcs1v15", "pss"])
async def test_detached_round_trip(jeanne_sign, trust, hash_name, padding, message):
    signed = await sign_message(message, jeanne_sign, hash_name=hash_name, padding=padding)
    assert f"micalg=sha-{hash_name[3:]}".encode() in signed
    opened = await open_message(signed, decrypter=None, trust=trust)
    (report,) = opened.reports
    assert report.valid, report.summary()
    assert report.signer.digest_algorithm == hash_name
    assert report.signer.signature_algorithm == ("rsassa_pss" if padding == "pss" else "rsassa_pkcs1v15")
    assert opened.message == message


async def test_opaque_round_trip(jeanne_sign, trust, message):
    signed = await sign_message(message, jeanne_sign, detached=False)
    assert b"smime-type=signed-data" in signed
    opened = await open_message(signed, decrypter=None, trust=trust)
    assert opened.reports[0].valid and not opened.reports[0].detached
    assert opened.message == message


async def test_report_names_the_signer_and_chain(jeanne_sign, trust, pki, message):
    signed = await sign_message(message, jeanne_sign)
    report = (await open_message(signed, decrypter=None, trust=trust)).reports[0]
    assert report.signer.rpps == "10001234567"
    assert report.signer.email_addresses == ("jeanne.exemple@dev.mssante.test",)
    assert len(report.signer.chain) == 3 and "RACINE" in report.signer.chain[-1]
    assert [c.name for c in report.checks] == ["algorithms", "micalg", "message-digest", "signature", "path",
                                               "key-usage", "sender"]
    assert report.signer.signing_time is not None
    assert abs(report.signer.signing_time - datetime.datetime.now(datetime.UTC)) < datetime.timedelta(minutes=5)


async def test_chain_travels_without_root(jeanne_sign, anchors_only, message):
    """With only the root configured, the PERSONNES CA must come from the message; the root must not."""
    signed = await sign_message(message, jeanne_sign, chain=jeanne_sign.chain)
    report = (await open_message(signed, decrypter=None, trust=anchors_only)).reports[0]
    assert report.valid, report.summary()
    parts = split_multipart_signed(split_message(signed)[1])
    from asn1crypto import cms
    certs = cms.ContentInfo.load(parts.signature)["content"]["certificates"]
    subjects = [c.chosen.subject.human_friendly for c in certs]
    assert len(subjects) == 2 and not any("RACINE" in s for s in subjects)


async def test_eight_bit_content_is_reencoded_before_signing(jeanne_sign, trust):
    entity = ("Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
              "Résultats d'analyse : hémoglobine normale.\n").encode()
    signed = await sign_entity(entity, jeanne_sign)
    assert all(b < 0x80 for b in signed)
    parts = split_multipart_signed(signed)
    assert b"Content-Transfer-Encoding: quoted-printable" in parts.content
    report = verify_signed_data(parts.signature, parts.content, trust=trust, micalg=parts.micalg,
                                identity_check=None)
    assert report.valid, report.summary()
    from email import message_from_bytes
    assert "hémoglobine" in message_from_bytes(report.content).get_payload(decode=True).decode("utf-8")


async def test_binary_attachment_becomes_base64(jeanne_sign):
    entity = (b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: binary\r\n\r\n"
              + bytes(range(256)))
    parts = split_multipart_signed(await sign_entity(entity, jeanne_sign))
    assert b"Content-Transfer-Encoding: base64" in parts.content
    import base64
    body = parts.content.split(b"\r\n\r\n", 1)[1]
    assert base64.b64decode(body) == bytes(range(256))


async def test_lf_only_transport_still_verifies(jeanne_sign, trust, message):
    """A hop that stored the message with bare LF: verification falls back to the canonical form."""
    signed = await sign_message(message, jeanne_sign)
    opened = await open_message(signed.replace(b"\r\n", b"\n"), decrypter=None, trust=trust)
    report = opened.reports[0]
    assert report.valid, report.summary()
    assert "canonical" in report.check("message-digest").reason


async def test_explicit_time_and_revocation_soft_fail(jeanne_sign, pki, message):
    """Without CRLs, `require` fails the path as transient; `soft-fail` passes and says it did not check."""
    store = TrustStore.from_pem(pki.ca_bundle.read_bytes())
    signed = await sign_message(message, jeanne_sign)
    hard = (await open_message(signed, decrypter=None, trust=store)).reports[0]
    assert not hard.valid and hard.check("path").error is not None
    assert not hard.check("path").error.permanent
    soft = (await open_message(signed, decrypter=None, trust=store,
                               policy=ValidationPolicy(revocation="soft-fail"))).reports[0]
    assert soft.valid and "not checked" in soft.check("path").reason


async def test_gateway_hook_replaces_sender_check(jeanne_sign, trust, message):
    signed = await sign_message(message.replace(b"jeanne.exemple@", b"secretariat@"), jeanne_sign)
    default = (await open_message(signed, decrypter=None, trust=trust)).reports[0]
    assert not default.valid and default.failures[0].name == "sender"

    def rpps_in_directory(cert, sender):
        return "RPPS 10001234567 holds this address in the directory"

    hooked = (await open_message(signed, decrypter=None, trust=trust, identity_check=rpps_in_directory)).reports[0]
    assert hooked.valid and "directory" in hooked.check("sender").reason
    replaced = default.with_check(Check.ok("sender", "matched later by the gateway"))
    assert replaced.valid


async def test_async_identity_hook(jeanne_sign, trust, message):
    """The gateway's RPPS check awaits the directory; open_message awaits the hook."""
    import asyncio

    from smime.errors import SenderMismatch

    directory = {"10001234567": "jeanne.exemple@dev.mssante.test"}

    async def rpps_lookup(cert, sender):
        await asyncio.sleep(0)
        from smime.verify import rpps_of
        rpps = rpps_of(cert)
        if directory.get(rpps or "") != sender:
            raise SenderMismatch(sender, f"RPPS {rpps} does not hold {sender} in the directory")
        return f"RPPS {rpps} holds {sender}"

    signed = await sign_message(message, jeanne_sign)
    good = (await open_message(signed, decrypter=None, trust=trust, identity_check=rpps_lookup)).reports[0]
    assert good.valid and good.check("sender").reason == "RPPS 10001234567 holds jeanne.exemple@dev.mssante.test"
    directory.clear()
    bad = (await open_message(signed, decrypter=None, trust=trust, identity_check=rpps_lookup)).reports[0]
    assert [c.name for c in bad.failures] == ["sender"]
    assert isinstance(bad.check("sender").error, SenderMismatch)


async def test_encryption_key_preference_names_an_encryption_certificate(jeanne_sign, jeanne_auth, message):
    """The CPS signature certificate is nonRepudiation-only: it is never advertised as an encryption key."""
    from asn1crypto import cms as asn1_cms

    def preference(signed):
        parts = split_multipart_signed(split_message(signed)[1])
        si = asn1_cms.ContentInfo.load(parts.signature)["content"]["signer_infos"][0]
        return {a["type"].native: a["values"][0] for a in si["signed_attrs"]}.get("encrypt_key_pref")

    assert preference(await sign_message(message, jeanne_sign)) is None
    pref = preference(await sign_message(message, jeanne_sign, encryption_certificate=jeanne_auth.certificate))
    assert pref.chosen["serial_number"].native == jeanne_auth.certificate.serial_number
    assert preference(await sign_message(message, jeanne_auth)) is not None  # keyEncipherment: itself


async def test_fragile_lines_are_protected(jeanne_sign, trust):
    """Trailing spaces and "From " lines, which hops rewrite, are quoted-printable-encoded before signing."""
    entity = b"Content-Type: text/plain\r\n\r\nFrom the lab:   \r\nresults attached\t\r\n"
    parts = split_multipart_signed(await sign_entity(entity, jeanne_sign))
    body = parts.content.split(b"\r\n\r\n", 1)[1]
    assert b"=46rom the lab:  =20" in body and b"attached=09" in body
    assert not any(line.endswith((b" ", b"\t")) or line.startswith(b"From ") for line in body.split(b"\r\n"))
    report = verify_signed_data(parts.signature, parts.content, trust=trust, micalg=parts.micalg,
                                identity_check=None)
    assert report.valid
    import quopri
    assert quopri.decodestring(body) == b"From the lab:   \r\nresults attached\t\r\n"
