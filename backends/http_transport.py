"""A lean HTTP/1.1 keep-alive transport for the shared ``httpx.AsyncClient`` of an upstream pool.

Why not httpx's default transport: httpcore's connection pool re-scans every pooled connection (with socket
checks) on each request and response event, so with a few hundred concurrent upstream streams it burns more CPU
than the proxying itself (measured: ~3.5M ``is_idle`` calls for 300 requests at 50 concurrent). This transport
keeps idle connections per origin in a list (O(1) checkout/return), parses with ``h11`` and reads the body
straight off an asyncio stream. It speaks plain ``http://`` only; anything else goes to httpx's transport.

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
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import h11
import httpx

Origin = tuple[str, int]
READ_SIZE = 65536


def _deadline(seconds: float | None) -> AbstractAsyncContextManager[Any]:
    if sys.version_info >= (3, 11):
        return asyncio.timeout(seconds)
    return anyio.fail_after(seconds) if seconds is not None else anyio.CancelScope()


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)
        self.received_any = False
        self.idle_since = 0.0

    def close(self) -> None:
        self.writer.close()

    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def next_event(self, read_timeout: float | None) -> Any:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc)) from exc
            if event is not h11.NEED_DATA:
                return event
            try:
                async with _deadline(read_timeout):
                    data = await self.reader.read(READ_SIZE)
            except TimeoutError as exc:
                raise httpx.ReadTimeout("timed out reading from the upstream") from exc
            except OSError as exc:
                raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
            if data:
                self.received_any = True
            self.h11.receive_data(data)


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
            event = await conn.next_event(self._timeout)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._conn = None
                self._transport._release(self._origin, conn)
                return
            elif isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError("the upstream closed the connection mid-response")

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
        if request.url.scheme != "http":
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
            headers = [(k, v) for k, v in request.headers.raw]
            out = conn.h11.send(h11.Request(method=request.method, target=request.url.raw_path, headers=headers))
            if body:
                out += conn.h11.send(h11.Data(data=body))
            out += conn.h11.send(h11.EndOfMessage())
            conn.writer.write(out)
            try:
                async with _deadline(timeouts.get("write")):
                    await conn.writer.drain()
            except TimeoutError as exc:
                raise httpx.WriteTimeout("timed out writing to the upstream") from exc
            except OSError as exc:
                raise httpx.WriteError(str(exc) or type(exc).__name__) from exc
            while True:
                event = await conn.next_event(timeouts.get("read"))
                if isinstance(event, h11.Response):
                    break
                if isinstance(event, h11.ConnectionClosed):
                    raise httpx.RemoteProtocolError("the upstream closed the connection without answering")
        except BaseException:
            conn.close()
            raise
        stream = _Body(self, origin, conn, timeouts.get("read"))
        return httpx.Response(
            event.status_code,
            headers=list(event.headers),
            stream=stream,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": bytes(event.reason)},
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
        conn.h11.start_next_cycle()
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
