"""After a crash: whether a local mailbox already holds the copy of a delivery the crash cut short.

Local delivery is at least once (gateway/spool.py): a gateway killed between Dovecot's LMTP `250` and the commit of
that result would deliver the message again after restart. The spool flags such messages `interrupted`; before
delivering one again, the pipeline asks here. Every message the gateway accepts carries its queue id in the trace
field it adds (`Received: ... by <host> (mssgw) with ESMTPSA id <queue id>`), and Dovecot keeps that field, so the
question is one `doveadm search` (Dovecot's own search, all the user's mailboxes) for that id in `Received`.

Any doubt (doveadm missing, failing, slow) answers "not there": a duplicate is preferred to a loss (RFC 5321 §6.1).
Only flagged messages are asked about, a handful per crash, so the search's cost never reaches the common path.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

_QUEUE_ID = re.compile(r"^[0-9A-F]{8,32}$")


class DoveadmCopies:
    """`await holds(address, queue_id)` against the Dovecot instance configured by `config` (the embedded one)."""

    def __init__(self, config: Path, *, binary: str | None = None, timeout: float = 30.0) -> None:
        self._config = config
        self._binary = binary or shutil.which("doveadm") or "/usr/bin/doveadm"
        self._timeout = timeout

    async def holds(self, address: str, queue_id: str) -> bool:
        if not _QUEUE_ID.match(queue_id):
            return False  # not one of our ids (a message the gateway wrote itself has no trace field to find)
        try:
            proc = await asyncio.create_subprocess_exec(
                self._binary, "-c", str(self._config), "search", "-u", address, "header", "received", queue_id,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            log.warning("cannot ask Dovecot whether <%s> holds an interrupted delivery: %s", address, exc)
            return False
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self._timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.warning("doveadm search for <%s> timed out; delivering again", address)
            return False
        if proc.returncode != 0:
            log.warning("doveadm search for <%s> failed (%d): %s; delivering again", address, proc.returncode,
                        err.decode("utf-8", "replace").strip()[:300])
            return False
        found = bool(out.strip())
        log.info("interrupted delivery: <%s> %s", address, "already has it" if found else "does not have it")
        return found
