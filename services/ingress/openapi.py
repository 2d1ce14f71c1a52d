"""The OpenAPI 3.1 description of the HTTP API, served at /openapi.json.

The request body's schema is generated from the model the ingress validates with, so the two
cannot drift; responses, headers and errors are written out by hand from what api.py answers.

Its size (~590 lines): one document, the description of every endpoint, header and error;
split, its parts would only refer to each other.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from llooma.settings import VERSION
from services.ingress.completions import CompletionRequest
from services.ingress.embeddings import EmbeddingRequest
from services.ingress.headers import (
    DEADLINE_HEADER,
    DEADLINE_PATTERN,
    PRIVACY_HEADER,
    PRIVACY_MODES,
    RACE_WIDTH_HEADER,
    RACE_WIDTHS,
    SPLIT_HEADER,
    SPLIT_MODES,
)
from services.ingress.responses import ResponsesRequest
from services.ingress.schema import MAX_CHOICES, ChatCompletionRequest

Schema = dict[str, Any]

SCHEMAS = "#/components/schemas/"


def _ref(name: str) -> Schema:
    return {"$ref": SCHEMAS + name}


def _header(description: str, schema: Schema | None = None, *, required: bool = True) -> Schema:
    return {
        "description": description,
        "required": required,
        "schema": schema or {"type": "string"},
    }


ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "code": {"type": ["string", "null"]},
                "param": {"type": ["string", "null"]},
            },
        }
    },
}

USAGE: Schema = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer", "minimum": 0},
        "completion_tokens": {"type": "integer", "minimum": 0},
        "total_tokens": {"type": "integer", "minimum": 0},
    },
}

TOOL_CALL: Schema = {
    "type": "object",
    "required": ["id", "type", "function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
        },
    },
}

CHAT_COMPLETION: Schema = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string", "pattern": "^chatcmpl-"},
        "object": {"const": "chat.completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_CHOICES,
            "items": {
                "type": "object",
                "required": ["index", "message", "finish_reason"],
                "properties": {
                    "index": {"type": "integer", "minimum": 0, "maximum": MAX_CHOICES - 1},
                    "message": {
                        "type": "object",
                        "required": ["role", "content"],
                        "properties": {
                            "role": {"const": "assistant"},
                            # null only for an answer of tool calls alone, as OpenAI's.
                            "content": {"type": ["string", "null"]},
                            "reasoning_content": {"type": "string"},
                            "tool_calls": {"type": "array", "items": TOOL_CALL},
                        },
                    },
                    "logprobs": {
                        "type": ["object", "null"],
                        "properties": {
                            "content": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                    "finish_reason": {"type": "string"},
                },
            },
        },
        "usage": _ref("Usage"),
    },
}

# One server-sent event (OpenAPI 3.1 describes each event of a stream, not the stream).
CHUNK_EVENT: Schema = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "description": 'A chat.completion.chunk, an {"error": ...} object, or [DONE].',
            "type": "string",
            "pattern": "^(\\[DONE\\]|\\{.*\\})$",
        }
    },
}

TEXT_COMPLETION: Schema = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string", "pattern": "^cmpl-"},
        "object": {"const": "text_completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {
            "type": "array",
            "minItems": 1,
            "maxItems": 1,
            "items": {
                "type": "object",
                "required": ["text", "index", "finish_reason"],
                "properties": {
                    "text": {"type": "string"},
                    "index": {"const": 0},
                    "logprobs": {"type": "null"},
                    "finish_reason": {"type": "string"},
                },
            },
        },
        "usage": _ref("Usage"),
    },
}

RESPONSE: Schema = {
    "type": "object",
    "required": ["id", "object", "created_at", "status", "model", "output", "usage"],
    "properties": {
        "id": {"type": "string", "pattern": "^resp_"},
        "object": {"const": "response"},
        "created_at": {"type": "integer"},
        "status": {"enum": ["completed", "incomplete"]},
        "model": {"type": "string"},
        "output": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "type", "status", "role", "content"],
                "properties": {
                    "type": {"const": "message"},
                    "role": {"const": "assistant"},
                    "content": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["type", "text"],
                            "properties": {
                                "type": {"const": "output_text"},
                                "text": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
        "usage": {
            "type": "object",
            "required": ["input_tokens", "output_tokens", "total_tokens"],
            "properties": {
                "input_tokens": {"type": "integer", "minimum": 0},
                "output_tokens": {"type": "integer", "minimum": 0},
                "total_tokens": {"type": "integer", "minimum": 0},
            },
        },
    },
}

RESPONSE_EVENT: Schema = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "pattern": "^response\\."},
        "data": {"description": "The event as JSON, its `type` the event's name."},
    },
}

EMBEDDING_LIST: Schema = {
    "type": "object",
    "required": ["object", "data", "model", "usage"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["object", "index", "embedding"],
                "properties": {
                    "object": {"const": "embedding"},
                    "index": {"type": "integer", "minimum": 0},
                    "embedding": {
                        "description": "Floats, or base64 of little-endian float32.",
                        "type": ["array", "string"],
                        "items": {"type": "number"},
                    },
                },
            },
        },
        "model": {"type": "string"},
        "usage": {
            "type": "object",
            "required": ["prompt_tokens", "total_tokens"],
            "properties": {
                "prompt_tokens": {"type": "integer", "minimum": 0},
                "total_tokens": {"type": "integer", "minimum": 0},
            },
        },
    },
}

MODEL_LIST: Schema = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "object", "created", "owned_by"],
                "properties": {
                    "id": {"type": "string"},
                    "object": {"const": "model"},
                    "created": {"type": "integer"},
                    "owned_by": {"type": "string"},
                },
            },
        },
    },
}

HEALTH: Schema = {
    "type": "object",
    "required": ["status", "services", "hosts"],
    "properties": {
        "status": {"enum": ["ok", "unavailable"]},
        "services": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
        "hosts": {"type": "integer", "minimum": 0},
    },
}

RETRY_AFTER = _header(
    "Seconds to wait before trying again.", {"type": "string", "pattern": "^[0-9]+$"}
)
REQUEST_ID = _header("The request's id, also in the ledger and in traces.")
PATH = _header(
    "How the answer was produced.", {"enum": ["direct", "split", "fallback"]}, required=False
)
PLAN = _header("The planner's decision (ASCII, at most 200 characters).", required=False)
HOST = _header("The host that answered (absent on the split path).", required=False)
MODEL = _header("The model that answered (the body's `model` is the one asked).", required=False)
# Sent when the key has the limit: OpenAI's names and formats (durations like "1s", "6m0s").
RATE_LIMIT_HEADERS = {
    f"x-ratelimit-{what}-{kind}": _header(description, schema, required=False)
    for kind in ("requests", "tokens")
    for what, description, schema in (
        ("limit", f"The key's {kind} per minute.", {"type": "string", "pattern": "^[0-9]+$"}),
        (
            "remaining",
            f"The {kind} the key may use now.",
            {"type": "string", "pattern": "^[0-9]+$"},
        ),
        (
            "reset",
            f"Until the key's {kind} are back to full.",
            {"type": "string", "pattern": "^([0-9]+h)?([0-9]+m)?([0-9.]+s|[0-9]+ms)$"},
        ),
    )
}


def _error(description: str, headers: dict[str, Schema] | None = None) -> Schema:
    response: Schema = {
        "description": description,
        "content": {"application/json": {"schema": _ref("Error")}},
    }
    if headers:
        response["headers"] = headers
    return response


def _request_parameters() -> list[Schema]:
    def header(name: str, description: str, schema: Schema) -> Schema:
        return {
            "name": name,
            "in": "header",
            "required": False,
            "description": description,
            "schema": schema,
        }

    return [
        header(
            DEADLINE_HEADER,
            "First-token deadline for this request, whole milliseconds.",
            {"type": "string", "pattern": DEADLINE_PATTERN},
        ),
        header(
            RACE_WIDTH_HEADER,
            "How many hosts race for this request.",
            {"enum": list(RACE_WIDTHS)},
        ),
        header(
            PRIVACY_HEADER,
            "`strict` also redacts quasi-identifiers.",
            {"enum": list(PRIVACY_MODES)},
        ),
        header(SPLIT_HEADER, "`off` asks the planner not to split.", {"enum": list(SPLIT_MODES)}),
    ]


def _chat_completions() -> Schema:
    pipeline_headers = {"x-llooma-request-id": REQUEST_ID}
    return {
        "operationId": "createChatCompletion",
        "summary": "OpenAI-compatible chat completion, streamed (SSE) or whole.",
        "security": [{"bearer": []}],
        "parameters": _request_parameters(),
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": _ref("ChatCompletionRequest"),
                    "example": {
                        "model": "echo",
                        "messages": [{"role": "user", "content": "Hello!"}],
                        "max_tokens": 8,
                    },
                }
            },
        },
        "responses": {
            "200": {
                "description": "The answer: one chat.completion, or with `stream: true` "
                "chat.completion.chunk events ending in `data: [DONE]` (a failure after the "
                'stream began ends it with a `data: {"error": ...}` event instead).',
                "headers": {
                    "x-llooma-request-id": REQUEST_ID,
                    "x-llooma-path": PATH,
                    "x-llooma-plan": PLAN,
                    "x-llooma-host": HOST,
                    "x-llooma-model": MODEL,
                    **RATE_LIMIT_HEADERS,
                },
                "content": {
                    "application/json": {"schema": _ref("ChatCompletion")},
                    "text/event-stream": {"schema": _ref("ChatCompletionChunkEvent")},
                },
            },
            "400": _error(
                "Malformed JSON, a missing or wrongly typed field (a `json_schema` that is not "
                "a JSON Schema), invalid UTF-8, a bad header."
            ),
            "401": _error("Missing or unknown API key."),
            "402": _error(
                "The key's balance is exhausted (`insufficient_balance`); add credits with "
                "`llooma ledger credit`."
            ),
            "404": _error("No host has announced the model lately."),
            "408": _error(
                "The request's headers and body did not arrive within the read timeout "
                "(`request_timeout`); the connection is closed."
            ),
            "431": _error("The request headers are over the limit (`headers_too_large`)."),
            "413": _error(
                "The body is over the limit, checked before it is read whole "
                "(`body_too_large`), or the request alone may use more tokens than the key's "
                "tokens per minute (`tokens_exceed_limit`): neither is worth retrying."
            ),
            "429": _error(
                "The key's requests or tokens per minute are used up (`rate_limit_exceeded`).",
                {"retry-after": RETRY_AFTER, **RATE_LIMIT_HEADERS},
            ),
            "502": _error(
                "The raced hosts failed, or the answer does not match the request's "
                "`response_format` json_schema (`invalid_structured_output`).",
                pipeline_headers,
            ),
            "503": _error(
                "Shed (`overloaded`), no eligible host (also for a model whose hosts have all "
                "left in the last 10 minutes, and when no live host of the model announces a "
                "feature the request uses: tools, JSON mode or schema, logprobs), every raced "
                "host busy, or the control plane is unreachable.",
                {"retry-after": RETRY_AFTER},
            ),
            "504": _error("The raced hosts missed the first-token deadline.", pipeline_headers),
        },
    }


def _raced(
    operation_id: str,
    summary: str,
    request: str,
    example: Schema,
    answer: str,
    content: dict[str, Schema],
) -> Schema:
    """Another endpoint on the chat race: the chat operation's headers and errors, its own
    request and answer."""
    operation = _chat_completions()
    operation["operationId"] = operation_id
    operation["summary"] = summary
    operation["requestBody"]["content"]["application/json"] = {
        "schema": _ref(request),
        "example": example,
    }
    operation["responses"]["200"]["description"] = answer
    operation["responses"]["200"]["content"] = content
    return operation


def _request_schemas() -> dict[str, Schema]:
    """Every request body's schema, generated from the validators, and what they refer to."""
    components: dict[str, Schema] = {}
    for model in (ChatCompletionRequest, CompletionRequest, ResponsesRequest, EmbeddingRequest):
        schema = model.model_json_schema(ref_template=SCHEMAS + "{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    return components


def _other_endpoints() -> dict[str, Schema]:
    return {
        "/v1/completions": {
            "post": _raced(
                "createCompletion",
                "Legacy text completion of a raw prompt, streamed (SSE) or whole.",
                "CompletionRequest",
                {"model": "echo", "prompt": "Once upon a time", "max_tokens": 8},
                "One text_completion, or with `stream: true` text_completion chunks ending in "
                "`data: [DONE]`.",
                {
                    "application/json": {"schema": _ref("TextCompletion")},
                    "text/event-stream": {"schema": _ref("ChatCompletionChunkEvent")},
                },
            )
        },
        "/v1/responses": {
            "post": _raced(
                "createResponse",
                "A response to plain text input (Responses API), streamed (SSE) or whole.",
                "ResponsesRequest",
                {"model": "echo", "input": "Hello!", "max_output_tokens": 8},
                "One response, or with `stream: true` its events from `response.created` to "
                "`response.completed` (or `response.incomplete` / `response.failed`).",
                {
                    "application/json": {"schema": _ref("Response")},
                    "text/event-stream": {"schema": _ref("ResponseEvent")},
                },
            )
        },
        "/v1/embeddings": {
            "post": _raced(
                "createEmbedding",
                "Each input's vector, from hosts whose model serves embeddings.",
                "EmbeddingRequest",
                {"model": "echo", "input": ["Hello!"]},
                "The vectors in input order, with the prompt tokens billed.",
                {"application/json": {"schema": _ref("EmbeddingList")}},
            )
        },
    }


def openapi_document() -> Schema:
    components = _request_schemas()
    components.update(
        TextCompletion=TEXT_COMPLETION,
        Response=RESPONSE,
        ResponseEvent=RESPONSE_EVENT,
        EmbeddingList=EMBEDDING_LIST,
        ChatCompletion=CHAT_COMPLETION,
        ChatCompletionChunkEvent=CHUNK_EVENT,
        Usage=USAGE,
        ModelList=MODEL_LIST,
        Health=HEALTH,
        Error=ERROR,
    )
    return {
        "openapi": "3.1.0",
        "info": {"title": "LLooMA", "version": VERSION},
        "servers": [{"url": "/"}],
        "paths": {
            "/v1/chat/completions": {"post": _chat_completions()},
            **_other_endpoints(),
            "/v1/models": {
                "get": {
                    "operationId": "listModels",
                    "summary": "`llooma` and every model some live host serves.",
                    "security": [{"bearer": []}],
                    "responses": {
                        "200": {
                            "description": "The models.",
                            "content": {"application/json": {"schema": _ref("ModelList")}},
                        },
                        "401": _error("Missing or unknown API key."),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "Ready once every service and at least one host are.",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "Ready.",
                            "content": {"application/json": {"schema": _ref("Health")}},
                        },
                        "503": {
                            "description": "Not ready yet.",
                            "content": {"application/json": {"schema": _ref("Health")}},
                        },
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document.",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


@cache
def _document_bytes() -> bytes:
    return orjson.dumps(openapi_document())


async def serve_openapi(_: Request) -> Response:
    return Response(_document_bytes(), media_type="application/json")
