"""`POST /v1/responses`: OpenAI's Responses API for plain text in and out, raced like chat.

The input (a string, or messages of text) and `instructions` (a system message) become a chat
request; the answer is one `message` output item of `output_text`, or, streamed, the event
sequence OpenAI sends (`response.created`, `response.in_progress`, `response.output_item.added`,
`response.content_part.added`, `response.output_text.delta`..., the `.done` events and
`response.completed`; `response.incomplete` when max_output_tokens cut it, `response.failed`
when the race failed after it began). Nothing is stored: `previous_response_id` and tools are
refused (400), not ignored."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import Response

from llooma.v1.common_pb2 import ErrorDetail
from llooma.v1.pipeline_pb2 import ChatRequest, ClientEvent
from services.ingress.answers import error_shape
from services.ingress.schema import ChatCompletionRequest, ChatMessageIn, TokenCount
from services.ingress.shapes import Failure


class InputText(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponsesRequest(BaseModel):
    """The fields of OpenAI's Responses request LLooMA honours; others are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=256)
    input: str | Annotated[list[InputMessage], Field(min_length=1, max_length=4096)]
    instructions: str | None = None
    stream: bool = False
    max_output_tokens: TokenCount | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    tools: Annotated[list[Any], Field(max_length=0)] | None = None
    previous_response_id: None = None

    @field_validator("tools", mode="before")
    @classmethod
    def _no_tools(cls, value: object) -> object:
        if isinstance(value, list) and value:
            raise ValueError("tools are not served on /v1/responses; use /v1/chat/completions")
        return value

    @field_validator("previous_response_id", mode="before")
    @classmethod
    def _nothing_stored(cls, value: object) -> object:
        if value is not None:
            raise ValueError("responses are not stored; send the whole conversation as input")
        return value

    def as_chat(self) -> ChatCompletionRequest:
        if isinstance(self.input, str):
            turns = [("user", self.input)]
        else:
            turns = [(message.role, message.text()) for message in self.input]
        if self.instructions is not None:
            turns.insert(0, ("system", self.instructions))
        fields: dict[str, Any] = {
            name: value
            for name, value in (
                ("max_tokens", self.max_output_tokens),
                ("temperature", self.temperature),
                ("top_p", self.top_p),
            )
            if value is not None
        }
        # Validated already: constructed, not re-validated.
        return ChatCompletionRequest.model_construct(
            model=self.model,
            stream=self.stream,
            messages=[ChatMessageIn.model_construct(role=r, content=c) for r, c in turns],
            **fields,
        )


def _usage(event: ClientEvent) -> dict[str, Any]:
    usage = event.finished.usage
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }


class Answer:
    """One response object as it grows: its ids, its status and its text."""

    def __init__(self, request_id: str, parsed: ChatCompletionRequest) -> None:
        self.id = f"resp_{request_id}"
        self.item_id = f"msg_{request_id}"
        self.parsed = parsed
        self.created_at = int(time.time())
        self.pieces: list[str] = []

    def item(self, status: str) -> dict[str, Any]:
        content = []
        if status != "in_progress":
            content = [{"type": "output_text", "text": "".join(self.pieces), "annotations": []}]
        return {
            "id": self.item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def body(self, status: str, finished: ClientEvent | None = None) -> dict[str, Any]:
        """`status`: in_progress, completed, incomplete or failed."""
        parsed = self.parsed
        output = []
        if status in ("completed", "incomplete"):
            output = [self.item(status)]
        error = None
        if finished is not None and finished.WhichOneof("event") == "failed":
            _, _, code = error_shape(finished.failed)
            error = {"code": code, "message": finished.failed.message or "the request failed"}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": parsed.model,
            "output": output,
            "usage": _usage(finished)
            if finished is not None and finished.WhichOneof("event") == "finished"
            else None,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": None,
            "max_output_tokens": parsed.max_tokens,
            "temperature": parsed.temperature,
            "top_p": parsed.top_p,
            "parallel_tool_calls": False,
            "tool_choice": "none",
            "tools": [],
            "text": {"format": {"type": "text"}},
            "metadata": {},
            "store": False,
        }


def _finished_status(event: ClientEvent) -> str:
    return "incomplete" if event.finished.finish_reason == "length" else "completed"


class Responses:
    def parse(self, text: str) -> ChatCompletionRequest:
        return ResponsesRequest.model_validate_json(text, strict=True).as_chat()

    def prepare(self, chat: ChatRequest) -> None:
        """A chat request as any other."""

    async def stream(
        self,
        request_id: str,
        parsed: ChatCompletionRequest,
        batches: AsyncGenerator[list[ClientEvent]],
    ) -> AsyncGenerator[bytes]:
        answer = Answer(request_id, parsed)
        events = _Events()
        yield (
            events.send("response.created", {"response": answer.body("in_progress")})
            + events.send("response.in_progress", {"response": answer.body("in_progress")})
            + events.send(
                "response.output_item.added",
                {"output_index": 0, "item": answer.item("in_progress")},
            )
            + events.send(
                "response.content_part.added",
                {
                    "item_id": answer.item_id,
                    "output_index": 0,
                    "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": []},
                },
            )
        )
        delta_head = (
            b'","item_id":"' + answer.item_id.encode() + b'","output_index":0,"content_index":0,'
        )
        async with contextlib.aclosing(batches):
            async for batch in batches:
                out = []
                for event in batch:
                    kind = event.WhichOneof("event")
                    if kind == "delta":
                        if event.delta.text:
                            answer.pieces.append(event.delta.text)
                            out.append(events.delta(delta_head, event.delta.text))
                    elif kind == "finished":
                        out.append(events.done(answer, event))
                    else:
                        out.append(
                            events.send(
                                "response.failed", {"response": answer.body("failed", event)}
                            )
                        )
                yield b"".join(out)

    async def collect(
        self,
        request_id: str,
        parsed: ChatCompletionRequest,
        batches: AsyncIterator[list[ClientEvent]],
        headers: dict[str, str],
        failure: Failure,
    ) -> Response:
        answer = Answer(request_id, parsed)
        async for batch in batches:
            for event in batch:
                kind = event.WhichOneof("event")
                if kind == "delta":
                    answer.pieces.append(event.delta.text)
                elif kind == "finished":
                    body = answer.body(_finished_status(event), event)
                    return Response(
                        orjson.dumps(body), media_type="application/json", headers=headers
                    )
                else:
                    return failure(event.failed, headers)
        return failure(ErrorDetail(message="stream ended early"), headers)


class _Events:
    """Server-sent events numbered as the Responses API numbers them."""

    def __init__(self) -> None:
        self.sequence = 0

    def send(self, kind: str, fields: dict[str, Any]) -> bytes:
        data = orjson.dumps({"type": kind, "sequence_number": self.sequence, **fields})
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def delta(self, head: bytes, text: str) -> bytes:
        number = str(self.sequence).encode()
        self.sequence += 1
        return (
            b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta'
            + head
            + b'"sequence_number":'
            + number
            + b',"delta":'
            + orjson.dumps(text)
            + b',"logprobs":[]}\n\n'
        )

    def done(self, answer: Answer, finished: ClientEvent) -> bytes:
        status = _finished_status(finished)
        text = "".join(answer.pieces)
        part = {"type": "output_text", "text": text, "annotations": []}
        where = {"item_id": answer.item_id, "output_index": 0, "content_index": 0}
        return (
            self.send("response.output_text.done", {**where, "text": text, "logprobs": []})
            + self.send("response.content_part.done", {**where, "part": part})
            + self.send(
                "response.output_item.done", {"output_index": 0, "item": answer.item(status)}
            )
            + self.send(f"response.{status}", {"response": answer.body(status, finished)})
        )


RESPONSES = Responses()
