"""What the fuzz targets share: keys and sample messages made once per process, without pytest fixtures.

Targets take no fixtures so that atheris can drive them too (`fuzz_one_input`, see atheris_run.py).
"""

from __future__ import annotations

import asyncio
import atexit
import email
import email.policy
import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import settings

from gateway.devpki import DevPki, create_dev_pki
from smime.certpath import TrustStore
from smime.filekeys import FileKey
from smime.signing import build_signed_data

MESSAGE = (b"From: Jeanne EXEMPLE <jeanne.exemple@dev.mssante.test>\r\n"
           b"To: Paul TESTEUR <paul.testeur@dev.mssante.test>\r\n"
           b"Subject: Compte rendu\r\n"
           b"MIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=us-ascii\r\n"
           b"\r\n"
           b"Bonjour,\r\n\r\nVoici le compte rendu.\r\n")


def fuzz_settings() -> settings:
    """The profile conftest.py registered and MSSGW_FUZZ_PROFILE chose (`ci` unless told)."""
    return settings(settings.get_profile(os.environ.get("MSSGW_FUZZ_PROFILE", "ci")))


def email_view(entity: bytes) -> tuple[int, int]:
    """The deepest level and number of parts the email package builds of an entity (the top one is level 1)."""
    msg = email.message_from_bytes(entity, policy=email.policy.compat32)
    deepest, parts, todo = 0, 0, [(msg, 1)]
    while todo:
        part, depth = todo.pop()
        parts += 1
        deepest = max(deepest, depth)
        if part.is_multipart():
            todo.extend((p, depth + 1) for p in part.get_payload())
    return deepest, parts


def work_dir(name: str) -> Path:
    """A directory of this process, removed when it exits."""
    path = Path(tempfile.mkdtemp(prefix=f"mssgw-fuzz-{name}-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def pki() -> DevPki:
    return create_dev_pki(work_dir("pki") / "pki")


@dataclass(frozen=True)
class Keys:
    jeanne_sign: FileKey
    paul_auth: FileKey
    trust: TrustStore


@functools.cache
def keys() -> Keys:
    p = pki()

    def load(cert: Path, key: Path) -> FileKey:
        return FileKey.from_pem(key.read_bytes(), cert.read_bytes(), chain_pem=p.personnes_cert.read_bytes())

    jeanne, paul = p.practitioners[0], p.practitioners[1]
    return Keys(load(jeanne.sign_cert, jeanne.sign_key), load(paul.auth_cert, paul.auth_key),
                TrustStore.from_pem(p.ca_bundle.read_bytes(), p.crls_pem.read_bytes()))


@functools.cache
def cms_samples() -> dict[str, bytes]:
    """DER of each CMS structure the gateway reads: opaque and detached SignedData, both envelopes."""
    from smime.envelope import encrypt_content

    k = keys()
    content = b"Content-Type: text/plain\r\n\r\nBonjour.\r\n"
    return {
        "opaque": asyncio.run(build_signed_data(content, k.jeanne_sign, detached=False, chain=k.jeanne_sign.chain)),
        "detached": asyncio.run(build_signed_data(content, k.jeanne_sign, detached=True)),
        "cbc": encrypt_content(content, [k.paul_auth.certificate]),
        "gcm-oaep": encrypt_content(content, [k.paul_auth.certificate], cipher="aes256-gcm", key_transport="oaep"),
    }
