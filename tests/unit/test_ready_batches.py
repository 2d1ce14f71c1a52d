"""`ready_batches`: what an async iterator produces without waiting goes out as one batch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from llooma.host.ready import ready_batches


async def reads(groups: list[list[str]], pause_s: float = 0.0) -> AsyncIterator[str]:
    """Like a backend: one upstream read per group (a real suspension), its pieces back to back."""
    for group in groups:
        await asyncio.sleep(pause_s)
        for piece in group:
            yield piece


async def collect(items: AsyncIterator[str]) -> list[list[str]]:
    return [batch async for batch in ready_batches(items)]


async def test_pieces_of_one_read_go_out_together_and_reads_apart() -> None:
    groups = [["a"], ["b", "c", "d"], ["e", "f"]]
    assert await collect(reads(groups, 0.001)) == groups


async def test_a_burst_with_no_suspension_is_one_batch() -> None:
    async def burst() -> AsyncIterator[str]:
        for piece in "abcdefgh":
            yield piece

    assert await collect(burst()) == [list("abcdefgh")]


async def test_an_empty_iterator_gives_no_batch() -> None:
    assert await collect(reads([[]])) == []
    assert await collect(reads([])) == []


async def test_the_end_after_a_suspension_ends_cleanly() -> None:
    async def then_wait() -> AsyncIterator[str]:
        yield "a"
        await asyncio.sleep(0.001)

    assert await collect(then_wait()) == [["a"]]


async def test_sleep_zero_is_a_turn_of_the_loop() -> None:
    # The synthetic host's zero-latency pace: every sleep(0) releases what came before it.
    assert await collect(reads([["a", "b"], ["c"]], 0.0)) == [["a", "b"], ["c"]]


async def test_an_error_comes_after_the_pieces_before_it() -> None:
    async def fails() -> AsyncIterator[str]:
        yield "a"
        await asyncio.sleep(0.001)
        yield "b"
        raise ValueError("upstream broke")

    seen: list[list[str]] = []

    async def consume() -> None:
        async for batch in ready_batches(fails()):
            seen.append(batch)

    with pytest.raises(ValueError, match="upstream broke"):
        await consume()
    assert seen == [["a"]]  # "b" was ready together with the error: the failure wins


async def test_cancelling_the_consumer_cancels_the_pending_read_and_closes_the_source() -> None:
    closed = asyncio.Event()
    waiting = asyncio.Event()

    async def slow() -> AsyncGenerator[str, None]:
        try:
            yield "a"
            waiting.set()
            await asyncio.sleep(30)
            yield "b"
        finally:
            closed.set()

    got: list[list[str]] = []

    async def consume() -> None:
        source = slow()
        async with contextlib.aclosing(source):
            async for batch in ready_batches(source):
                got.append(batch)

    task = asyncio.create_task(consume())
    await asyncio.wait_for(waiting.wait(), 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert got == [["a"]]
    assert closed.is_set()


async def test_a_consumer_that_stops_early_can_still_close_the_source() -> None:
    closed = asyncio.Event()

    async def source() -> AsyncGenerator[str, None]:
        try:
            yield "a"
            await asyncio.sleep(0.001)
            yield "b"
        finally:
            closed.set()

    pieces = source()
    async with contextlib.aclosing(pieces):
        batches = ready_batches(pieces)
        assert await batches.__anext__() == ["a"]
        await batches.aclose()
    assert closed.is_set()
