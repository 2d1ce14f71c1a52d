"""The OpenAI-compatible request body, validated strictly, and OpenAI-shaped errors."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from starlette.responses import Response

from llooma.v1.common_pb2 import ChatMessage, GenerationParams


def _integral(value: object) -> object:
    # JSON Schema (and so the OpenAPI description) counts 8.0 as an integer; 8.5 stays refused.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


TokenCount = Annotated[int, Field(ge=1, le=1_000_000), BeforeValidator(_integral)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1), BeforeValidator(_integral)]
MAX_STOP_SEQUENCES = 4
OnlyOne = Annotated[int, Field(ge=1, le=1), BeforeValidator(_integral)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


def _content_rule(schema: dict[str, Any]) -> None:
    # The validator's rule below, for the OpenAPI description: content, not null, unless the
    # message is the assistant's.
    schema["anyOf"] = [
        {"properties": {"role": {"const": "assistant"}}},
        {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
    ]


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=_content_rule)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    @model_validator(mode="after")
    def _content_given(self) -> ChatMessageIn:
        # As OpenAI: only an assistant message may leave its content out (or null).
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (a string or text parts)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """Fields LLooMA honours; others a client may send are ignored, as OpenAI clients expect."""

    # NaN and Infinity are not JSON: refused as such, not as a number out of range.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=4096)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: Seed | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    n: OnlyOne = 1

    @field_validator("stop", mode="before")
    @classmethod
    def _at_most_four_stops(cls, value: object) -> object:
        # Before the union is tried, so the message names the rule, not a type.
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return value

    def messages_proto(self) -> list[ChatMessage]:
        return [ChatMessage(role=m.role, content=m.text()) for m in self.messages]

    def params_proto(self) -> GenerationParams:
        """The sampling parameters with presence kept: what the client left out stays unset
        on the wire (host default) and an explicit 0 stays 0."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        params = GenerationParams(stop=stop)
        max_tokens = self.max_completion_tokens or self.max_tokens
        if max_tokens is not None:
            params.max_tokens = max_tokens
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None:
                setattr(params, name, value)
        if self.seed is not None:
            params.seed = self.seed
        return params


def describe_validation_error(error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return f"malformed JSON: {first['msg']}"
    location = ".".join(str(part) for part in first["loc"]) or "body"
    return f"invalid field '{location}': {first['msg']}"


def error_response(
    status: int,
    message: str,
    *,
    error_type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = {"error": {"message": message, "type": error_type, "code": code, "param": param}}
    return Response(
        orjson.dumps(body), status_code=status, media_type="application/json", headers=headers
    )
