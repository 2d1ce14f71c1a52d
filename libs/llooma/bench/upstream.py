"""A zero-latency OpenAI-compatible upstream for benchmarks: what an `openai` host and a peer
gateway both call, so that every millisecond and CPU cycle measured is theirs, not the engine's.

It answers `POST /v1/chat/completions` at once with `chunks` streamed content deltas (one
HTTP chunk each, written together), a finish chunk and, when asked, a usage chunk; `stream:
false` gets one `chat.completion`. `GET /v1/models`, `/health` and `/metrics` answer too, so
health probes see a live engine. HTTP/1.1 with keep-alive, on asyncio streams: a few hundred
microseconds of CPU a request, so it is never the bottleneck it measures around.

Run it as its own process (its CPU is then not the client's): `python -m llooma.bench.upstream
--port 8765 --chunks 16`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import orjson
import uvloop

_HEADERS_END = b"\r\n\r\n"
_PIECE = "tok "


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def stream_body(chunks: int, model: str, include_usage: bool, prompt_tokens: int) -> bytes:
    head = b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":0,'
    head += b'"model":' + orjson.dumps(model) + b","
    delta = orjson.dumps({"content": _PIECE})
    events = [
        head + b'"choices":[{"index":0,"delta":' + delta + b',"finish_reason":null}]}\n\n'
        for _ in range(chunks)
    ]
    events.append(head + b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
    if include_usage:
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": chunks,
            "total_tokens": prompt_tokens + chunks,
        }
        events.append(head + b'"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n")
    events.append(b"data: [DONE]\n\n")
    return b"".join(_chunk(event) for event in events) + b"0\r\n\r\n"


def whole_body(chunks: int, model: str, prompt_tokens: int) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": _PIECE * chunks},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": chunks,
                "total_tokens": prompt_tokens + chunks,
            },
        }
    )


class Upstream:
    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        self.requests = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(_HEADERS_END)
                request_line, _, header_block = head.partition(b"\r\n")
                length = 0
                for line in header_block.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                writer.write(self._answer(request_line, body))
                await writer.drain()
        writer.close()

    def _answer(self, request_line: bytes, body: bytes) -> bytes:
        method, path, _ = request_line.split(b" ", 2)
        if method == b"POST" and path.endswith(b"/chat/completions"):
            self.requests += 1
            request = orjson.loads(body)
            model = str(request.get("model", "bench"))
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in request["messages"])
            if request.get("stream"):
                options = request.get("stream_options") or {}
                payload = stream_body(
                    self.chunks, model, bool(options.get("include_usage")), prompt_tokens
                )
                return (
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n" + payload
                )
            return _json(200, whole_body(self.chunks, model, prompt_tokens))
        if method == b"GET" and path.endswith(b"/models"):
            return _json(200, b'{"object":"list","data":[{"id":"bench","object":"model"}]}')
        if method == b"GET" and path in (b"/health", b"/"):
            return _json(200, b'{"status":"ok"}')
        if method == b"GET" and path == b"/metrics":
            return b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 0\r\n\r\n"
        return _json(404, b'{"error":{"message":"not found"}}')


def _json(status: int, payload: bytes) -> bytes:
    reason = b"OK" if status == 200 else b"Not Found"
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
        % (status, reason, len(payload))
        + payload
    )


async def serve_forever(port: int, chunks: int) -> None:
    upstream = Upstream(chunks)
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=16)
    arguments = parser.parse_args()
    uvloop.run(serve_forever(arguments.port, arguments.chunks))


if __name__ == "__main__":
    main()
