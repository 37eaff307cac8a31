"""Load a TOML file into the frozen schema, with errors that name the file, the key and
what was expected.

The loader is driven by the dataclasses' type hints, so a new key is one new field in
`schema.py` and nothing here.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union
from urllib.parse import urlsplit

from config.errors import ConfigError
from config.schema import DatabaseConfig, GatewayConfig, SecretRef

T = TypeVar("T")

# Keys whose value would be a secret written inline; they must be a SecretRef instead.
_SECRET_WORDS = ("password", "passphrase", "pin", "secret", "private_key")


def load(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read and validate a gateway configuration file."""
    file = Path(path).resolve()
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(file, "", "the configuration file does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(file, "", f"cannot be read: {exc}") from None
    cfg = _build(GatewayConfig, raw, _Ctx(file, file.parent), "")
    cfg = dataclasses.replace(cfg, source=file, database=_resolve_sqlite(cfg.database, file.parent))
    _check(cfg, file)
    return cfg


def read_secret(ref: SecretRef) -> str:
    """Resolve a secret reference; the value is never logged nor kept in the config."""
    if ref.file is not None:
        try:
            return ref.file.read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise ConfigError(ref.file, "", f"the secret file cannot be read: {exc}") from None
    if ref.env is not None:
        value = os.environ.get(ref.env)
        if value is None:
            raise ConfigError(None, ref.env, "the environment variable is not set")
        return value
    raise ConfigError(None, "", "a secret reference needs 'file' or 'env'")


@dataclasses.dataclass(frozen=True, slots=True)
class _Ctx:
    file: Path
    base: Path


def _build(cls: type[T], raw: Any, ctx: _Ctx, prefix: str) -> T:
    if not isinstance(raw, dict):
        raise ConfigError(ctx.file, prefix, "expected a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = _join(prefix, unknown[0])
        raise ConfigError(ctx.file, key, f"unknown key (known here: {', '.join(sorted(fields))})")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name == "source":
            continue
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(ctx.file, key, "is required")
            continue
        values[name] = _convert(hints[name], raw[name], ctx, key)
    return cls(**values)


def _convert(tp: Any, value: Any, ctx: _Ctx, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, ctx, key)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(ctx.file, key, f"expected one of {choices}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(ctx.file, key, "expected a table")
        return {str(k): _convert(args[1], v, ctx, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(ctx.file, key, "expected a list")
        return tuple(_convert(args[0], v, ctx, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, ctx, key)  # type: ignore[arg-type]
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(ctx.file, key, "expected a path (a non-empty string)")
        return (ctx.base / Path(value).expanduser()).resolve()
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(ctx.file, key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(ctx.file, key, f"expected a non-negative integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(ctx.file, key, f"expected a non-negative number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(ctx.file, key, f"expected a string, got {value!r}")
        if any(word in key.rsplit(".", 1)[-1].lower() for word in _SECRET_WORDS):
            raise ConfigError(ctx.file, key, "secrets are never inlined: use { file = ... } or { env = ... }")
        return value
    raise TypeError(f"unsupported schema type {tp!r} for {key}")  # a bug in schema.py


def _resolve_sqlite(db: DatabaseConfig, base: Path) -> DatabaseConfig:
    """A relative SQLite path is relative to the configuration file, like every other path."""
    prefix = "sqlite:///"
    if not db.url.startswith(prefix) or db.url[len(prefix):].startswith("/"):
        return db
    rest = db.url[len(prefix):]
    path, sep, query = rest.partition("?")
    return dataclasses.replace(db, url=f"{prefix}{(base / path).resolve()}{sep}{query}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check(cfg: GatewayConfig, file: Path) -> None:
    """Cross-field rules that the types alone cannot say."""
    if not cfg.local_domains:
        raise ConfigError(file, "local_domains", "list at least one domain this gateway serves")
    lowered = tuple(d.lower() for d in cfg.local_domains)
    if lowered != cfg.local_domains:
        raise ConfigError(file, "local_domains", "write domains in lower case")
    for name, listener in (("submission.listen", cfg.submission.listen), ("mailboxes.imap", cfg.mailboxes.imap)):
        if not 0 <= listener.port <= 65535:
            raise ConfigError(file, f"{name}.port", f"expected a port number, got {listener.port}")
    if cfg.mailboxes.mode == "external" and cfg.mailboxes.lmtp is None:
        raise ConfigError(file, "mailboxes.lmtp", "an external Dovecot needs its LMTP endpoint")
    if urlsplit(cfg.database.url).password:
        raise ConfigError(file, "database.url", "no password in the URL: use database.password")
    ref = cfg.database.password
    if ref is not None and (ref.file is None) == (ref.env is None):
        raise ConfigError(file, "database.password", "give exactly one of 'file' or 'env'")
    if cfg.limits.max_message_size < 1024:
        raise ConfigError(file, "limits.max_message_size", "expected at least 1024 bytes")
