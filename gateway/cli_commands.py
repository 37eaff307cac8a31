"""The command modules of `mssgw`, in the order `mssgw --help` lists them; each exposes `register(subparsers)`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway import (
    cmd_account,
    cmd_card,
    cmd_demo,
    cmd_directory,
    cmd_dovecot,
    cmd_pki,
    cmd_queue,
    cmd_run,
    cmd_smime,
)

REGISTRARS: list[Callable[[Any], None]] = [
    cmd_run.register,
    cmd_account.register,
    cmd_queue.register,
    cmd_dovecot.register,
    cmd_pki.register,
    cmd_card.register,
    cmd_directory.register,
    cmd_smime.register,
    cmd_demo.register,
]
