"""Logging set-up: every line carries the connection id and the queue id of its context.

The ids live in contextvars, so they follow a connection's task and the threads it hands
work to (asyncio.to_thread copies the context).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
from pathlib import Path

from config.schema import LoggingConfig

conn_id: contextvars.ContextVar[str] = contextvars.ContextVar("conn_id", default="-")
queue_id: contextvars.ContextVar[str] = contextvars.ContextVar("queue_id", default="-")


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.conn = conn_id.get()
        record.qid = queue_id.get()
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({
            "time": self.formatTime(record), "level": record.levelname, "logger": record.name,
            "conn": getattr(record, "conn", "-"), "qid": getattr(record, "qid", "-"),
            "message": record.getMessage(),
        }, ensure_ascii=False)


def _private_log_file(path: Path) -> None:
    """Logs name addresses, hosts and queue ids (never bodies or secrets): the gateway's user's only, 0600, even
    when the command runs under a wider umask (the gateway sets 077 only once it serves)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)


def setup_logging(cfg: LoggingConfig) -> None:
    handler: logging.Handler
    if cfg.file is not None:
        _private_log_file(Path(cfg.file))
        handler = logging.FileHandler(cfg.file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    if cfg.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)-7s %(name)s [conn=%(conn)s qid=%(qid)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.level.upper())
    # aiosmtpd logs every peer and command at INFO; keep its chatter at WARNING.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
