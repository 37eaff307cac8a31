"""S/MIME and CMS: sign, verify, encrypt, decrypt; certificate path checks. No I/O."""
