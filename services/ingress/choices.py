"""A request's `n` choices as one answer. Each choice is its own race (the racer's
`run_choices`); their events arrive interleaved on the request's reply subject, each marked
with its `choice_index`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

from llooma.v1.common_pb2 import Usage
from llooma.v1.pipeline_pb2 import ClientDelta, ClientEvent, ClientFinished


async def merged(
    batches: AsyncGenerator[list[ClientEvent]], count: int
) -> AsyncGenerator[list[ClientEvent]]:
    """The events of `count` races as one request's: the later races' `started` dropped (the
    first one's made the headers), each choice's `finished` turned into a delta that finishes
    that choice, and the request's `finished` after the last choice's, with the usage of all
    (the prompt once, every choice's completion)."""
    finished = 0
    input_tokens = output_tokens = 0
    async with contextlib.aclosing(batches):
        async for batch in batches:
            out = []
            for event in batch:
                kind = event.WhichOneof("event")
                if kind == "started":
                    continue
                if kind != "finished":
                    out.append(event)
                    continue
                usage = event.finished.usage
                input_tokens = max(input_tokens, usage.input_tokens)
                output_tokens += usage.output_tokens
                done = ClientDelta(finish_reason=event.finished.finish_reason or "stop")
                out.append(ClientEvent(delta=done, choice_index=event.choice_index))
                finished += 1
                if finished == count:
                    total = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
                    out.append(ClientEvent(finished=ClientFinished(usage=total)))
            if out:
                yield out
