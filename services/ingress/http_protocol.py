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

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def _reply_and_close(transport: asyncio.Transport, status: bytes, text: bytes) -> None:
    transport.write(
        b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: " + str(len(text)).encode() + b"\r\nconnection: close\r\n\r\n" + text
    )
    transport.close()


class BoundedReadProtocol(HttpToolsProtocol):
    read_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024

    _read_deadline: asyncio.TimerHandle | None = None
    _header_bytes: int = 0
    _reading_headers: bool = True

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._arm()
        if self._reading_headers:
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                self._disarm()
                _reply_and_close(
                    self.transport, b"431 Request Header Fields Too Large", b"headers too large"
                )
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_headers = True

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        self._header_bytes = 0
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
        _reply_and_close(self.transport, b"408 Request Timeout", b"request not read in time")


def bounded_protocol(read_timeout_s: float, max_header_bytes: int) -> type[BoundedReadProtocol]:
    """The protocol class for uvicorn's `http=` with these bounds."""
    return type(
        "IngressHttpProtocol",
        (BoundedReadProtocol,),
        {"read_timeout_s": read_timeout_s, "max_header_bytes": max_header_bytes},
    )
