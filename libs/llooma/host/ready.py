"""Coalescing without waiting: an async iterator's items taken in batches of what is ready.

A backend yields one piece per engine token; pieces parsed from one upstream read come out
back to back, with no suspension between them. `ready_batches` hands over every item the
iterator produces before it next has to wait, as one list: a host then sends one message per
loop turn, not one per token, and an item that came alone still goes out at once.

It drives each `__anext__` step by hand: an item produced without suspending joins the batch;
a step that suspends first releases the batch, then is awaited to its end by passing the
awaitables it yields up to the running task, as `await` itself would.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Coroutine, Generator
from typing import Any, TypeVar

Item = TypeVar("Item")


async def ready_batches(items: AsyncIterator[Item]) -> AsyncGenerator[list[Item], None]:
    """Every item in order, in lists of those that were ready together; never an empty list."""
    batch: list[Item] = []
    while True:
        step: Coroutine[Any, Any, Item] = items.__anext__()  # type: ignore[assignment]
        try:
            suspended_on = step.send(None)
        except StopIteration as produced:
            batch.append(produced.value)
            continue
        except StopAsyncIteration:
            if batch:
                yield batch
            return
        if batch:
            try:
                yield batch
            except BaseException:
                # The consumer stopped (closed, cancelled) while this step was parked: end the
                # source's frame there, so its cleanup runs and it can be closed.
                with contextlib.suppress(BaseException):
                    step.throw(GeneratorExit)
                raise
            batch = []
        try:
            batch.append(await _Resumed(step, suspended_on))
        except StopAsyncIteration:
            return


class _Resumed(Awaitable[Item]):
    """The rest of a coroutine that already ran up to its first suspension."""

    __slots__ = ("_first", "_step")

    def __init__(self, step: Coroutine[Any, Any, Item], first: Any) -> None:
        self._step = step
        self._first = first

    def __await__(self) -> Generator[Any, Any, Item]:
        step = self._step
        yielded = self._first
        while True:
            try:
                sent = yield yielded
            except BaseException as error:  # a cancellation, thrown in by the task
                try:
                    yielded = step.throw(error)
                except StopIteration as produced:
                    return produced.value  # type: ignore[no-any-return]
                continue
            try:
                yielded = step.send(sent)
            except StopIteration as produced:
                return produced.value  # type: ignore[no-any-return]
