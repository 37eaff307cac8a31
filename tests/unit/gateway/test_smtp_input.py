"""What the SMTP listeners read (gateway/smtp_input.py): strict command lines, and DATA within its limits."""

from __future__ import annotations

import asyncio

import pytest

from config.schema import LimitsConfig
from gateway.smtp_input import (
    BARE_LINE_END,
    BUSY,
    LINE_TOO_LONG,
    CommandLineError,
    DataReceiver,
    MemoryBudget,
    StrictLineReader,
)


def reader_with(data: bytes) -> StrictLineReader:
    reader = StrictLineReader(limit=1001)
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def receive(data: bytes, budget: MemoryBudget | None = None, **limits: int) -> tuple[bytes | str, list[float]]:
    timers: list[float] = []
    receiver = DataReceiver(reader_with(data), LimitsConfig(**limits), budget or MemoryBudget(), timers.append,
                            asyncio.get_running_loop().time)
    content = await receiver.receive()
    receiver.release()
    return content, timers


async def test_command_lines_end_in_crlf_only() -> None:
    reader = reader_with(b"NOOP\r\nNOOP\nRSET\rQUIT\r\n")
    assert await reader.readuntil() == b"NOOP\r\n"
    with pytest.raises(CommandLineError) as bare_lf:
        await reader.readuntil()
    with pytest.raises(CommandLineError):
        await reader.readuntil()
    assert bare_lf.value.reply == BARE_LINE_END


async def test_the_tail_of_an_overlong_command_is_not_a_bare_lf() -> None:
    reader = reader_with(b"EHLO " + b"a" * 2000 + b"\r\nNOOP\r\n")
    with pytest.raises(asyncio.LimitOverrunError) as overrun:
        await reader.readuntil()
    await reader.read(overrun.value.consumed)
    while True:  # what aiosmtpd does: drain the long line, whatever its pieces look like
        try:
            await reader.readuntil()
            break
        except asyncio.LimitOverrunError as more:
            await reader.read(more.consumed)
    assert await reader.readuntil() == b"NOOP\r\n"


async def test_data_is_unstuffed_and_ends_only_at_crlf_dot_crlf() -> None:
    content, timers = await receive(b"a\r\n..b\r\nc\n.\nd\r.\r\n.\r\n", data_timeout=7)
    assert content == b"a\r\n.b\r\nc\n.\nd\r.\r\n"
    assert timers and all(0 < t <= 7 for t in timers)


async def test_data_over_the_size_limit_is_read_to_the_end_and_refused() -> None:
    budget = MemoryBudget()
    content, _ = await receive((b"x" * 98 + b"\r\n") * 50 + b".\r\n", budget, max_message_size=1024)
    assert content == "552 5.3.4 Message too big: the limit is 1024 bytes"
    assert budget.held == 0


async def test_a_long_line_without_crlf_is_dropped_as_it_comes() -> None:
    content, _ = await receive(b"Subject: x\r\n\r\n" + b"y" * 100_000 + b"\r\n.\r\n")
    assert content == LINE_TOO_LONG


async def test_the_listener_budget_is_shared_and_given_back() -> None:
    budget = MemoryBudget()
    budget.held = 900  # another connection's DATA
    content, _ = await receive(b"z" * 198 + b"\r\n.\r\n", budget, max_buffered_data=1000)
    assert content == BUSY
    assert budget.held == 900
    budget.held = 0
    content, _ = await receive(b"z" * 198 + b"\r\n.\r\n", budget, max_buffered_data=1000)
    assert content == b"z" * 198 + b"\r\n"
    assert budget.held == 0  # released after use


async def test_the_whole_data_has_a_deadline() -> None:
    timers: list[float] = []
    clock = iter([0.0, 0.0, 5.0, 9.5])
    reader = StrictLineReader(limit=1001)
    receiver = DataReceiver(reader, LimitsConfig(data_timeout=300, max_data_duration=10),
                            MemoryBudget(), timers.append, lambda: next(clock))

    async def feed() -> None:  # one line per read
        for part in (b"a\r\n", b"b\r\n", b".\r\n"):
            await asyncio.sleep(0)
            reader.feed_data(part)

    feeding = asyncio.create_task(feed())
    assert await receiver.receive() == b"a\r\nb\r\n"
    await feeding
    assert timers == [10.0, 5.0, 0.5]  # the time left, never more than data_timeout


async def test_lines_that_arrived_together_are_taken_together_and_the_rest_stays() -> None:
    """One read takes every complete line already received (one timer for them); what follows the final dot
    is left for the commands that come next (pipelining), and a line past the limit among them is still
    refused."""
    timers: list[float] = []
    lines = b"".join(b"..line %d\r\n" % i for i in range(300))
    reader = reader_with(lines + b".\r\nQUIT\r\n")
    receiver = DataReceiver(reader, LimitsConfig(), MemoryBudget(), timers.append, asyncio.get_running_loop().time)
    assert await receiver.receive() == lines.replace(b"..", b".")
    assert len(timers) == 1
    assert await reader.readuntil(b"\r\n") == b"QUIT\r\n"
    content, _ = await receive(b"a\r\n" + b"y" * 2000 + b"\r\n.\r\n")
    assert content == LINE_TOO_LONG
