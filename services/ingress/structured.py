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
    """The events, with a `finished` whose answer does not match `schema` turned into a
    failure. An answer of tool calls (no text) is not an answer to check."""
    pieces: list[str] = []
    tool_calls = False
    async with contextlib.aclosing(batches):  # type: ignore[type-var]
        async for batch in batches:
            for index, event in enumerate(batch):
                kind = event.WhichOneof("event")
                if kind == "delta":
                    pieces.append(event.delta.text)
                    tool_calls = tool_calls or bool(event.delta.tool_calls_json)
                elif kind == "finished" and not (tool_calls and not any(pieces)):
                    problem = answer_problem("".join(pieces), schema, event.finished.finish_reason)
                    if problem is not None:
                        failure = ErrorDetail(code=ERROR_CODE_INVALID_OUTPUT, message=problem)
                        batch[index] = ClientEvent(failed=failure)
            yield batch
