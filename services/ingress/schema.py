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
    WithJsonSchema,
    field_validator,
    model_validator,
)
from starlette.responses import Response

from llooma.v1.common_pb2 import ChatMessage, GenerationParams
from services.ingress.structured import schema_problem


def _integral(value: object) -> object:
    # JSON Schema (and so the OpenAPI description) counts 8.0 as an integer; 8.5 stays refused.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


TokenCount = Annotated[int, Field(ge=1, le=1_000_000), BeforeValidator(_integral)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1), BeforeValidator(_integral)]
MAX_STOP_SEQUENCES = 4
# Each choice is its own race of k hosts: a bound on what one request may set in motion.
MAX_CHOICES = 8
Choices = Annotated[int, Field(ge=1, le=MAX_CHOICES), BeforeValidator(_integral)]
# Where only one choice is served (text completions).
OnlyOne = Annotated[int, Field(ge=1, le=1), BeforeValidator(_integral)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    name: str = Field(min_length=1, max_length=256)
    arguments: str


class ToolCallIn(BaseModel):
    """An assistant turn's tool call, as the client got it from us (or OpenAI)."""

    model_config = ConfigDict(extra="allow", strict=True)

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class FunctionIn(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolIn(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["function"]
    function: FunctionIn


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    name: str = Field(min_length=1, max_length=64)


class ToolChoiceIn(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["function"]
    function: NamedFunction


_SCHEMA_TYPES = ["object", "array", "string", "number", "integer", "boolean", "null"]
# For the OpenAPI description: the keywords a JSON Schema's validity mostly turns on, so that
# what the description allows is a schema the meta-schema check (`schema_problem`) accepts.
_JSON_SCHEMA_SHAPE: dict[str, Any] = {
    "anyOf": [
        {"type": "null"},
        {
            "type": "object",
            "description": "A JSON Schema (draft 2020-12 unless its `$schema` names another)",
            "properties": {
                "type": {
                    "anyOf": [
                        {"enum": _SCHEMA_TYPES},
                        {"type": "array", "items": {"enum": _SCHEMA_TYPES}, "uniqueItems": True},
                    ]
                },
                "properties": {"type": "object", "additionalProperties": {"type": "object"}},
                "required": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                "additionalProperties": {"type": ["boolean", "object"]},
                "items": {"type": ["boolean", "object"]},
                "enum": {"type": "array"},
                "title": {"type": "string"},
                "description": {"type": "string"},
            },
        },
    ]
}


def _request_rules(schema: dict[str, Any]) -> None:
    # The validator's cross-field rules below, for the OpenAPI description.
    schema["allOf"] = [
        {
            "anyOf": [
                {"properties": {"top_logprobs": {"type": "null"}}},
                {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
            ]
        },
        {
            "anyOf": [
                {"properties": {"tool_choice": {"enum": [None, "none"]}}},
                {"required": ["tools"], "properties": {"tools": {"type": "array"}}},
            ]
        },
    ]


class JsonSchemaIn(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    # `schema` shadows a BaseModel attribute, hence the alias.
    json_schema: Annotated[dict[str, Any] | None, WithJsonSchema(_JSON_SCHEMA_SHAPE)] = Field(
        default=None, alias="schema"
    )
    strict: bool | None = None

    @field_validator("json_schema")
    @classmethod
    def _a_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            problem = schema_problem(value)
            if problem is not None:
                raise ValueError(f"not a valid JSON Schema: {problem}")
        return value


def _response_format_rule(schema: dict[str, Any]) -> None:
    # The validator's rule below, for the OpenAPI description (the fuzz test sends what it allows).
    schema["anyOf"] = [
        {"properties": {"type": {"enum": ["text", "json_object"]}}},
        {"required": ["json_schema"], "properties": {"json_schema": {"not": {"type": "null"}}}},
    ]


class ResponseFormatIn(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra=_response_format_rule)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaIn | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormatIn:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


def _message_rules(schema: dict[str, Any]) -> None:
    # The validator's rules below, for the OpenAPI description: content, not null, unless the
    # message is the assistant's; a tool message names its call; only the assistant's calls.
    schema["allOf"] = [
        {
            "anyOf": [
                {"properties": {"role": {"const": "assistant"}}},
                {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
            ]
        },
        {
            "anyOf": [
                {"properties": {"role": {"not": {"const": "tool"}}}},
                {"required": ["tool_call_id"], "properties": {"tool_call_id": {"type": "string"}}},
            ]
        },
        {
            "anyOf": [
                {"properties": {"role": {"const": "assistant"}}},
                {"properties": {"tool_calls": {"type": "null"}}},
            ]
        },
    ]


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=_message_rules)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallIn] | None = Field(default=None, min_length=1, max_length=128)
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=256)
    name: str | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _content_given(self) -> ChatMessageIn:
        # As OpenAI: only an assistant message may leave its content out (or null).
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (a string or text parts)")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message carries tool_calls")
        return self

    def proto(self) -> ChatMessage:
        message = ChatMessage(role=self.role, content=self.text())
        if self.tool_calls is not None:
            message.tool_calls_json = _json(
                [c.model_dump(exclude_unset=True) for c in self.tool_calls]
            )
        if self.tool_call_id is not None:
            message.tool_call_id = self.tool_call_id
        if self.name is not None:
            message.name = self.name
        return message

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What every raced request takes alike: the model, streaming and how to sample. Fields
    LLooMA honours; others a client may send are ignored, as OpenAI clients expect."""

    # NaN and Infinity are not JSON: refused as such, not as a number out of range.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: TokenCount | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: Seed | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)

    @field_validator("stop", mode="before")
    @classmethod
    def _at_most_four_stops(cls, value: object) -> object:
        # Before the union is tried, so the message names the rule, not a type.
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return value


class ChatCompletionRequest(SamplingRequest):
    model_config = ConfigDict(json_schema_extra=_request_rules)

    messages: list[ChatMessageIn] = Field(min_length=1, max_length=4096)
    max_completion_tokens: TokenCount | None = None
    n: Choices = 1
    tools: list[ToolIn] | None = Field(default=None, min_length=1, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceIn | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormatIn | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20), BeforeValidator(_integral)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice is not None and self.tool_choice != "none" and self.tools is None:
            raise ValueError("tool_choice needs tools")
        return self

    def messages_proto(self) -> list[ChatMessage]:
        return [m.proto() for m in self.messages]

    def answer_schema(self) -> dict[str, Any] | None:
        """The JSON Schema the finished answer must match, if the client gave one."""
        response_format = self.response_format
        if response_format is None or response_format.json_schema is None:
            return None
        return response_format.json_schema.json_schema

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
        if self.tools is not None:
            params.tools_json = _json([t.model_dump(exclude_unset=True) for t in self.tools])
        if self.tool_choice is not None:
            choice = self.tool_choice
            params.tool_choice_json = _json(
                choice if isinstance(choice, str) else choice.model_dump(exclude_unset=True)
            )
        if self.parallel_tool_calls is not None:
            params.parallel_tool_calls = self.parallel_tool_calls
        if self.response_format is not None:
            params.response_format_json = _json(
                self.response_format.model_dump(exclude_unset=True, by_alias=True)
            )
        if self.logprobs is not None:
            params.logprobs = self.logprobs
        if self.top_logprobs is not None:
            params.top_logprobs = self.top_logprobs
        return params


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


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
