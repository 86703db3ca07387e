"""A lean HTTP/1.1 keep-alive transport for the shared ``httpx.AsyncClient`` of an upstream pool.

Why not httpx's default transport: httpcore's connection pool re-scans every pooled connection (with socket
checks) on each request and response event, so with a few hundred concurrent upstream streams it burns more CPU
than the proxying itself (measured: ~3.5M ``is_idle`` calls for 300 requests at 50 concurrent). This transport
keeps idle connections per origin in a list (O(1) checkout/return), parses answers with ``httptools`` (llhttp,
the parser uvicorn uses) and reads the body straight off an asyncio stream. It speaks plain ``http://`` with
sized request bodies only; anything else (TLS, HEAD, streamed uploads) goes to httpx's transport.

Contract (as httpx's): exceptions are httpx's ``TransportError`` family (``ConnectError``, ``ReadError``,
``RemoteProtocolError``, ``ConnectTimeout``, ``ReadTimeout`` ...); closing a response before its end closes the
connection; a response read to its end returns the connection for reuse. A request that fails on a reused
connection before any response byte (the server closed it while idle) is retried once on a new connection.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any

import anyio
import httptools
import httpx

Origin = tuple[str, int]
READ_SIZE = 65536


def _deadline(seconds: float | None) -> AbstractAsyncContextManager[Any]:
    if seconds is None:
        return nullcontext()
    if sys.version_info >= (3, 11):
        return asyncio.timeout(seconds)
    return anyio.fail_after(seconds)


class _Connection:
    """One socket to an upstream and the parser of the answer in flight (a fresh one per exchange)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.received_any = False
        self.idle_since = 0.0
        self.keep_alive = True
        self._new_exchange()

    def _new_exchange(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.messages = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.head_done = False
        self.complete = False
        self.body: list[bytes] = []

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.messages += 1  # a second answer to one request: the connection cannot be trusted again

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()

    # ------------------------------------------------------------------
    def close(self) -> None:
        self.writer.close()

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and self.messages == 1

    def _until_close(self) -> bool:
        """Whether the body runs to the end of the connection (neither a length nor chunked framing)."""
        names = {name.lower() for name, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    async def receive(self, read_timeout: float | None) -> None:
        """Read once from the socket and parse what came; at the end of the connection, finish or fail."""
        try:
            async with _deadline(read_timeout):
                data = await self.reader.read(READ_SIZE)
        except TimeoutError as exc:
            raise httpx.ReadTimeout("timed out reading from the upstream") from exc
        except OSError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        if not data:
            if self.head_done and self._until_close():
                self.complete, self.keep_alive = True, False
                return
            what = "mid-response" if self.received_any else "without answering"
            raise httpx.RemoteProtocolError(f"the upstream closed the connection {what}")
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            raise httpx.RemoteProtocolError(f"malformed answer from the upstream: {exc}") from exc

    async def read_head(self, read_timeout: float | None) -> None:
        while not self.head_done:
            await self.receive(read_timeout)

    async def read_body(self, read_timeout: float | None) -> bytes | None:
        """The body bytes parsed so far (reading when there are none), or ``None`` at the end of the answer."""
        while not self.body:
            if self.complete:
                return None
            await self.receive(read_timeout)
        data = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body.clear()
        return data


class _Body(httpx.AsyncByteStream):
    def __init__(self, transport: KeepAliveTransport, origin: Origin, conn: _Connection, timeout: float | None):
        self._transport = transport
        self._origin = origin
        self._conn: _Connection | None = conn
        self._timeout = timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        while True:
            data = await conn.read_body(self._timeout)
            if data is None:
                self._conn = None
                self._transport._release(self._origin, conn)
                return
            yield data

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:  # not read to its end: the connection cannot carry another request
            conn.close()


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """``httpx.AsyncClient(transport=KeepAliveTransport())``; see the module docstring."""

    def __init__(self, *, max_idle_per_origin: int = 1000, keepalive_expiry: float = 4.0) -> None:
        self._idle: dict[Origin, list[_Connection]] = {}
        self._max_idle = max_idle_per_origin
        # Idle connections are dropped before servers drop them (uvicorn: 5 s), so a request is rarely sent on a
        # connection the server is closing, where the retry below could deliver it twice.
        self._keepalive_expiry = keepalive_expiry
        self._fallback = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http" or request.method == "HEAD" or "transfer-encoding" in request.headers:
            # TLS, bodyless answers with a length, streamed uploads: not worth a second code path here
            return await self._fallback.handle_async_request(request)
        timeouts = request.extensions.get("timeout", {})
        origin = (request.url.host, request.url.port or 80)
        body = await request.aread()
        conn = self._checkout(origin)
        if conn is not None:
            try:
                return await self._exchange(request, body, origin, conn, timeouts)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                if conn.received_any:
                    raise
                # the server closed this idle connection before we used it: once more on a new one
        conn = await self._connect(origin, timeouts.get("connect"))
        return await self._exchange(request, body, origin, conn, timeouts)

    async def _exchange(
        self, request: httpx.Request, body: bytes, origin: Origin, conn: _Connection, timeouts: dict[str, Any]
    ) -> httpx.Response:
        try:
            conn.writer.write(_head(request) + body)
            try:
                async with _deadline(timeouts.get("write")):
                    await conn.writer.drain()
            except TimeoutError as exc:
                raise httpx.WriteTimeout("timed out writing to the upstream") from exc
            except OSError as exc:
                raise httpx.WriteError(str(exc) or type(exc).__name__) from exc
            await conn.read_head(timeouts.get("read"))
        except BaseException:
            conn.close()
            raise
        stream = _Body(self, origin, conn, timeouts.get("read"))
        return httpx.Response(
            conn.parser.get_status_code(),
            headers=conn.headers,
            stream=stream,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": conn.reason},
        )

    def _checkout(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            fresh = time.monotonic() - conn.idle_since < self._keepalive_expiry
            if fresh and not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn
            conn.close()
        return None

    def _release(self, origin: Origin, conn: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if not conn.reusable() or len(idle) >= self._max_idle:
            conn.close()
            return
        conn._new_exchange()
        conn.received_any = False
        conn.idle_since = time.monotonic()
        idle.append(conn)

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        try:
            async with _deadline(timeout):
                reader, writer = await asyncio.open_connection(origin[0], origin[1], limit=READ_SIZE * 4)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"timed out connecting to {origin[0]}:{origin[1]}") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"{origin[0]}:{origin[1]}: {exc.strerror or exc}") from exc
        return _Connection(reader, writer)

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        await self._fallback.aclose()


def _head(request: httpx.Request) -> bytes:
    """The request line and headers. httpx has already validated them and set Host and Content-Length."""
    lines = [b"%s %s HTTP/1.1" % (request.method.encode(), request.url.raw_path)]
    lines += [b"%s: %s" % (name, value) for name, value in request.headers.raw]
    return b"\r\n".join(lines) + b"\r\n\r\n"
