"""Configuration errors: each names the file, the key and what was expected."""

from __future__ import annotations

from pathlib import Path


class ConfigError(Exception):
    """A configuration value is missing, malformed or inconsistent."""

    def __init__(self, file: Path | None, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        where = str(file) if file is not None else "configuration"
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")
