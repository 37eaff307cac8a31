"""TLS contexts with the gateway's policy: TLS 1.2 or newer, and on TLS 1.2 only the
MSSanté suites (Référentiel #2 ECO.1.1.3: ECDHE-RSA with AES-GCM or AES-CBC-SHA2).
TLS 1.3 keeps OpenSSL's AEAD suites."""

from __future__ import annotations

import ssl

from config.schema import TLSConfig
from gateway.errors import GatewayError

MSSANTE_TLS12_CIPHERS = (
    "ECDHE-RSA-AES256-GCM-SHA384:"   # 0xC030
    "ECDHE-RSA-AES128-GCM-SHA256:"   # 0xC02F
    "ECDHE-RSA-AES256-SHA384:"       # 0xC028
    "ECDHE-RSA-AES128-SHA256"        # 0xC027
)

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class TLSSetupError(GatewayError):
    pass


def server_context(cfg: TLSConfig) -> ssl.SSLContext:
    """The context for client-facing listeners (submission; peers' client certificates optional)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[cfg.min_version]
    ctx.set_ciphers(MSSANTE_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(cfg.cert, cfg.key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError(f"cannot load the TLS certificate {cfg.cert} / key {cfg.key}: {exc}") from exc
    return ctx


def client_context(ca: str | None = None) -> ssl.SSLContext:
    """A verifying client context with the same floor (used to reach peers, and by tests)."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
