"""A real local HTTP/1.1 server that plays an OpenAI-compatible engine, scripted per test.

It counts the connections it has open and notices a client that goes away mid-response (the
way an engine notices to stop generating), so tests can check what the host's client does
with its connections.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class Out:
    """What a handler writes the response with."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self.ended = False
        self.keep_alive = True

    async def head(
        self, status: int, headers: dict[str, str] | None = None, *, chunked: bool = True
    ) -> None:
        lines = [f"HTTP/1.1 {status} X"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if chunked:
            lines.append("Transfer-Encoding: chunked")
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await self._writer.drain()

    async def chunk(self, data: bytes) -> None:
        self._writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await self._writer.drain()

    async def end(self) -> None:
        self._writer.write(b"0\r\n\r\n")
        await self._writer.drain()
        self.ended = True

    async def whole(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        await self.head(
            status,
            {"Content-Type": content_type, "Content-Length": str(len(body))},
            chunked=False,
        )
        self._writer.write(body)
        await self._writer.drain()
        self.ended = True


Handler = Callable[[Request, Out], Awaitable[None]]


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def delta(
    content: str | None = None, *, reasoning: str | None = None, finish: str | None = None
) -> bytes:
    body: dict[str, Any] = {}
    if content is not None:
        body["content"] = content
    if reasoning is not None:
        body["reasoning_content"] = reasoning
    return event(
        {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": body, "finish_reason": finish}],
        }
    )


def usage(prompt: int, completion: int) -> bytes:
    return event(
        {
            "choices": [],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
    )


DONE = b"data: [DONE]\n\n"


async def stream_events(out: Out, *events: bytes) -> None:
    await out.head(200, {"Content-Type": "text/event-stream"})
    for data in events:
        await out.chunk(data)
    await out.end()


async def answer(request: Request, out: Out) -> None:
    """The default: "Hello world" with the engine's usage, as llama.cpp streams it."""
    if request.path.endswith("/chat/completions"):
        await stream_events(
            out,
            delta("", finish=None),
            delta("Hello"),
            delta(" world"),
            delta(None, finish="stop"),
            usage(21, 2),
            DONE,
        )
    else:
        await out.whole(404, b'{"error": {"message": "not here"}}')


@dataclass
class FakeEngine:
    handler: Handler = answer
    requests: list[Request] = field(default_factory=list)
    open_connections: int = 0
    peak_connections: int = 0
    connections_accepted: int = 0
    # Responses the client walked away from before the handler finished.
    abandoned: int = 0
    # Close each connection after one response (as a server without keep-alive would).
    close_after_response: bool = False
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> FakeEngine:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeEngine:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def wait_connections(self, at_most: int, within_s: float = 5.0) -> int:
        """Wait until at most `at_most` connections are open; returns the count."""
        for _ in range(int(within_s / 0.01)):
            if self.open_connections <= at_most:
                break
            await asyncio.sleep(0.01)
        return self.open_connections

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        self.connections_accepted += 1
        self.peak_connections = max(self.peak_connections, self.open_connections)
        self._writers.add(writer)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (header := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                request = Request(method, path, headers, body)
                self.requests.append(request)
                out = Out(writer)
                handling = asyncio.ensure_future(self.handler(request, out))
                # A client that leaves shows as the end of its side of the connection.
                gone = asyncio.ensure_future(reader.read(1))
                await asyncio.wait({handling, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not handling.done():
                    handling.cancel()
                    with contextlib.suppress(BaseException):
                        await handling
                    self.abandoned += 1
                    return
                gone.cancel()
                with contextlib.suppress(BaseException):
                    await gone
                handling.result()
                if not out.ended or self.close_after_response or not out.keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            self.open_connections -= 1
            self._writers.discard(writer)
            writer.close()
