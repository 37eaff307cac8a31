"""The command modules of `mssgw`: each exposes `register(subparsers)`. Add one line per module."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

REGISTRARS: list[Callable[[Any], None]] = []


def _load() -> None:
    from gateway import cmd_pki  # noqa: PLC0415
    from gateway import cmd_account  # noqa: PLC0415
    from gateway import cmd_run  # noqa: PLC0415
    from gateway import cmd_dovecot  # noqa: PLC0415
    from gateway import cmd_directory  # noqa: PLC0415
    from gateway import cmd_card  # noqa: PLC0415
    from gateway import cmd_smime  # noqa: PLC0415

    REGISTRARS.extend([
        cmd_pki.register,
        cmd_account.register,
        cmd_run.register,
        cmd_dovecot.register,
        cmd_directory.register,
        cmd_card.register,
        cmd_smime.register,
    ])


_load()
