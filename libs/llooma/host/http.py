"""A small keep-alive HTTP/1.1 client for the host's upstream engine, built on asyncio streams.

Why not httpx: it cost ~6 ms of CPU per streamed request here (this costs ~0.3 ms, see
bench/results/host_upstream.md), and httpcore leaks a pooled connection when a request is
cancelled while connecting (encode/httpcore#1099); the racer cancels a loser in every race, so
after a few thousand races a host held ~100 dead connections and spent its CPU scanning them.

The rules that keep a host alive whatever its upstream does:
- at most `max_connections` sockets per pool, open or being opened; a request waits for a slot;
- every way out of a request (done, error, timeout, cancellation at any await) either returns
  the connection to the idle list, if its response was read to the end, or closes it at once;
  closing is synchronous, so cancellation cannot interrupt it;
- a connection is reused only if its response was complete and the server did not ask to
  close; idle ones expire before the usual 5 s server keep-alive and are dropped if the server
  closed them (a poll of the socket before reuse sees a close the loop has not read yet); a
  request whose reused connection turns out dead is sent once more on a new one;
- a server seen closing the connection after a streamed (chunked) response is learned: llama.cpp's
  server does so after every stream while announcing `Keep-Alive`, and its close lands a fraction
  of a ms after the last chunk, so the next request would often be written into the dead socket.
  Such a pool never keeps a streamed response's connection, and keeps one spare connection
  opened ahead of time (beyond `max_connections`, expiring like any idle one), so a request
  neither pays the connect nor fails first on a closed socket;
- connect and read timeouts; the read timeout is a lazy watchdog (one timer per request,
  re-armed only when it fires), so reading a chunk costs no timer;
- no compression (`Accept-Encoding: identity`): token streams are small and latency bound.

Its size (~500 lines): an HTTP/1.1 client with a pool, chunked decoding and cancellation at
every phase; split, the cancellation rules would be spread over files.
"""

from __future__ import annotations

import asyncio
import select
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit

_MAX_HEADER_LINE = 65_536
_MAX_HEADERS = 100
# A kept connection found closed within this long after a stream: the server closes after
# streams (later, it is just the server's idle timeout).
_CLOSED_AFTER_STREAM_S = 0.5


class HttpError(Exception):
    """The request failed in transport: connect, timeout, a malformed or cut-off response."""


class ConnectFailed(HttpError):
    """No connection to the server could be made (refused, unreachable, connect timeout)."""


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int
    # The path prefix of the base URL, without a trailing slash ("/v1" or "").
    prefix: str

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


def parse_origin(url: str) -> Origin:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if scheme == "https" else 80)
    return Origin(scheme, parts.hostname, port, parts.path.rstrip("/"))


@dataclass(slots=True, eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0
    reused: bool = False
    # Its last response was chunked (a stream): if the server then closes it, that is learned.
    streamed: bool = False

    def close(self) -> None:
        # Synchronous: nothing here can be interrupted by a cancellation.
        transport = self.writer.transport
        if not transport.is_closing():
            transport.close()

    def alive(self) -> bool:
        return not self.writer.transport.is_closing() and not self.reader.at_eof()

    def reusable(self) -> bool:
        """Alive, and nothing waits unread on the idle socket: a close (or stray bytes) the
        event loop has not read yet shows here, before a request is written into it. One poll;
        not for TLS, where the server may send records of its own between requests."""
        if not self.alive():
            return False
        writer = self.writer
        sock = writer.get_extra_info("socket")
        if sock is None or writer.get_extra_info("sslcontext") is not None:
            return True
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return not poller.poll(0)


@dataclass(slots=True)
class PoolStats:
    opened: int = 0
    reused: int = 0
    discarded: int = 0
    retried: int = 0
    # Connections opened ahead of time, and how many of them a request then used.
    spares_opened: int = 0
    spares_used: int = 0


class Response:
    """One response; iterate `body()` for its bytes. Leave the `request()` block to release it."""

    __slots__ = (
        "_chunked",
        "_complete",
        "_connection",
        "_keep_alive",
        "_last_read",
        "_length",
        "_loop",
        "headers",
        "status",
    )

    def __init__(
        self,
        connection: _Connection,
        status: int,
        headers: dict[str, str],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._connection = connection
        self.status = status
        self.headers = headers
        self._loop = loop
        self._last_read = loop.time()
        encoding = headers.get("transfer-encoding", "").lower()
        self._chunked = "chunked" in encoding
        length = headers.get("content-length")
        self._length: int | None = None
        if not self._chunked and length is not None:
            try:
                self._length = int(length)
            except ValueError as error:
                raise HttpError(f"bad content-length {length!r}") from error
        self._keep_alive = "close" not in headers.get("connection", "").lower()
        self._complete = status in (204, 304) or self._length == 0

    async def body(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (chunk framing removed)."""
        reader = self._connection.reader
        loop = self._loop
        try:
            if self._chunked:
                while True:
                    size_line = await reader.readline()
                    self._last_read = loop.time()
                    if not size_line.endswith(b"\n"):
                        raise HttpError("response cut off in chunk framing")
                    try:
                        size = int(size_line.split(b";", 1)[0], 16)
                    except ValueError as error:
                        raise HttpError(f"bad chunk size {size_line[:40]!r}") from error
                    if size == 0:
                        # Trailers (rare) end with an empty line.
                        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                            pass
                        self._complete = True
                        return
                    data = await reader.readexactly(size + 2)
                    self._last_read = loop.time()
                    yield data[:-2]
            elif self._length is not None:
                remaining = self._length
                while remaining > 0:
                    data = await reader.read(min(remaining, 65_536))
                    if not data:
                        raise HttpError("response cut off")
                    self._last_read = loop.time()
                    remaining -= len(data)
                    yield data
                self._complete = True
            else:
                # Neither length nor chunked: the body runs to the end of the connection.
                self._keep_alive = False
                while data := await reader.read(65_536):
                    self._last_read = loop.time()
                    yield data
                self._complete = True
        except asyncio.IncompleteReadError as error:
            raise HttpError("response cut off") from error
        except (ConnectionError, OSError) as error:
            raise HttpError(f"connection lost: {error!r}") from error

    async def read(self, limit: int) -> bytes:
        """Up to `limit` bytes of the body; a longer body is cut (and the connection dropped)."""
        body = bytearray()
        async for data in self.body():
            body += data
            if len(body) >= limit:
                break
        return bytes(body[:limit])


class _Exchange:
    """The async context manager returned by `HttpPool.request`."""

    __slots__ = (
        "_body",
        "_connection",
        "_headers",
        "_method",
        "_path",
        "_pool",
        "_response",
        "_started",
    )

    def __init__(
        self, pool: HttpPool, method: str, path: str, body: bytes, headers: str | None
    ) -> None:
        self._pool = pool
        self._method = method
        self._path = path
        self._body = body
        self._headers = headers
        self._connection: _Connection | None = None
        self._response: Response | None = None
        self._started = 0.0

    async def __aenter__(self) -> Response:
        pool = self._pool
        await pool._slots.acquire()
        try:
            self._response = await pool._exchange(self)
        except BaseException:
            self._release()
            raise
        return self._response

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._release()

    def _release(self) -> None:
        connection = self._connection
        self._connection = None
        response = self._response
        pool = self._pool
        if connection is not None:
            if (
                response is not None
                and response._complete
                and response._keep_alive
                and not (response._chunked and pool.closes_after_stream)
            ):
                connection.streamed = response._chunked
                pool._put_idle(connection)
            else:
                pool.stats.discarded += 1
                pool._discard(connection)
        pool._watched.discard(self)
        pool._slots.release()
        pool._keep_spare()


class HttpPool:
    """Keep-alive connections to one origin, at most `max_connections` at a time."""

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 300.0,
        idle_expiry_s: float = 4.0,
    ) -> None:
        self.origin = parse_origin(base_url)
        self.max_connections = max_connections
        self._connect_timeout = connect_timeout_s
        self._read_timeout = read_timeout_s
        self._idle_expiry = idle_expiry_s
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._ssl = ssl.create_default_context() if self.origin.scheme == "https" else None
        self._host_header = f"Host: {self.origin.authority}\r\n".encode()
        self._watched: set[_Exchange] = set()
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False
        self._spare: _Connection | None = None
        self._spare_opening: asyncio.Task[None] | None = None
        # Learned from the server's behaviour, never from its headers (llama.cpp announces
        # Keep-Alive and then closes).
        self.closes_after_stream = False
        self.stats = PoolStats()

    @property
    def open_connections(self) -> int:
        """Sockets open now, idle or in use."""
        return len(self._open)

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def spare_connections(self) -> int:
        return int(self._spare is not None)

    def request(
        self, method: str, path: str, body: bytes = b"", headers: str | None = None
    ) -> _Exchange:
        """`async with pool.request(...) as response:` — `path` is appended to the base URL's
        path; `headers` are preformatted `Name: value\\r\\n` lines."""
        return _Exchange(self, method, self.origin.prefix + path, body, headers)

    async def aclose(self) -> None:
        if self._spare_opening is not None:
            self._spare_opening.cancel()
            self._spare_opening = None
        self._spare = None
        for connection in self._open:
            connection.close()
        self._idle.clear()
        self._open.clear()
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _discard(self, connection: _Connection) -> None:
        self._open.discard(connection)
        connection.close()

    def _learn_closed(self, connection: _Connection, idle_s: float) -> None:
        """A kept connection was found closed by the server after `idle_s` idle. Soon after a
        stream, that is the server's habit; later, only its idle timeout."""
        if connection.streamed and idle_s < _CLOSED_AFTER_STREAM_S and not self.closes_after_stream:
            self.closes_after_stream = True
            self._keep_spare()

    def _keep_spare(self) -> None:
        """With a server that closes after streams, have one fresh connection ready."""
        if (
            not self.closes_after_stream
            or self._closed
            or self._spare_opening is not None
            or (self._spare is not None and self._spare.alive())
        ):
            return
        if self._spare is not None:
            self._discard(self._spare)
            self._spare = None
        self._spare_opening = asyncio.get_running_loop().create_task(self._open_spare())

    async def _open_spare(self) -> None:
        try:
            connection = await self._connect()
        except ConnectFailed:
            return  # the next request connects (and fails) on its own path
        finally:
            self._spare_opening = None
        if self._closed:
            self._discard(connection)
            return
        connection.idle_since = asyncio.get_running_loop().time()
        self._spare = connection
        self.stats.spares_opened += 1

    def _take_spare(self, now: float) -> _Connection | None:
        connection = self._spare
        if connection is None:
            return None
        self._spare = None
        if now - connection.idle_since < self._idle_expiry and connection.reusable():
            self.stats.spares_used += 1
            # Nothing was ever sent on it: if it turns out dead, sending again is safe.
            connection.reused = True
            return connection
        self._discard(connection)
        return None

    def _put_idle(self, connection: _Connection) -> None:
        now = asyncio.get_running_loop().time()
        idle = self._idle
        # The oldest idle connections are at the front: close the expired or dead ones, so a
        # pool that once was busy does not keep its peak of sockets open.
        while idle and (now - idle[0].idle_since >= self._idle_expiry or not idle[0].alive()):
            stale = idle.pop(0)
            if not stale.alive():
                self._learn_closed(stale, now - stale.idle_since)
            self._discard(stale)
        if connection.alive():
            connection.idle_since = now
            connection.reused = True
            idle.append(connection)
        else:
            self._learn_closed(connection, 0.0)
            self._discard(connection)

    def _take_idle(self, now: float) -> _Connection | None:
        idle = self._idle
        while idle:
            connection = idle.pop()
            if now - connection.idle_since < self._idle_expiry and connection.reusable():
                self.stats.reused += 1
                return connection
            if not connection.reusable():
                self._learn_closed(connection, now - connection.idle_since)
            self._discard(connection)
        return None

    async def _connect(self) -> _Connection:
        origin = self.origin
        try:
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await asyncio.open_connection(
                    origin.host,
                    origin.port,
                    ssl=self._ssl,
                    server_hostname=origin.host if self._ssl is not None else None,
                    limit=_MAX_HEADER_LINE,
                )
        except TimeoutError as error:
            raise ConnectFailed(f"connect to {origin.authority} timed out") from error
        except OSError as error:
            raise ConnectFailed(f"cannot connect to {origin.authority}: {error}") from error
        connection = _Connection(reader, writer)
        self._open.add(connection)
        self.stats.opened += 1
        return connection

    def _head(self, exchange: _Exchange) -> bytes:
        head = (
            f"{exchange._method} {exchange._path} HTTP/1.1\r\n".encode()
            + self._host_header
            + b"Accept-Encoding: identity\r\n"
        )
        if exchange._headers:
            head += exchange._headers.encode()
        if exchange._body or exchange._method in ("POST", "PUT", "PATCH"):
            head += b"Content-Length: %d\r\n" % len(exchange._body)
        return head + b"\r\n"

    async def _exchange(self, exchange: _Exchange) -> Response:
        loop = asyncio.get_running_loop()
        payload = self._head(exchange) + exchange._body
        now = loop.time()
        connection = self._take_idle(now)
        if connection is None and self.closes_after_stream:
            connection = self._take_spare(now)
            self._keep_spare()  # for the next request, while this one is answered
        if connection is None:
            connection = await self._connect()
        exchange._connection = connection
        self._watch(exchange)
        try:
            return await self._send(exchange, connection, payload, loop)
        except HttpError:
            if not connection.reused or exchange._response is not None:
                raise
        # The server had closed the reused keep-alive connection: nothing was answered, so
        # sending again on a new connection cannot run the request twice.
        self._learn_closed(connection, now - connection.idle_since)
        self._discard(connection)
        self.stats.retried += 1
        exchange._connection = None
        connection = await self._connect()
        exchange._connection = connection
        return await self._send(exchange, connection, payload, loop)

    async def _send(
        self,
        exchange: _Exchange,
        connection: _Connection,
        payload: bytes,
        loop: asyncio.AbstractEventLoop,
    ) -> Response:
        reader = connection.reader
        writer = connection.writer
        try:
            writer.write(payload)
            await writer.drain()
            status_line = await reader.readline()
            if not status_line:
                raise HttpError("connection closed before a response")
            parts = status_line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
                raise HttpError(f"malformed status line {status_line[:80]!r}")
            status = int(parts[1])
            headers: dict[str, str] = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n"):
                    break
                if not line:
                    raise HttpError("connection closed in the response headers")
                if len(headers) >= _MAX_HEADERS:
                    raise HttpError("too many response headers")
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
        except (ConnectionError, OSError, ValueError) as error:
            raise HttpError(f"request failed: {error!r}") from error
        response = Response(connection, status, headers, loop)
        exchange._response = response
        return response

    def _watch(self, exchange: _Exchange) -> None:
        """Put the request under the read-timeout watchdog."""
        loop = asyncio.get_running_loop()
        exchange._started = loop.time()
        self._watched.add(exchange)
        if self._watchdog is None:
            self._watchdog = loop.call_later(min(self._read_timeout, 1.0), self._check_stalled)

    def _check_stalled(self) -> None:
        self._watchdog = None
        if not self._watched:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for exchange in list(self._watched):
            response = exchange._response
            connection = exchange._connection
            if connection is None:
                continue
            last = response._last_read if response is not None else exchange._started
            if now - last > self._read_timeout:
                # Aborting the transport wakes the reader with an error; the request fails.
                connection.reused = False  # a timed-out request is never sent again
                connection.writer.transport.abort()
                self._watched.discard(exchange)
        if self._watched:
            self._watchdog = loop.call_later(min(self._read_timeout, 1.0), self._check_stalled)
