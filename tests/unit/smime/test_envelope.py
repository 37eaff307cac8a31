"""Encryption and decryption with our own code: ciphers, key transports, recipients, sign-then-encrypt."""

from __future__ import annotations

import pytest
from asn1crypto import cms

from smime.envelope import decrypt_content, encrypt_content
from smime.errors import DecryptionFailed, NoRecipientInfo, SmimeError
from smime.message import encrypt_message, open_message, sign_and_encrypt
from smime.mime import decode_body, split_header_body, split_message

CONTENT = b"Content-Type: text/plain\r\n\r\nConfidentiel.\r\n"


@pytest.mark.parametrize("cipher", ["aes128-cbc", "aes256-cbc", "aes128-gcm", "aes256-gcm"])
@pytest.mark.parametrize("key_transport", ["pkcs1v15", "oaep"])
async def test_round_trip(paul_auth, cipher, key_transport):
    der = encrypt_content(CONTENT, [paul_auth.certificate], cipher=cipher, key_transport=key_transport)
    info = cms.ContentInfo.load(der)
    expected = "authenticated_enveloped_data" if cipher.endswith("gcm") else "enveloped_data"
    assert info["content_type"].native == expected
    out = await decrypt_content(der, paul_auth)
    assert out.content == CONTENT
    assert out.cipher == cipher
    assert out.key_transport == ("pkcs1v15" if key_transport == "pkcs1v15" else "oaep-sha256")


async def test_oaep_parameters_are_explicit(paul_auth):
    der = encrypt_content(CONTENT, [paul_auth.certificate], key_transport="oaep", oaep_hash="sha384")
    ktri = cms.ContentInfo.load(der)["content"]["recipient_infos"][0].chosen
    params = ktri["key_encryption_algorithm"]["parameters"]
    assert params["hash_algorithm"]["algorithm"].native == "sha384"
    assert params["mask_gen_algorithm"]["parameters"]["algorithm"].native == "sha384"
    assert (await decrypt_content(der, paul_auth)).key_transport == "oaep-sha384"


async def test_every_recipient_can_decrypt(paul_auth, jeanne_auth):
    der = encrypt_content(CONTENT, [paul_auth.certificate, jeanne_auth.certificate])
    assert (await decrypt_content(der, paul_auth)).content == CONTENT
    assert (await decrypt_content(der, jeanne_auth)).content == CONTENT
    assert (await decrypt_content(der, jeanne_auth)).recipients == 2


async def test_fresh_key_and_iv_each_time(paul_auth):
    one = encrypt_content(CONTENT, [paul_auth.certificate])
    two = encrypt_content(CONTENT, [paul_auth.certificate])
    assert cms.ContentInfo.load(one)["content"]["encrypted_content_info"]["encrypted_content"].native != \
        cms.ContentInfo.load(two)["content"]["encrypted_content_info"]["encrypted_content"].native


async def test_not_for_us(paul_auth, jeanne_auth):
    der = encrypt_content(CONTENT, [paul_auth.certificate])
    with pytest.raises(NoRecipientInfo) as exc:
        await decrypt_content(der, jeanne_auth)
    assert "PERSONNES" in exc.value.present[0]


async def test_sign_then_encrypt_includes_sender(jeanne_sign, jeanne_auth, paul_auth, trust, message):
    sealed = await sign_and_encrypt(message, jeanne_sign, [paul_auth.certificate], chain=jeanne_sign.chain,
                                    sender_encryption_certificate=jeanne_auth.certificate)
    assert b"Voici" not in sealed and b"Subject: Compte rendu" in sealed
    opened = await open_message(sealed, decrypter=paul_auth, trust=trust)
    assert [layer.kind for layer in opened.layers] == ["encrypted", "signed"]
    assert opened.reports[0].valid, opened.reports[0].summary()
    assert opened.message == message
    # The sender's encryption key is among the recipients (its copy in Sent stays readable).
    entity = split_message(sealed)[1]
    der = decode_body(*split_header_body(entity))
    assert (await decrypt_content(der, jeanne_auth)).recipients == 2


async def test_encrypt_message_keeps_transport_headers(paul_auth, trust, message):
    sealed = encrypt_message(message, [paul_auth.certificate], cipher="aes256-gcm")
    assert b"smime-type=authEnveloped-data" in sealed
    assert b"To: Paul TESTEUR" in sealed
    opened = await open_message(sealed, decrypter=paul_auth, trust=trust)
    assert opened.message == message and opened.encrypted and not opened.reports


async def test_oaep_parameters_are_honoured_not_assumed(paul_auth):
    """Absent OAEP parameters mean SHA-1 (RFC 8017 A.2.1): a key wrapped with SHA-256 then does not unwrap."""
    der = encrypt_content(CONTENT, [paul_auth.certificate], key_transport="oaep")
    info = cms.ContentInfo.load(der)
    ktri = info["content"]["recipient_infos"][0].chosen
    ktri["key_encryption_algorithm"] = cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_oaep"})
    with pytest.raises(SmimeError):
        await decrypt_content(info.dump(force=True), paul_auth)


async def test_wrong_key_size_for_cipher(paul_auth):
    der = encrypt_content(CONTENT, [paul_auth.certificate], cipher="aes128-cbc")
    info = cms.ContentInfo.load(der)
    info["content"]["encrypted_content_info"]["content_encryption_algorithm"]["algorithm"] = "aes256_cbc"
    with pytest.raises(DecryptionFailed, match="needs 32"):
        await decrypt_content(info.dump(force=True), paul_auth)


async def test_large_message_goes_through_the_worker_thread(jeanne_sign, jeanne_auth, paul_auth, trust, message):
    """Above OFFLOAD_BYTES the CPU-bound steps run in a thread; the result must be the same."""
    from smime.message import OFFLOAD_BYTES
    big = message + b"Ligne de compte rendu, assez longue pour remplir la page.\r\n" * (OFFLOAD_BYTES // 50)
    sealed = await sign_and_encrypt(big, jeanne_sign, [paul_auth.certificate], chain=jeanne_sign.chain,
                                    sender_encryption_certificate=jeanne_auth.certificate)
    assert len(sealed) > OFFLOAD_BYTES
    opened = await open_message(sealed, decrypter=paul_auth, trust=trust)
    assert opened.reports[0].valid and opened.message == big


@pytest.mark.parametrize("cipher", ["aes256-cbc", "aes256-gcm"])
def test_ciphertext_is_cut_out_before_parsing(paul_auth, cipher):
    """DER input is parsed around its ciphertext (one copy of a large message), BER input whole."""
    from smime.envelope import _hollow
    der = encrypt_content(b"x" * 5000, [paul_auth.certificate], cipher=cipher)
    hollowed = _hollow(der)
    assert hollowed is not None
    skeleton, ciphertext = hollowed
    assert len(skeleton) < 1000 and len(ciphertext) >= 5000 and bytes(ciphertext) in der
    original, cut = cms.ContentInfo.load(der), cms.ContentInfo.load(skeleton)
    assert cut["content"]["recipient_infos"].dump() == original["content"]["recipient_infos"].dump()
    ber = b"\x30\x80" + der[4:] + b"\x00\x00"  # the same with an indefinite outer length
    assert _hollow(ber) is None
