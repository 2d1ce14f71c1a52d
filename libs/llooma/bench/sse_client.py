"""A lean HTTP/1.1 SSE client for benchmarks, so the client's own CPU does not hide the stack's.

httpx spent about 6 ms of CPU per streamed request here, more than the whole stack; this
client keeps keep-alive connections and parses chunked SSE with a few byte searches.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

import orjson

# A non-empty content delta, however the server spaces its JSON (peer gateways put a space).
_FIRST_CONTENT = re.compile(rb'"content": ?"[^"]')


@dataclass(frozen=True, slots=True)
class StreamTiming:
    status: int
    started: float
    first_token: float | None
    ended: float


@dataclass(frozen=True, slots=True)
class TextTiming:
    """One stream read to its end: when it began, its first and last content, and its text."""

    started: float
    first_token: float
    last_token: float
    text: str


class Refused(RuntimeError):
    def __init__(self, status: int, status_line: bytes) -> None:
        super().__init__(f"stack answered {status_line!r}")
        self.status = status


class NoToken(RuntimeError):
    """The stream ended (an error event, for one) before any content."""


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


class SseClient:
    def __init__(self, host: str, port: int, api_key: str) -> None:
        self._host = host
        self._port = port
        self._api_key = api_key
        self._idle: list[_Connection] = []

    async def _connect(self) -> _Connection:
        if self._idle:
            return self._idle.pop()
        reader, writer = await asyncio.open_connection(self._host, self._port)
        return _Connection(reader, writer)

    async def close(self) -> None:
        for connection in self._idle:
            connection.writer.close()
        self._idle.clear()

    async def time_to_first_token(self, path: str, body: bytes) -> float:
        """Seconds from sending the request to the first non-empty content delta."""
        started = time.perf_counter()
        first, _ = await self._stream(path, body, {})
        return first - started

    async def timed_stream(self, path: str, body: bytes, headers: dict[str, str]) -> StreamTiming:
        """Stream one request to its end; a non-200 answer is returned, not raised, so callers
        can count and retry refusals (503 when every host is busy)."""
        started = time.perf_counter()
        try:
            first, _ = await self._stream(path, body, headers)
        except Refused as refused:
            return StreamTiming(refused.status, started, None, time.perf_counter())
        except NoToken:
            return StreamTiming(200, started, None, time.perf_counter())
        return StreamTiming(200, started, first, time.perf_counter())

    async def timed_text(
        self, path: str, body: bytes, headers: dict[str, str] | None = None
    ) -> TextTiming:
        """Stream one request to its end and keep its text (parsed after the clock stops)."""
        started = time.perf_counter()
        chunks: list[tuple[float, bytes]] = []
        first, _ = await self._stream(path, body, headers or {}, collect=chunks)
        last = max(at for at, data in chunks if _has_content(data))
        text = []
        for event in b"".join(data for _, data in chunks).split(b"\n\n"):
            payload = event.strip().removeprefix(b"data:").strip()
            if not payload.startswith(b"{"):
                continue
            for choice in orjson.loads(payload).get("choices") or []:
                text.append((choice.get("delta") or {}).get("content") or "")
        return TextTiming(started, first, last, "".join(text))

    async def request_id_of(self, path: str, body: bytes, headers: dict[str, str]) -> str:
        """Stream one request to its end; returns its x-llooma-request-id."""
        _, found = await self._stream(path, body, headers, b"x-llooma-request-id:")
        return found

    async def path_of(self, path: str, body: bytes, headers: dict[str, str]) -> str:
        """Stream one request to its end; returns its x-llooma-path."""
        _, found = await self._stream(path, body, headers, b"x-llooma-path:")
        return found

    async def _stream(
        self,
        path: str,
        body: bytes,
        headers: dict[str, str],
        wanted: bytes = b"",
        collect: list[tuple[float, bytes]] | None = None,
    ) -> tuple[float, str]:
        connection = await self._connect()
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {self._host}\r\n"
            f"Authorization: Bearer {self._api_key}\r\nContent-Type: application/json\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        connection.writer.write(request)
        status_line = await connection.reader.readline()
        if not status_line:
            # The server closed an idle keep-alive connection: send again on a fresh one.
            connection.writer.close()
            reader, writer = await asyncio.open_connection(self._host, self._port)
            connection = _Connection(reader, writer)
            connection.writer.write(request)
            status_line = await reader.readline()
        reader = connection.reader
        found = ""
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            lowered = line.lower()
            if wanted and lowered.startswith(wanted):
                found = line.split(b":", 1)[1].strip().decode()
            elif lowered.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if b" 200 " not in status_line:
            # Read the error body so the keep-alive connection can carry the next request.
            await reader.readexactly(length)
            self._idle.append(connection)
            parts = status_line.split()
            raise Refused(int(parts[1]) if len(parts) > 1 else 0, status_line)
        first: float | None = None
        while True:
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                await reader.readline()
                break
            data = await reader.readexactly(size + 2)
            if collect is not None:
                collect.append((time.perf_counter(), data[:-2]))
            if first is None and _has_content(data):
                first = time.perf_counter()
        self._idle.append(connection)
        if first is None:
            raise NoToken("stream ended without a token")
        return first, found


def _has_content(data: bytes) -> bool:
    return _FIRST_CONTENT.search(data) is not None
