"""S/MIME benchmark (issue 3): our engine beside cryptography's PKCS#7 builders and `openssl cms`, same files, same run.

    .venv/bin/python bench/smime_bench.py [--rounds 15]

Milliseconds (median) per sign+encrypt (two recipients, AES-256-CBC, RSA-2048) and per decrypt+verify, for
20 KB and 1 MB messages, on one core. `openssl cms` runs one process per step (sign, then encrypt; decrypt,
then verify). cryptography has no CMS verify API, so its decrypt+verify column is decrypt only.
Targets: sign+encrypt of 20 KB <= 1.2x cryptography's builders; decrypt+verify of 1 MB <= 1.2x `openssl cms`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7

from gateway.devpki import create_dev_pki
from smime.certpath import TrustStore
from smime.filekeys import FileKey
from smime.message import open_message, sign_and_encrypt


def message(size: int) -> bytes:
    """A plain-text message of about `size` bytes, 76-character lines."""
    line = b"Compte rendu de consultation: examen clinique normal, pas de traitement particulier.\r\n"
    body = line * (size // len(line) + 1)
    return (b"From: Jeanne EXEMPLE <jeanne.exemple@dev.mssante.test>\r\nTo: paul.testeur@dev.mssante.test\r\n"
            b"Subject: bench\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n" + body[:size])


def medians_ms(fns: Sequence[Callable[[], object]], rounds: int) -> list[float]:
    """Median wall time of each function; rounds interleave them, so a busy neighbour slows all alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, bucket in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - t0)
    return [statistics.median(t) * 1000 for t in times]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    work = Path(tempfile.mkdtemp(prefix="smime-bench-"))
    pki = create_dev_pki(work / "pki")
    jeanne, paul = pki.practitioners
    signer = FileKey.from_pem(jeanne.sign_key.read_bytes(), jeanne.sign_cert.read_bytes(),
                              chain_pem=pki.personnes_cert.read_bytes())
    paul_key = FileKey.from_pem(paul.auth_key.read_bytes(), paul.auth_cert.read_bytes())
    jeanne_enc = FileKey.from_pem(jeanne.auth_key.read_bytes(), jeanne.auth_cert.read_bytes())
    recipients = [paul_key.certificate, jeanne_enc.certificate]
    trust = TrustStore.from_pem(pki.ca_bundle.read_bytes(), pki.crls_pem.read_bytes())
    cafile = work / "ca-and-crls.pem"
    cafile.write_bytes(pki.ca_bundle.read_bytes() + pki.crls_pem.read_bytes())

    loop = asyncio.new_event_loop()  # one loop, as in the gateway; asyncio.run per call would add ~0.5 ms
    print(f"{'operation':<28}{'size':>7}{'ours ms':>10}{'crypto ms':>11}{'openssl ms':>12}{'ours/base':>11}  target")
    ok = True
    for size, label in ((20 * 1024, "20 KB"), (1024 * 1024, "1 MB")):
        msg = message(size)
        src = work / f"in-{size}.eml"
        src.write_bytes(msg)

        def ours_seal(msg: bytes = msg) -> bytes:
            return loop.run_until_complete(sign_and_encrypt(msg, signer, recipients, chain=signer.chain))

        def crypto_seal(msg: bytes = msg) -> bytes:
            signed = (pkcs7.PKCS7SignatureBuilder().set_data(msg)
                      .add_signer(signer.certificate, signer.private_key, hashes.SHA256())
                      .add_certificate(signer.chain[0])
                      .sign(serialization.Encoding.SMIME, [pkcs7.PKCS7Options.DetachedSignature]))
            builder = pkcs7.PKCS7EnvelopeBuilder().set_data(signed).set_content_encryption_algorithm(algorithms.AES256)
            for cert in recipients:
                builder = builder.add_recipient(cert)
            return builder.encrypt(serialization.Encoding.SMIME, [])

        signed_file, sealed_file = work / f"s-{size}.eml", work / f"e-{size}.eml"

        def openssl_seal(src: Path = src, signed_file: Path = signed_file, sealed_file: Path = sealed_file) -> None:
            subprocess.run(["openssl", "cms", "-sign", "-in", str(src), "-out", str(signed_file), "-signer",
                            str(jeanne.sign_cert), "-inkey", str(jeanne.sign_key), "-certfile",
                            str(pki.personnes_cert)], check=True)
            subprocess.run(["openssl", "cms", "-encrypt", "-aes256", "-in", str(signed_file), "-out",
                            str(sealed_file), str(paul.auth_cert), str(jeanne.auth_cert)], check=True)

        sealed = ours_seal()
        crypto_sealed = crypto_seal()
        ours_file = work / f"ours-{size}.eml"
        ours_file.write_bytes(sealed)

        def ours_open(sealed: bytes = sealed) -> None:
            opened = loop.run_until_complete(open_message(sealed, decrypter=paul_key, trust=trust))
            assert opened.reports[0].valid

        def crypto_open(crypto_sealed: bytes = crypto_sealed) -> None:
            pkcs7.pkcs7_decrypt_smime(crypto_sealed, paul_key.certificate, paul_key.private_key, [])

        dec_file = work / f"d-{size}.eml"

        def openssl_open(ours_file: Path = ours_file, dec_file: Path = dec_file) -> None:
            subprocess.run(["openssl", "cms", "-decrypt", "-in", str(ours_file), "-out", str(dec_file), "-recip",
                            str(paul.auth_cert), "-inkey", str(paul.auth_key)], check=True)
            subprocess.run(["openssl", "cms", "-verify", "-in", str(dec_file), "-CAfile", str(cafile),
                            "-crl_check_all", "-purpose", "smimesign", "-out", os.devnull], check=True,
                           stderr=subprocess.DEVNULL)

        rows = [
            ("sign+encrypt (2 recipients)", ours_seal, crypto_seal, openssl_seal, "crypto", size == 20 * 1024),
            ("decrypt+verify", ours_open, crypto_open, openssl_open, "openssl", size == 1024 * 1024),
        ]
        for name, ours, crypto, ossl, base, targeted in rows:
            t_ours, t_crypto, t_ossl = medians_ms([ours, crypto, ossl], args.rounds)
            ratio = t_ours / (t_crypto if base == "crypto" else t_ossl)
            verdict = ""
            if targeted:
                met = ratio <= 1.2
                ok &= met
                verdict = f"<= 1.2x {base}: {'met' if met else 'MISSED'}"
            print(f"{name:<28}{label:>7}{t_ours:>10.2f}{t_crypto:>11.2f}{t_ossl:>12.2f}{ratio:>10.2f}x  {verdict}")
    big = message(1024 * 1024)
    sealed_big = loop.run_until_complete(sign_and_encrypt(big, signer, recipients, chain=signer.chain))
    for name, step in (("sign+encrypt", lambda: sign_and_encrypt(big, signer, recipients, chain=signer.chain)),
                       ("decrypt+verify", lambda: open_message(sealed_big, decrypter=paul_key, trust=trust))):
        tracemalloc.start()
        loop.run_until_complete(step())
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"peak Python allocation, {name} of 1 MB: {peak / len(big):.1f}x the message size")
    print("(crypto decrypt+verify = decrypt only: cryptography has no CMS verify; ours checks CRLs as openssl does)")
    print("all targets met" if ok else "some targets MISSED")
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
