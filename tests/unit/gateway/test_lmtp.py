"""The LMTP client against scripted LMTP servers on loopback sockets: framing, replies, failures."""

from __future__ import annotations

import asyncio
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.lmtp import (
    CONNECTION_LOST,
    LmtpProtocolError,
    LmtpReply,
    LmtpUnavailable,
    deliver,
    dot_stuff,
    parse_reply,
)


def unstuff(payload: bytes) -> bytes:
    """What a server does with the DATA payload (RFC 5321 §4.5.2), written independently of the client."""
    assert payload.endswith(b"\r\n.\r\n") or payload == b".\r\n"
    out = []
    for line in payload[:-3].split(b"\r\n")[:-1] if payload != b".\r\n" else []:
        out.append(line[1:] if line.startswith(b".") else line)
    return b"".join(line + b"\r\n" for line in out)


@pytest.mark.parametrize(("message", "payload"), [
    (b"a\r\n.b\r\n", b"a\r\n..b\r\n.\r\n"),
    (b".\r\n", b"..\r\n.\r\n"),
    (b"..x\r\n", b"...x\r\n.\r\n"),
    (b"no final line end", b"no final line end\r\n.\r\n"),
    (b"bare\nlf\rcr\r\n", b"bare\r\nlf\r\ncr\r\n.\r\n"),
    (b"x\r\n.\r\ny\r\n", b"x\r\n..\r\ny\r\n.\r\n"),
])
def test_dot_stuff(message: bytes, payload: bytes) -> None:
    assert dot_stuff(message) == payload


@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=30))
def test_dot_stuffing_round_trips(lines: list[bytes]) -> None:
    message = b"".join(line + b"\r\n" for line in lines)
    payload = dot_stuff(message)
    assert payload.count(b"\r\n.\r\n") + payload.startswith(b".\r\n") == 1  # only the terminator is a lone dot
    assert unstuff(payload) == message


def test_parse_reply() -> None:
    assert parse_reply([b"250 2.1.5 OK\r\n"]) == LmtpReply(250, "2.1.5", "OK")
    assert parse_reply([b"550 5.1.1 <x@y> User doesn't exist: x@y\r\n"]).enhanced == "5.1.1"
    multi = parse_reply([b"452-4.2.2 Mailbox\r\n", b"452 4.2.2 is full\r\n"])
    assert multi == LmtpReply(452, "4.2.2", "Mailbox is full") and multi.transient and not multi.ok
    assert parse_reply([b"220 ready\r\n"]) == LmtpReply(220, None, "ready")
    assert parse_reply([b"250\r\n"]) == LmtpReply(250, None, "")
    assert parse_reply([b"250 5.1.1 class disagrees\r\n"]).enhanced is None  # RFC 3463: class matches the code
    for bad in ([b"25O ok\r\n"], [b"250-a\r\n", b"251 b\r\n"], [b"250-a\r\n"], [b"250 a\r\n", b"250 b\r\n"],
                [b"250x\r\n"]):
        with pytest.raises(ValueError, match=r"."):
            parse_reply(bad)


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, list[bytes]], Awaitable[None]]


async def serve(script: Script, path: Path) -> tuple[asyncio.Server, list[bytes]]:
    """A unix-socket server that runs `script` per connection and records every line the client sent."""
    seen: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await script(r, w, seen)
        finally:
            w.close()

    return await asyncio.start_unix_server(handle, str(path)), seen


async def lmtp_server(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes], *,
                      refuse: Collection[bytes] = (), data_replies: list[bytes] | None = None,
                      drop_after: int | None = None) -> None:
    """A minimal LMTP server (RFC 2033): refuses RCPTs in `refuse`, then answers DATA per accepted recipient."""
    w.write(b"220 test LMTP ready\r\n")
    accepted: list[bytes] = []
    while line := await r.readline():
        seen.append(line)
        verb = line[:4].upper()
        if verb == b"LHLO":
            w.write(b"250-test\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 PIPELINING\r\n")
        elif verb == b"MAIL":
            w.write(b"250 2.1.0 OK\r\n")
        elif verb == b"RCPT":
            rcpt = line[9:].strip().strip(b"<>")
            if rcpt in refuse:
                w.write(b"550 5.1.1 <" + rcpt + b"> User doesn't exist\r\n")
            else:
                accepted.append(rcpt)
                w.write(b"250 2.1.5 OK\r\n")
        elif verb == b"DATA":
            w.write(b"354 OK\r\n")
            body = []
            while (chunk := await r.readline()) != b".\r\n":
                body.append(chunk)
            seen.append(b"BODY:" + b"".join(body))
            replies = data_replies or [b"250 2.0.0 <" + a + b"> Saved\r\n" for a in accepted]
            for i, reply in enumerate(replies):
                if drop_after is not None and i == drop_after:
                    return
                w.write(reply)
        elif verb == b"QUIT":
            w.write(b"221 2.0.0 Bye\r\n")
            await w.drain()
            return
        await w.drain()


@pytest.fixture
async def sock_dir() -> AsyncIterator[Path]:
    """Under /tmp: a unix socket path must stay under 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="lmtp-", dir="/tmp") as d:
        yield Path(d)


async def test_per_recipient_replies_in_order(sock_dir: Path) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        await lmtp_server(r, w, seen, refuse={b"ghost@x.test"},
                          data_replies=[b"250 2.0.0 saved a\r\n", b"452 4.2.2 Mailbox full\r\n"])

    server, seen = await serve(script, sock_dir / "s")
    async with server:
        message = b"Subject: t\r\n\r\n.dot line\r\nd\xc3\xa9j\xc3\xa0\r\n"
        replies = await deliver(f"unix:{sock_dir / 's'}", "", ["a@x.test", "ghost@x.test", "b@x.test", "a@x.test"],
                                message, timeout=5, helo="gw.test")
    assert list(replies) == ["a@x.test", "ghost@x.test", "b@x.test"]
    assert replies["a@x.test"] == LmtpReply(250, "2.0.0", "saved a")
    assert replies["ghost@x.test"].code == 550 and not replies["ghost@x.test"].transient
    assert replies["b@x.test"].transient and replies["b@x.test"].enhanced == "4.2.2"
    assert seen[0] == b"LHLO gw.test\r\n"
    assert seen[1] == b"MAIL FROM:<> BODY=8BITMIME\r\n"  # null reverse-path; 8-bit content declared (RFC 6152)
    assert [s for s in seen if s.startswith(b"BODY:")] == [b"BODY:Subject: t\r\n\r\n..dot line\r\nd\xc3\xa9j\xc3\xa0\r\n"]


async def test_connection_lost_after_data_leaves_the_rest_transient(sock_dir: Path) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        await lmtp_server(r, w, seen, drop_after=1)

    server, _ = await serve(script, sock_dir / "s")
    async with server:
        replies = await deliver(f"unix:{sock_dir / 's'}", "s@x.test", ["a@x.test", "b@x.test", "c@x.test"],
                                b"x\r\n", timeout=5)
    assert replies["a@x.test"].ok
    assert replies["b@x.test"] == CONNECTION_LOST == replies["c@x.test"] and CONNECTION_LOST.transient


async def test_all_recipients_refused_skips_data(sock_dir: Path) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        await lmtp_server(r, w, seen, refuse={b"a@x.test"})

    server, seen = await serve(script, sock_dir / "s")
    async with server:
        replies = await deliver(f"unix:{sock_dir / 's'}", "s@x.test", ["a@x.test"], b"x\r\n", timeout=5)
    assert replies["a@x.test"].code == 550
    assert not any(line.startswith(b"DATA") for line in seen)


async def test_greeting_refused_is_a_typed_error(sock_dir: Path) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        w.write(b"421 4.3.2 Shutting down\r\n")
        await w.drain()

    server, _ = await serve(script, sock_dir / "s")
    async with server:
        with pytest.raises(LmtpProtocolError) as info:
            await deliver(f"unix:{sock_dir / 's'}", "s@x.test", ["a@x.test"], b"x\r\n", timeout=5)
    assert info.value.transient and info.value.reply is not None and info.value.reply.code == 421


async def test_close_before_data_is_unavailable(sock_dir: Path) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        w.write(b"220 ready\r\n")
        await w.drain()
        await r.readline()

    server, _ = await serve(script, sock_dir / "s")
    async with server:
        with pytest.raises(LmtpUnavailable, match="closed"):
            await deliver(f"unix:{sock_dir / 's'}", "s@x.test", ["a@x.test"], b"x\r\n", timeout=5)


async def test_silent_server_times_out(sock_dir: Path) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        await r.read()

    server, _ = await serve(script, sock_dir / "s")
    async with server:
        with pytest.raises(LmtpUnavailable, match="no reply"):
            await deliver(f"unix:{sock_dir / 's'}", "s@x.test", ["a@x.test"], b"x\r\n", timeout=0.2)


async def test_nothing_listening_is_unavailable(sock_dir: Path) -> None:
    with pytest.raises(LmtpUnavailable) as info:
        await deliver(f"unix:{sock_dir / 'absent'}", "s@x.test", ["a@x.test"], b"x\r\n", timeout=5)
    assert info.value.transient
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LmtpUnavailable):
        await deliver(f"127.0.0.1:{port}", "s@x.test", ["a@x.test"], b"x\r\n", timeout=5)


async def test_tcp_endpoint(sock_dir: Path) -> None:
    seen: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await lmtp_server(r, w, seen)
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        replies = await deliver(f"127.0.0.1:{port}", "s@x.test", ["a@x.test"], b"plain\r\n", timeout=5)
    assert replies["a@x.test"].ok
    assert b"MAIL FROM:<s@x.test>\r\n" in seen  # 7-bit: no BODY parameter


async def test_header_injection_refused() -> None:
    with pytest.raises(ValueError, match="control"):
        await deliver("unix:/nonexistent", "s@x.test", ["a@x.test>\r\nRCPT TO:<b@x.test"], b"x\r\n")
