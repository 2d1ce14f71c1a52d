"""`POST /v1/completions`: OpenAI's legacy text completions, raced like chat.

The prompt travels as one user message of a `TASK_KIND_TEXT_COMPLETION` request, never split;
a host with the `openai` backend sends it to its engine's own `/v1/completions` as the raw
prompt (no chat template), and a local backend answers it as that user message. The answer is
a `text_completion` (`choices[].text`), streamed in chunks of that shape."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated

import orjson
from pydantic import Field, field_validator
from starlette.responses import Response

from llooma.planning import bypass_plan
from llooma.v1.common_pb2 import TASK_KIND_TEXT_COMPLETION, ErrorDetail
from llooma.v1.pipeline_pb2 import ChatRequest, ClientEvent
from services.ingress.answers import sse_error, usage_json
from services.ingress.schema import (
    ChatCompletionRequest,
    ChatMessageIn,
    OnlyOne,
    SamplingRequest,
)
from services.ingress.shapes import Failure


class CompletionRequest(SamplingRequest):
    """The fields of OpenAI's completions request LLooMA honours; others are ignored."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    n: OnlyOne = 1
    # The prompt is not repeated in the answer.
    echo: bool = Field(default=False, json_schema_extra={"const": False})

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not served: the answer never repeats the prompt")
        return value

    def as_chat(self) -> ChatCompletionRequest:
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        fields = self.model_dump(exclude={"prompt", "echo"}, exclude_none=True)
        # Validated already, field by field the same as chat's: constructed, not re-validated.
        return ChatCompletionRequest.model_construct(
            messages=[ChatMessageIn.model_construct(role="user", content=prompt)],
            stream_options=self.stream_options,
            **{name: value for name, value in fields.items() if name != "stream_options"},
        )


class TextCompletions:
    def parse(self, text: str) -> ChatCompletionRequest:
        return CompletionRequest.model_validate_json(text, strict=True).as_chat()

    def prepare(self, chat: ChatRequest) -> None:
        chat.kind = TASK_KIND_TEXT_COMPLETION
        chat.plan.CopyFrom(bypass_plan("a text completion is never split"))

    async def stream(
        self,
        request_id: str,
        parsed: ChatCompletionRequest,
        batches: AsyncGenerator[list[ClientEvent]],
    ) -> AsyncGenerator[bytes]:
        include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        head = (
            b'data: {"id":"cmpl-' + request_id.encode() + b'","object":"text_completion",'
            b'"created":'
            + str(int(time.time())).encode()
            + b',"model":'
            + orjson.dumps(parsed.model)
            + b","
        )
        async with contextlib.aclosing(batches):
            async for batch in batches:
                yield b"".join(_chunk(head, event, include_usage) for event in batch)

    async def collect(
        self,
        request_id: str,
        parsed: ChatCompletionRequest,
        batches: AsyncIterator[list[ClientEvent]],
        headers: dict[str, str],
        failure: Failure,
    ) -> Response:
        pieces = []
        async for batch in batches:
            for event in batch:
                kind = event.WhichOneof("event")
                if kind == "delta":
                    pieces.append(event.delta.text)
                elif kind == "finished":
                    body = {
                        "id": f"cmpl-{request_id}",
                        "object": "text_completion",
                        "created": int(time.time()),
                        "model": parsed.model,
                        "choices": [
                            {
                                "text": "".join(pieces),
                                "index": 0,
                                "logprobs": None,
                                "finish_reason": event.finished.finish_reason or "stop",
                            }
                        ],
                        "usage": usage_json(event),
                    }
                    return Response(
                        orjson.dumps(body), media_type="application/json", headers=headers
                    )
                else:
                    return failure(event.failed, headers)
        return failure(ErrorDetail(message="stream ended early"), headers)


def _chunk(head: bytes, event: ClientEvent, include_usage: bool) -> bytes:
    kind = event.WhichOneof("event")
    if kind == "delta":
        if not event.delta.text:
            # Reasoning has no place in a text completion.
            return b""
        return (
            head
            + b'"choices":[{"text":'
            + orjson.dumps(event.delta.text)
            + b',"index":0,"logprobs":null,"finish_reason":null}]}\n\n'
        )
    if kind == "finished":
        finish = orjson.dumps(event.finished.finish_reason or "stop")
        parts = [
            head
            + b'"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":'
            + finish
            + b"}]}\n\n"
        ]
        if include_usage:
            parts.append(
                head + b'"choices":[],"usage":' + orjson.dumps(usage_json(event)) + b"}\n\n"
            )
        parts.append(b"data: [DONE]\n\n")
        return b"".join(parts)
    return sse_error(event.failed)


TEXT_COMPLETIONS = TextCompletions()
