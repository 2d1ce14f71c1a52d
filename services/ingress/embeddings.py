"""`POST /v1/embeddings`: each input's vector from a host whose model announces embeddings.

The inputs travel as one user message each of a `TASK_KIND_EMBEDDING` request, never split;
the dispatcher races only hosts whose model has the `embeddings` feature, and a host answers
with every vector in one token, so the first complete answer wins. Billed by prompt tokens.
Vectors come as float lists, or with `encoding_format: "base64"` (what the `openai` client
asks for by default) as base64 of little-endian float32, exactly as the host sent them."""

from __future__ import annotations

import base64
import sys
from array import array
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import Response

from llooma.planning import bypass_plan
from llooma.v1.common_pb2 import TASK_KIND_EMBEDDING, ErrorDetail
from llooma.v1.pipeline_pb2 import ChatRequest, ClientEvent
from services.ingress.schema import ChatCompletionRequest, ChatMessageIn
from services.ingress.shapes import Failure

# Inputs in one request: every vector travels in one NATS message (1 MiB by default), and
# 128 vectors of 1024 float32 take half of it.
MAX_INPUTS = 128
Input = Annotated[str, Field(min_length=1)]


class EmbeddingChat(ChatCompletionRequest):
    """The chat request an embedding request travels as, and how its answer is encoded."""

    encoding_format: Literal["float", "base64"] = "float"


class EmbeddingRequest(BaseModel):
    """The fields of OpenAI's embeddings request LLooMA honours; others are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=256)
    input: Input | Annotated[list[Input], Field(min_length=1, max_length=MAX_INPUTS)]
    encoding_format: Literal["float", "base64"] = "float"
    # The engine's vectors are what they are: a shortened one is refused, not faked.
    dimensions: None = None

    @field_validator("dimensions", mode="before")
    @classmethod
    def _as_the_engine_made_them(cls, value: object) -> object:
        if value is not None:
            raise ValueError("vectors come in the model's own dimensions; leave dimensions out")
        return value

    def as_chat(self) -> EmbeddingChat:
        inputs = [self.input] if isinstance(self.input, str) else self.input
        # Validated already: constructed, not re-validated. One token is the whole answer.
        return EmbeddingChat.model_construct(
            encoding_format=self.encoding_format,
            model=self.model,
            messages=[ChatMessageIn.model_construct(role="user", content=text) for text in inputs],
            max_tokens=1,
            stream=False,
        )


class Embeddings:
    def parse(self, text: str) -> ChatCompletionRequest:
        return EmbeddingRequest.model_validate_json(text, strict=True).as_chat()

    def prepare(self, chat: ChatRequest) -> None:
        chat.kind = TASK_KIND_EMBEDDING
        chat.plan.CopyFrom(bypass_plan("embeddings are never split"))

    def stream(
        self,
        request_id: str,
        parsed: ChatCompletionRequest,
        batches: AsyncGenerator[list[ClientEvent]],
    ) -> AsyncGenerator[bytes]:
        raise AssertionError("embeddings are never streamed")

    async def collect(
        self,
        request_id: str,
        parsed: ChatCompletionRequest,
        batches: AsyncIterator[list[ClientEvent]],
        headers: dict[str, str],
        failure: Failure,
    ) -> Response:
        assert isinstance(parsed, EmbeddingChat)
        vectors: list[bytes] = []
        async for batch in batches:
            for event in batch:
                kind = event.WhichOneof("event")
                if kind == "delta":
                    vectors.extend(event.delta.embeddings)
                elif kind == "finished":
                    if len(vectors) != len(parsed.messages):
                        detail = f"{len(vectors)} vectors for {len(parsed.messages)} inputs"
                        return failure(ErrorDetail(message=detail), headers)
                    prompt_tokens = event.finished.usage.input_tokens
                    body = {
                        "object": "list",
                        "data": [
                            {"object": "embedding", "index": index, "embedding": encoding}
                            for index, encoding in enumerate(
                                _encoded(vectors, parsed.encoding_format)
                            )
                        ],
                        "model": parsed.model,
                        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
                    }
                    return Response(
                        orjson.dumps(body), media_type="application/json", headers=headers
                    )
                else:
                    return failure(event.failed, headers)
        return failure(ErrorDetail(message="stream ended early"), headers)


def _encoded(vectors: list[bytes], encoding_format: str) -> list[Any]:
    if encoding_format == "base64":
        return [base64.b64encode(vector).decode() for vector in vectors]
    floats = []
    for vector in vectors:
        values = array("f")
        values.frombytes(vector)
        if sys.byteorder == "big":
            values.byteswap()
        floats.append(values.tolist())
    return floats


EMBEDDINGS = Embeddings()
