"""Structured output a client can rely on: the schema of a `json_schema` response_format is
checked when the request arrives, and the finished answer against it before the request ends
cleanly. An answer that does not match ends as an error (`invalid_structured_output`), in
the stream as its last event and as a 502 otherwise, never as a clean finish."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import jsonschema_rs
import orjson

from llooma.v1.common_pb2 import ERROR_CODE_INVALID_OUTPUT, ErrorDetail
from llooma.v1.pipeline_pb2 import ClientEvent


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why `schema` is not a JSON Schema (of the draft its `$schema` names; 2020-12, OpenAI's,
    when it names none), or None."""
    try:
        jsonschema_rs.meta.validate(schema)
        jsonschema_rs.validator_for(schema)
    except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, ValueError) as error:
        return str(getattr(error, "message", error))
    return None


def answer_problem(text: str, schema: dict[str, Any], finish_reason: str) -> str | None:
    """Why the answer `text` does not match `schema`, or None when it does."""
    cut = " (the answer was cut at max_tokens)" if finish_reason == "length" else ""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        return f"the answer is not JSON{cut}: {error}"
    for mismatch in jsonschema_rs.validator_for(schema).iter_errors(value):
        where = "/".join(str(part) for part in mismatch.instance_path) or "its top level"
        return f"the answer does not match the json_schema at {where}{cut}: {mismatch.message}"
    return None


async def checked(
    batches: AsyncIterator[list[ClientEvent]], schema: dict[str, Any]
) -> AsyncGenerator[list[ClientEvent]]:
    """The events, up to the first answer that does not match `schema`, which becomes a
    failure (and ends them). Each choice is checked when it finishes: by its own finishing
    delta when there are several, by the request's `finished` otherwise. An answer of tool
    calls (no text) is not an answer to check."""
    pieces: dict[int, list[str]] = {}
    tool_calls: set[int] = set()
    checked_choices: set[int] = set()

    def problem(choice: int, finish_reason: str) -> str | None:
        checked_choices.add(choice)
        text = "".join(pieces.get(choice, ()))
        if choice in tool_calls and not text:
            return None
        return answer_problem(text, schema, finish_reason)

    async with contextlib.aclosing(batches):  # type: ignore[type-var]
        async for batch in batches:
            for index, event in enumerate(batch):
                kind = event.WhichOneof("event")
                found = None
                if kind == "delta":
                    delta = event.delta
                    if delta.finish_reason:
                        found = problem(event.choice_index, delta.finish_reason)
                    else:
                        pieces.setdefault(event.choice_index, []).append(delta.text)
                        if delta.tool_calls_json:
                            tool_calls.add(event.choice_index)
                elif kind == "finished" and 0 not in checked_choices:
                    found = problem(0, event.finished.finish_reason)
                if found is not None:
                    failure = ErrorDetail(code=ERROR_CODE_INVALID_OUTPUT, message=found)
                    yield [*batch[:index], ClientEvent(failed=failure)]
                    return
            yield batch
