"""S/MIME and CMS: sign, verify, encrypt, decrypt; certificate path checks. No I/O.

Entry points, for the gateway and the CLI:

- `smime.message`: `sign_and_encrypt`, `encrypt_message`, `open_message` (every layer of a received
  message peeled and reported), `smime.signing.sign_message`.
- `smime.verify.verify_signed_data` → `smime.report.VerificationReport` (each check with its reason and
  typed error); `identity_check` is the hook where the gateway matches the RPPS number instead of the From.
- `smime.envelope`: `encrypt_content` / `decrypt_content` on DER (EnvelopedData, AuthEnvelopedData).
- `smime.certpath`: `TrustStore` (anchors, intermediates, CRLs as bytes), `ValidationPolicy`, `validate_path`.
- `smime.keys`: the `Signer` / `Decrypter` protocols; `smime.filekeys.FileKey` implements both from PEM/PKCS#12.
- `smime.inspect.inspect_entity`: what a sysadmin sees with `mssgw smime inspect`.

Every failure is a `smime.errors.SmimeError` subclass carrying its data.
"""
