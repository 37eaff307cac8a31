"""gateway.logsetup: a log file is its user's only (issue 7, item 7)."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from config.schema import LoggingConfig
from gateway.logsetup import setup_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            h.close()
    root.handlers[:], root.level = handlers, level


@pytest.mark.usefixtures("restore_logging")
def test_log_file_is_created_private_under_a_wide_umask(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "gateway.log"
    old = os.umask(0o022)
    try:
        setup_logging(LoggingConfig(level="INFO", file=log))
    finally:
        os.umask(old)
    logging.getLogger("gateway.test").info("a line")
    assert "a line" in log.read_text(encoding="utf-8")
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


@pytest.mark.usefixtures("restore_logging")
def test_an_existing_world_readable_log_is_narrowed(tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    log.write_text("old line\n", encoding="utf-8")
    log.chmod(0o644)
    setup_logging(LoggingConfig(level="INFO", file=log))
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert log.read_text(encoding="utf-8").startswith("old line")
