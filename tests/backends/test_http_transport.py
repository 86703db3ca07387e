"""KeepAliveTransport against a raw asyncio HTTP/1.1 server that counts its connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from backends.http_transport import KeepAliveTransport


class RawServer:
    """Answers every request with ``body``; ``close_after_response`` closes the socket once answered;
    ``drop_mid_body`` sends half a chunked body and closes."""

    def __init__(self, body: bytes = b"hello") -> None:
        self.body = body
        self.connections = 0
        self.requests = 0
        self.close_after_response = False
        self.drop_mid_body = False
        self.server: asyncio.Server | None = None
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                self.requests += 1
                if self.drop_mid_body:
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                    await writer.drain()
                    break
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(self.body), self.body))
                await writer.drain()
                if self.close_after_response:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=KeepAliveTransport(), timeout=2) as c:
        yield c


async def test_sequential_requests_share_one_connection(client) -> None:
    async with RawServer() as server:
        for _ in range(5):
            response = await client.post(f"http://127.0.0.1:{server.port}/x", json={"a": 1})
            assert response.status_code == 200 and response.content == b"hello"
        assert (server.connections, server.requests) == (1, 5)


async def test_idle_connection_closed_by_server_is_replaced(client) -> None:
    async with RawServer() as server:
        server.close_after_response = True
        for _ in range(3):
            assert (await client.get(f"http://127.0.0.1:{server.port}/")).content == b"hello"
            await asyncio.sleep(0.05)
        assert server.connections == 3


async def test_unfinished_body_closes_the_connection(client) -> None:
    async with RawServer(body=b"x" * 100) as server:
        async with client.stream("GET", f"http://127.0.0.1:{server.port}/") as response:
            assert response.status_code == 200  # body left unread
        await client.get(f"http://127.0.0.1:{server.port}/")
        assert server.connections == 2


async def test_connection_dropped_mid_body_is_a_protocol_error(client) -> None:
    async with RawServer() as server:
        server.drop_mid_body = True
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(f"http://127.0.0.1:{server.port}/")


async def test_refused_connection_is_a_connect_error(client) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(httpx.ConnectError):
        await client.get(f"http://127.0.0.1:{port}/")


async def answering(raw: bytes) -> asyncio.Server:
    """A server that reads one request head and writes ``raw`` back, then closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(raw)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_chunked_body_headers_and_a_body_that_runs_to_the_close(client) -> None:
    chunked = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    until_close = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nno length, no chunks"
    for raw, status, content in ((chunked, 201, b"abcde"), (until_close, 200, b"no length, no chunks")):
        server = await answering(raw)
        port = server.sockets[0].getsockname()[1]
        response = await client.get(f"http://127.0.0.1:{port}/")
        assert (response.status_code, response.content) == (status, content)
        if status == 201:
            assert response.headers["x-a"] == "1" and response.reason_phrase == "Created"
        server.close()


async def test_a_malformed_answer_is_a_protocol_error(client) -> None:
    server = await answering(b"HTTP/1.1 abc Nonsense\r\n\r\n")
    port = server.sockets[0].getsockname()[1]
    with pytest.raises(httpx.RemoteProtocolError, match="malformed"):
        await client.get(f"http://127.0.0.1:{port}/")
    server.close()
