"""What another endpoint (`/v1/completions`, `/v1/responses`) plugs into the chat route: its
request read into a chat request, and the race's events written in its own answer format.
The route's ladder of checks, its limits, billing and race are the chat route's own."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Protocol

from starlette.responses import Response

from llooma.v1.common_pb2 import ErrorDetail
from llooma.v1.pipeline_pb2 import ChatRequest, ClientEvent
from services.ingress.schema import ChatCompletionRequest

# The route's error answer for a failed request: (failure, headers) -> response.
Failure = Callable[[ErrorDetail, dict[str, str]], Response]


class AnswerShape(Protocol):
    def parse(self, text: str) -> ChatCompletionRequest:
        """The body as a chat request (raises pydantic's ValidationError)."""
        ...

    def prepare(self, chat: ChatRequest) -> None:
        """Marks the pipeline's request (its kind, its plan) before it is handed off."""
        ...

    def stream(
        self,
        request_id: str,
        parsed: ChatCompletionRequest,
        batches: AsyncGenerator[list[ClientEvent]],
    ) -> AsyncGenerator[bytes]:
        """The SSE body, from the events after `started`."""
        ...

    async def collect(
        self,
        request_id: str,
        parsed: ChatCompletionRequest,
        batches: AsyncIterator[list[ClientEvent]],
        headers: dict[str, str],
        failure: Failure,
    ) -> Response:
        """The whole answer as one JSON response."""
        ...
