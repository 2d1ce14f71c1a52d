"""uvicorn's httptools protocol with bounded reads: uvicorn has no deadline on reading a
request, so a client that sends its headers or body a byte at a time (slowloris), or nothing
at all, would hold its connection forever.

Each request (from the moment its connection opens, or its previous response ended) must be
read whole, headers and body, within `read_timeout_s`: else it gets 408 and the connection is
closed. Headers larger than `max_header_bytes` get 431. Once the request is read, the
response (a long stream included) has no deadline here; uvicorn's keep-alive timeout closes
an idle connection between requests.
"""

from __future__ import annotations

import asyncio

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def _reply_and_close(transport: asyncio.Transport, status: bytes, message: str, code: str) -> None:
    # OpenAI's error shape, as every other refusal of the ingress.
    body = orjson.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "code": code,
                "param": None,
            }
        }
    )
    transport.write(
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )
    transport.close()


class BoundedReadProtocol(HttpToolsProtocol):
    read_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024

    _read_deadline: asyncio.TimerHandle | None = None
    _header_bytes: int = 0
    _reading_headers: bool = True
    # The last bytes of the previous chunk: the headers' end may straddle two chunks.
    _tail: bytes = b""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._arm()
        if self._reading_headers:
            # Only the bytes up to the blank line that ends the headers: a chunk often carries
            # the body too, and a large body is the body limit's business, not this one's.
            end = (self._tail + data).find(b"\r\n\r\n")
            self._header_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._tail))
            self._tail = data[-3:]
            if self._header_bytes > self.max_header_bytes:
                self._disarm()
                _reply_and_close(
                    self.transport,
                    b"431 Request Header Fields Too Large",
                    f"request headers exceed {self.max_header_bytes} bytes",
                    "headers_too_large",
                )
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_headers = True

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        self._header_bytes = 0
        self._tail = b""
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def _arm(self) -> None:
        if self._read_deadline is None:
            self._read_deadline = self.loop.call_later(self.read_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _timed_out(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            # The app answered before the body ended; let it finish, read nothing more.
            cycle.keep_alive = False
            return
        if cycle is not None:
            cycle.disconnected = True
            cycle.message_event.set()
        _reply_and_close(
            self.transport,
            b"408 Request Timeout",
            f"the request was not read within {self.read_timeout_s} s",
            "request_timeout",
        )


def bounded_protocol(read_timeout_s: float, max_header_bytes: int) -> type[BoundedReadProtocol]:
    """The protocol class for uvicorn's `http=` with these bounds."""
    return type(
        "IngressHttpProtocol",
        (BoundedReadProtocol,),
        {"read_timeout_s": read_timeout_s, "max_header_bytes": max_header_bytes},
    )
