"""A lean HTTP/1.1 keep-alive transport for the shared ``httpx.AsyncClient`` of an upstream pool.

Why not httpx's default transport: httpcore's connection pool re-scans every pooled connection (with socket
checks) on each request and response event, so with a few hundred concurrent upstream streams it burns more CPU
than the proxying itself (measured: ~3.5M ``is_idle`` calls for 300 requests at 50 concurrent). Here idle
connections wait per origin in a list (O(1) checkout and return) and the response is parsed straight off an
asyncio stream: the head with one ``readuntil``, each chunk of a chunked body with two buffered reads. That is
the whole client side of HTTP/1.1 an upstream needs: Content-Length, chunked (trailers skipped) and
read-until-close bodies, 1xx answers skipped, no body for HEAD/204/304. Plain ``http://`` only; anything else
(``https://``) goes to httpx's own transport.

Contract (as httpx's): exceptions are httpx's ``TransportError`` family (``ConnectError``, ``ReadError``,
``WriteError``, ``RemoteProtocolError``, ``ConnectTimeout``, ``ReadTimeout``, ``WriteTimeout``); closing a
response before its end closes the connection; a response read to its end returns the connection for reuse. A
request that fails on a reused connection before any response byte (the server closed it while idle) is
retried once on a new connection.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import anyio
import httpx

Origin = tuple[str, int]
T = TypeVar("T")
STREAM_LIMIT = 1 << 20  # longest head or chunk-size line we accept


def _deadline(seconds: float | None) -> AbstractAsyncContextManager[Any]:
    if sys.version_info >= (3, 11):
        return asyncio.timeout(seconds)
    return anyio.fail_after(seconds)


async def _timed(awaitable: Awaitable[T], seconds: float | None) -> T:
    """``await awaitable`` within ``seconds`` (``None``: no timer at all), translating failures to httpx's."""
    try:
        if seconds is None:
            return await awaitable
        async with _deadline(seconds):
            return await awaitable
    except TimeoutError as exc:
        raise httpx.ReadTimeout("timed out reading from the upstream") from exc
    except asyncio.IncompleteReadError as exc:
        raise httpx.RemoteProtocolError("the upstream closed the connection mid-response") from exc
    except asyncio.LimitOverrunError as exc:
        raise httpx.RemoteProtocolError("the upstream sent an over-long line") from exc
    except OSError as exc:
        raise httpx.ReadError(str(exc) or type(exc).__name__) from exc


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()

    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()


class _Head:
    def __init__(self, raw: bytes) -> None:
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise httpx.RemoteProtocolError(f"malformed status line from the upstream: {lines[0][:100]!r}")
        self.http_10 = parts[0] == "HTTP/1.0"
        self.status = int(parts[1])
        self.reason = parts[2] if len(parts) > 2 else ""
        self.headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise httpx.RemoteProtocolError(f"malformed header line from the upstream: {line[:100]!r}")
            self.headers.append((name.strip(), value.strip()))

    def get(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


class _Body(httpx.AsyncByteStream):
    """The body of one response; reading it to its end hands the connection back to the transport."""

    def __init__(
        self,
        transport: KeepAliveTransport,
        origin: Origin,
        conn: _Connection,
        head: _Head,
        method: str,
        timeout: float | None,
    ) -> None:
        self._transport = transport
        self._origin = origin
        self._conn: _Connection | None = conn
        self._timeout = timeout
        self._keep_alive = (head.get("connection") or "").lower() != "close" and not head.http_10
        length = head.get("content-length")
        if method == "HEAD" or head.status in (204, 304):
            self._mode, self._length = "none", 0
        elif "chunked" in (head.get("transfer-encoding") or "").lower():
            self._mode, self._length = "chunked", 0
        elif length is not None and length.isdigit():
            self._mode, self._length = "length", int(length)
        else:
            self._mode, self._length, self._keep_alive = "close", 0, False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        reader, timeout = conn.reader, self._timeout
        if self._mode == "chunked":
            while True:
                line = await _timed(reader.readuntil(b"\r\n"), timeout)
                try:
                    size = int(line.split(b";", 1)[0], 16)
                except ValueError as exc:
                    raise httpx.RemoteProtocolError(f"bad chunk size from the upstream: {line[:40]!r}") from exc
                if size == 0:
                    while await _timed(reader.readuntil(b"\r\n"), timeout) != b"\r\n":
                        pass  # trailers
                    break
                data = await _timed(reader.readexactly(size + 2), timeout)
                yield data[:-2]
        elif self._mode == "length":
            remaining = self._length
            while remaining:
                data = await _timed(reader.read(min(remaining, 1 << 16)), timeout)
                if not data:
                    raise httpx.RemoteProtocolError("the upstream closed the connection mid-response")
                remaining -= len(data)
                yield data
        elif self._mode == "close":
            while data := await _timed(reader.read(1 << 16), timeout):
                yield data
        self._conn = None
        self._transport._release(self._origin, conn, self._keep_alive)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:  # not read to its end: the connection cannot carry another request
            conn.close()


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """``httpx.AsyncClient(transport=KeepAliveTransport())``; see the module docstring."""

    def __init__(self, *, max_idle_per_origin: int = 1000) -> None:
        self._idle: dict[Origin, list[_Connection]] = {}
        self._max_idle = max_idle_per_origin
        self._fallback = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            return await self._fallback.handle_async_request(request)
        timeouts = request.extensions.get("timeout", {})
        origin = (request.url.host, request.url.port or 80)
        message = self._serialize(request, await request.aread())
        conn = self._checkout(origin)
        if conn is not None:
            try:
                return await self._exchange(request.method, message, origin, conn, timeouts, reused=True)
            except _StaleConnection:
                pass  # the server closed this idle connection before we used it: once more on a new one
        conn = await self._connect(origin, timeouts.get("connect"))
        return await self._exchange(request.method, message, origin, conn, timeouts, reused=False)

    @staticmethod
    def _serialize(request: httpx.Request, body: bytes) -> bytes:
        lines = [f"{request.method} {request.url.raw_path.decode('ascii')} HTTP/1.1".encode("ascii")]
        names = set()
        for name, value in request.headers.raw:
            names.add(name.lower())
            lines.append(name + b": " + value)
        if body and b"content-length" not in names and b"transfer-encoding" not in names:
            lines.append(b"Content-Length: " + str(len(body)).encode("ascii"))
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    async def _exchange(
        self, method: str, message: bytes, origin: Origin, conn: _Connection, timeouts: dict[str, Any], reused: bool
    ) -> httpx.Response:
        try:
            conn.writer.write(message)
            try:
                async with _deadline(timeouts.get("write")):
                    await conn.writer.drain()
            except TimeoutError as exc:
                raise httpx.WriteTimeout("timed out writing to the upstream") from exc
            except OSError as exc:
                if reused:
                    raise _StaleConnection from exc
                raise httpx.WriteError(str(exc) or type(exc).__name__) from exc
            while True:
                raw = await self._read_head(conn, timeouts.get("read"), reused)
                head = _Head(raw)
                if not 100 <= head.status < 200:
                    break
        except BaseException:
            conn.close()
            raise
        stream = _Body(self, origin, conn, head, method, timeouts.get("read"))
        return httpx.Response(
            head.status,
            headers=head.headers,
            stream=stream,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": head.reason.encode("latin-1")},
        )

    @staticmethod
    async def _read_head(conn: _Connection, timeout: float | None, reused: bool) -> bytes:
        try:
            async with _deadline(timeout):
                return await conn.reader.readuntil(b"\r\n\r\n")
        except TimeoutError as exc:
            raise httpx.ReadTimeout("timed out waiting for the upstream's answer") from exc
        except asyncio.IncompleteReadError as exc:
            if reused and not exc.partial:
                raise _StaleConnection from exc
            raise httpx.RemoteProtocolError("the upstream closed the connection without answering") from exc
        except asyncio.LimitOverrunError as exc:
            raise httpx.RemoteProtocolError("the upstream sent an over-long response head") from exc
        except OSError as exc:
            if reused:
                raise _StaleConnection from exc
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc

    def _checkout(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn
            conn.close()
        return None

    def _release(self, origin: Origin, conn: _Connection, keep_alive: bool) -> None:
        idle = self._idle.setdefault(origin, [])
        if not keep_alive or len(idle) >= self._max_idle or not conn.usable():
            conn.close()
            return
        idle.append(conn)

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        try:
            async with _deadline(timeout):
                reader, writer = await asyncio.open_connection(origin[0], origin[1], limit=STREAM_LIMIT)
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


class _StaleConnection(Exception):
    """A reused keep-alive connection turned out closed before any byte of the answer."""
