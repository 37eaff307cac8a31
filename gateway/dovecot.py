"""The embedded Dovecot, run as a supervised child process, and the IMAP relay in front of it.

Why the IMAP port is a small relay and not Dovecot's own listener: Dovecot 2.3 counts every connection whose remote
address equals its local address (any client on the gateway host, 127.0.0.1 included) as "secured", so it would offer
LOGIN in clear text before STARTTLS and omit LOGINDISABLED (RFC 3501 §6.2.3, RFC 8314 §3). The gateway therefore
owns the client-facing socket and hands each connection to a loopback listener of Dovecot with a PROXY protocol v1
header carrying the client's real addresses; Dovecot 2.3 treats such a connection as secured only after TLS, keeps
the real client address for its logs and its authentication penalty, and still terminates TLS itself.

The configuration itself is rendered by gateway.dovecot_config (re-exported here).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import secrets
import signal
import time
from collections import deque
from pathlib import Path

from config.schema import GatewayConfig
from gateway.auth_throttle import AuthThrottle
from gateway.dovecot_config import (
    CONF_NAME,
    SQL_CONF_NAME,
    DovecotConfigError,
    DovecotError,
    MailDirUnreachable,
    MailUserMissing,
    free_loopback_port,
    instance_name,
    prepare_mail_dir,
    render_config,
    render_sql_config,
    write_private,
)
from gateway.imap_starttls import StartTlsGuard
from gateway.logsetup import conn_id

log = logging.getLogger(__name__)


# Restart back-off after an unexpected exit: doubles from the first value up to the last; reset after a stable run.
_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 30.0
_STABLE_AFTER = 60.0
_RELAY_CHUNK = 64 * 1024
_LOG_TAIL = 20
# Dovecot's auth process, with auth_verbose, logs each failed password check as `driver(user,rip,<session>): ...`.
# The user name there passed auth_username_chars (no comma nor parenthesis), and rip came from our PROXY header.
_AUTH_FAILURE = re.compile(r": \w+\(([^,()]*),([0-9A-Fa-f:.]+),<[^>]*>\): (?:Password mismatch|unknown user)")


class DovecotStartError(DovecotError):
    """Dovecot exited before it was ready; `log_tail` holds its last log lines."""

    def __init__(self, returncode: int | None, log_tail: tuple[str, ...]) -> None:
        self.returncode = returncode
        self.log_tail = log_tail
        last = log_tail[-1] if log_tail else "no log output"
        super().__init__(f"Dovecot exited with status {returncode} before it was ready: {last}")


class DovecotNotReady(DovecotError):
    """Dovecot did not accept LMTP and IMAP connections within the time allowed."""

    def __init__(self, timeout: float, log_tail: tuple[str, ...]) -> None:
        self.timeout = timeout
        self.log_tail = log_tail
        super().__init__(f"Dovecot was not ready after {timeout:.0f} s" + (f": {log_tail[-1]}" if log_tail else ""))


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A socket address's IP, without its zone, an IPv4-mapped IPv6 address as the IPv4 one."""
    ip = ipaddress.ip_address(host.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _proxy_header(peer: tuple[str, int], local: tuple[str, int]) -> bytes:
    """PROXY protocol v1 line (haproxy.org proxy-protocol.txt §2.1) with the client's real addresses."""
    src = _ip(peer[0])
    dst = _ip(local[0])
    if src.version != dst.version:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {peer[1]} {local[1]}\r\n".encode("ascii")


async def _refuse(writer: asyncio.StreamWriter, bye: bytes) -> None:
    """Answer with an untagged BYE (RFC 9051 §7.1.5) and close, without waiting long for a client that does not read."""
    with contextlib.suppress(OSError, TimeoutError):
        writer.write(bye)
        await asyncio.wait_for(writer.drain(), 5)
    writer.close()


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent (proc(5): the state follows the command name's parenthesis)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return status.rpartition(")")[2].split()[:1] != ["Z"]


class DovecotSupervisor:
    """Runs the embedded Dovecot (`binary -F -c dovecot.conf`) and the IMAP relay in front of it.

    start() writes the configuration, opens the IMAP listener and spawns Dovecot; wait_ready() returns once the LMTP
    socket and the IMAP port answer with their greetings. An unexpected exit is logged and followed by a restart
    after a back-off (0.5 s doubling to 30 s, reset after a minute of stable running); an exit before the first
    ready is a start failure (a configuration problem, not worth retrying). stop() sends SIGTERM, then SIGKILL
    after `stop_timeout`. Dovecot's log lines (it logs to stderr) are carried into this module's logger.
    """

    def __init__(self, cfg: GatewayConfig, *, ready_timeout: float = 30.0, stop_timeout: float = 10.0) -> None:
        self.cfg = cfg
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._relay: asyncio.Server | None = None
        self._relayed: set[asyncio.Task[None]] = set()
        self._ready = asyncio.Event()
        self._failed: DovecotError | None = None
        self._failed_event = asyncio.Event()
        self._stopping = False
        self._ever_ready = False
        self._log_tail: deque[str] = deque(maxlen=_LOG_TAIL)
        self._backend_port = 0
        self._imap_address: tuple[str, int] | None = None
        self._per_address: dict[str, int] = {}
        self._throttle = AuthThrottle(cfg.limits)

    @property
    def conf_path(self) -> Path:
        return self.cfg.mailboxes.base_dir / CONF_NAME

    @property
    def pid(self) -> int | None:
        """The Dovecot master's pid while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    @property
    def imap_address(self) -> tuple[str, int]:
        """Where IMAP clients connect (the port actually bound, useful when the configured one is 0)."""
        if self._imap_address is None:
            raise DovecotError("the IMAP listener is not open: call start() first")
        return self._imap_address

    @property
    def log_tail(self) -> tuple[str, ...]:
        return tuple(self._log_tail)

    async def start(self) -> None:
        """Check the mail user and directories, write the configuration, open the IMAP listener, spawn Dovecot."""
        mb = self.cfg.mailboxes
        await asyncio.to_thread(prepare_mail_dir, self.cfg)
        mb.base_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(mb.base_dir, 0o755)  # Dovecot wants it searchable by its login processes; the files are 0600
        (mb.base_dir / "state").mkdir(mode=0o700, exist_ok=True)
        self._backend_port = free_loopback_port()
        write_private(self.conf_path, render_config(self.cfg, backend_port=self._backend_port))
        write_private(mb.base_dir / SQL_CONF_NAME, render_sql_config(self.cfg))
        await self._reap_stale_instance()
        try:
            self._relay = await asyncio.start_server(self._relay_connection, mb.imap.host, mb.imap.port)
        except OSError as exc:
            raise DovecotError(f"cannot listen for IMAP on {mb.imap.host}:{mb.imap.port}: {exc.strerror or exc}"
                               " (mailboxes.imap)") from None
        sock = self._relay.sockets[0].getsockname()
        self._imap_address = (str(sock[0]), int(sock[1]))
        self._stopping = False
        try:
            await self._spawn()
        except OSError as exc:
            self._relay.close()
            raise DovecotError(f"cannot run {mb.binary}: {exc.strerror or exc}; install Dovecot with: apt-get install "
                               "dovecot-imapd dovecot-lmtpd dovecot-sqlite dovecot-pgsql (mailboxes.binary)") from None
        self._monitor = asyncio.create_task(self._supervise(), name="dovecot-supervisor")
        log.info("Dovecot %s starting (IMAP on %s:%d, LMTP on %s)", instance_name(self.cfg), *self._imap_address,
                 mb.lmtp_endpoint)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Return once Dovecot answers on LMTP and IMAP; raise DovecotStartError or DovecotNotReady otherwise."""
        limit = self.ready_timeout if timeout is None else timeout
        ready = asyncio.ensure_future(self._ready.wait())
        failed = asyncio.ensure_future(self._failed_event.wait())
        try:
            await asyncio.wait({ready, failed}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            failed.cancel()
        if self._ready.is_set():
            return
        if self._failed is not None:
            raise self._failed
        raise DovecotNotReady(limit, self.log_tail)

    async def stop(self) -> None:
        """Stop relaying, then Dovecot: SIGTERM, and SIGKILL if it has not exited after `stop_timeout`."""
        self._stopping = True
        if self._relay is not None:
            self._relay.close()
        for task in list(self._relayed):
            task.cancel()
        await asyncio.gather(*self._relayed, return_exceptions=True)
        if self._relay is not None:
            await self._relay.wait_closed()
            self._relay = None
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
            self._monitor = None
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.stop_timeout)
            except TimeoutError:
                log.warning("Dovecot did not stop within %.0f s of SIGTERM; killing it", self.stop_timeout)
                proc.kill()
                await proc.wait()
            log.info("Dovecot stopped (status %s)", proc.returncode)
        await self._end_pump()
        self._ready.clear()

    async def _end_pump(self) -> None:
        """Let the log pump read Dovecot's last lines; its children share the pipe, so bound the wait for EOF."""
        if self._pump is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._pump), self.stop_timeout)
        except TimeoutError:
            self._pump.cancel()
        await asyncio.gather(self._pump, return_exceptions=True)
        self._pump = None

    async def _spawn(self) -> None:
        self._ready.clear()
        self._proc = await asyncio.create_subprocess_exec(
            str(self.cfg.mailboxes.binary), "-F", "-c", str(self.conf_path),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C on the terminal reaches the gateway, which stops Dovecot in order
        )

    async def _supervise(self) -> None:
        backoff = _BACKOFF_FIRST
        while not self._stopping:
            proc = self._proc
            assert proc is not None
            started = time.monotonic()
            self._pump = asyncio.create_task(self._pump_log(proc))
            probe = asyncio.create_task(self._probe_until_ready(proc))
            try:
                code = await proc.wait()
            finally:
                probe.cancel()
                await asyncio.gather(probe, return_exceptions=True)
            await self._end_pump()
            self._ready.clear()
            if self._stopping:
                return
            if not self._ever_ready:
                self._failed = DovecotStartError(code, self.log_tail)
                self._failed_event.set()
                log.error("%s", self._failed)
                return
            if time.monotonic() - started > _STABLE_AFTER:
                backoff = _BACKOFF_FIRST
            log.warning("Dovecot exited unexpectedly (status %s); restarting in %.1f s", code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)
            if self._stopping:
                return
            self.restarts += 1
            try:
                await self._spawn()
            except OSError as exc:
                log.error("cannot restart Dovecot: %s", exc)
                return

    async def _pump_log(self, proc: asyncio.subprocess.Process) -> None:
        """Carry Dovecot's log lines into ours, at their own level (they never hold passwords nor bodies)."""
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            text = line.decode("utf-8", "replace").rstrip()
            self._log_tail.append(text)
            level = logging.INFO
            if ": Warning: " in text:
                level = logging.WARNING
            elif any(f": {w}: " in text for w in ("Error", "Fatal", "Panic")):
                level = logging.ERROR
            log.log(level, "dovecot: %s", text)
            if failure := _AUTH_FAILURE.search(text):
                self._throttle.failed(failure.group(2), failure.group(1))

    async def _probe_until_ready(self, proc: asyncio.subprocess.Process) -> None:
        while proc.returncode is None:
            if await self._answers():
                if not self._ever_ready:
                    log.info("Dovecot ready (pid %d)", proc.pid)
                else:
                    log.info("Dovecot ready again (pid %d, restart %d)", proc.pid, self.restarts)
                self._ever_ready = True
                self._ready.set()
                return
            await asyncio.sleep(0.1)

    async def _answers(self) -> bool:
        """Both greetings: `220` on the LMTP socket (RFC 2033 §4.1), `* OK` through the IMAP relay (RFC 9051 §7.1)."""
        lmtp = str(self.cfg.mailboxes.base_dir / "lmtp")
        host, port = self.imap_address
        try:
            r, w = await asyncio.wait_for(asyncio.open_unix_connection(lmtp), 2)
            try:
                lmtp_ok = (await asyncio.wait_for(r.readline(), 2)).startswith(b"220")
            finally:
                w.close()
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
            try:
                imap_ok = (await asyncio.wait_for(r.readline(), 2)).startswith(b"* OK")
            finally:
                w.close()
        except (OSError, TimeoutError):
            return False
        return lmtp_ok and imap_ok

    async def _reap_stale_instance(self) -> None:
        """A gateway killed with SIGKILL leaves its Dovecot running; stop that one (ours: same config) first.

        Its master may linger as a zombie until its new parent reaps it, and Dovecot would take the pid in
        master.pid for a running instance: once the process is dead or a zombie, the file goes too. Then wait for
        its LMTP socket to stop answering (its children exit when they notice their master is gone).
        """
        base = self.cfg.mailboxes.base_dir
        pidfile = base / "master.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        if _alive(pid):  # a zombie's cmdline is empty: for one, only the pid file is left to clear
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                cmdline = []
            if str(self.conf_path).encode() not in cmdline:
                return
            log.warning("stopping a Dovecot left over by a previous run (pid %d)", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout
            while _alive(pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                while _alive(pid):
                    await asyncio.sleep(0.05)
        pidfile.unlink(missing_ok=True)
        deadline = time.monotonic() + self.stop_timeout
        while time.monotonic() < deadline:
            try:
                _, w = await asyncio.open_unix_connection(str(base / "lmtp"))
            except OSError:
                return
            w.close()
            await asyncio.sleep(0.1)

    @property
    def connections(self) -> int:
        """IMAP connections the relay carries now."""
        return len(self._relayed)

    async def _relay_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn_id.set(f"imap-{secrets.token_hex(4)}")  # this task's own context: every line of the connection has it
        address = str(_ip(writer.get_extra_info("peername")[0]))
        refusal = self._over_limit(address)
        if refusal is not None:
            log.warning("IMAP client %s refused: %s", address, refusal)
            await _refuse(writer, f"* BYE [LIMIT] {refusal}, try again later\r\n".encode())
            return
        self._relayed.add(task)
        self._per_address[address] = self._per_address.get(address, 0) + 1
        try:
            await self._splice(reader, writer)
        except asyncio.CancelledError:
            writer.close()  # stop() ends the connections in flight; nothing to report
        finally:
            self._relayed.discard(task)
            left = self._per_address.pop(address) - 1
            if left:
                self._per_address[address] = left

    def _over_limit(self, address: str) -> str | None:
        """Why a new connection from `address` is refused (mailboxes.limits), or None.

        The relay counts before Dovecot sees anything: one address cannot take every login process, and the total
        stays under Dovecot's process limit, so a client over it gets an answer instead of a connection left hanging.
        An address with too many failed logins (`limits.auth_address_failures` within `auth_address_lockout`, the
        same rule as SMTP AUTH; counted from Dovecot's auth log) is refused until the oldest failure ages out: the
        penalty alone slows each try but not tries made in parallel over many connections.
        """
        lim = self.cfg.mailboxes.limits
        if len(self._relayed) >= lim.max_connections:
            return "Too many connections"
        if self._per_address.get(address, 0) >= lim.max_connections_per_ip:
            return "Too many connections from your address"
        # The login is not known yet (it comes inside TLS): only the lock on the address can apply here.
        if self._throttle.refusal(address, "") is not None:
            return "Too many failed logins from your address"
        return None

    async def _splice(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy bytes both ways between an IMAP client and Dovecot, after the PROXY header. TLS stays end to end;
        before it, what a client sends after STARTTLS and before Dovecot's answer is discarded (gateway.imap_starttls).

        IMAP has no use for half-closed connections: when either side ends, what it sent has been passed on (a
        server's BYE included), and both connections are closed.
        """
        peer = writer.get_extra_info("peername")
        local = writer.get_extra_info("sockname")
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self._backend_port)
        except OSError as exc:
            log.warning("IMAP client %s refused: Dovecot is not answering (%s)", peer[0], exc)
            await _refuse(writer, b"* BYE [UNAVAILABLE] The mailbox service is restarting, try again shortly\r\n")
            return
        up_w.write(_proxy_header((peer[0], peer[1]), (local[0], local[1])))
        guard = StartTlsGuard()

        async def from_client() -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(_RELAY_CHUNK):
                    discarded = guard.discarded
                    if data := guard.from_client(data):
                        up_w.write(data)
                        await up_w.drain()
                    if discarded == 0 and guard.discarded:  # said once per connection
                        log.warning("IMAP client %s sent bytes before STARTTLS was answered; discarded", peer[0])

        async def from_server() -> None:
            with contextlib.suppress(OSError):
                while data := await up_r.read(_RELAY_CHUNK):
                    guard.from_server(data)  # before the client sees a tagged OK, the relay knows TLS begins
                    writer.write(data)
                    await writer.drain()

        tasks = [asyncio.create_task(from_client()), asyncio.create_task(from_server())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for w in (up_w, writer):
                w.close()


__all__ = [
    "CONF_NAME", "SQL_CONF_NAME", "DovecotConfigError", "DovecotError", "DovecotNotReady", "DovecotStartError",
    "DovecotSupervisor", "MailDirUnreachable", "MailUserMissing", "instance_name", "prepare_mail_dir", "render_config",
    "render_sql_config",
]
