"""A lean HTTP/1.1 SSE client for benchmarks, so the client's own CPU does not hide the stack's.

httpx spent about 6 ms of CPU per streamed request here, more than the whole stack; this
client keeps keep-alive connections and parses chunked SSE with a few byte searches.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

_FIRST_CONTENT = b'"content":"'
_EMPTY_CONTENT = b'"content":""'


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

    async def request_id_of(self, path: str, body: bytes, headers: dict[str, str]) -> str:
        """Stream one request to its end; returns its x-llooma-request-id."""
        _, found = await self._stream(path, body, headers, b"x-llooma-request-id:")
        return found

    async def path_of(self, path: str, body: bytes, headers: dict[str, str]) -> str:
        """Stream one request to its end; returns its x-llooma-path."""
        _, found = await self._stream(path, body, headers, b"x-llooma-path:")
        return found

    async def _stream(
        self, path: str, body: bytes, headers: dict[str, str], wanted: bytes = b""
    ) -> tuple[float, str]:
        connection = await self._connect()
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {self._host}\r\n"
            f"Authorization: Bearer {self._api_key}\r\nContent-Type: application/json\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        connection.writer.write(request)
        reader = connection.reader
        status_line = await reader.readline()
        if b" 200 " not in status_line:
            raise RuntimeError(f"stack answered {status_line!r}")
        found = ""
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if wanted and line.lower().startswith(wanted):
                found = line.split(b":", 1)[1].strip().decode()
        first: float | None = None
        while True:
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                await reader.readline()
                break
            data = await reader.readexactly(size + 2)
            if first is None:
                at = data.find(_FIRST_CONTENT)
                if at >= 0 and data.find(_EMPTY_CONTENT) != at:
                    first = time.perf_counter()
        self._idle.append(connection)
        if first is None:
            raise RuntimeError("stream ended without a token")
        return first, found
