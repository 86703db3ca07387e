"""A pool of interchangeable HTTP upstream replicas behind one shared ``httpx.AsyncClient``.

Contract:

* A request goes to the healthy replica with the fewest requests in flight (ties: the first configured); a request
  for a LoRA adapter first to the replicas where it is active (``backends.lora_affinity``: the Inference
  Extension's lora-affinity scores), then by fewest in flight. Replicas marked unhealthy are tried only after every
  healthy one, so a recovered upstream is found again without waiting for the next health check.
* ``prepare(replica)`` runs before a request is sent to a replica (the vLLM backend registers the adapter there);
  ``repair(replica, status, body)`` may fix a 4xx answer (re-register a LoRA the replica forgot), after which the
  same replica is tried once more.
* A replica that was down and answers its health check again, or is marked down, loses what the pool knew of it
  (``registered`` adapters, LoRA residency): a restarted upstream has forgotten runtime-loaded adapters.
* A replica that fails *before the first line of its answer* (connection refused, connect/first-byte timeout,
  a 5xx status) is retried on the next replica. Once a line has been handed to the caller nothing is retried:
  the failure surfaces as ``UpstreamError``.
* Nothing reachable -> ``BackendUnavailable`` (503), as fast as the connect attempts fail.
* 4xx answers are not retried; they are turned into our errors by the caller's ``ErrorMapper``.
* Health checks run in a background task between ``start()`` and ``aclose()``; ``check_health()`` runs one round,
  then the ``watchers`` (``add_watcher``) for every healthy replica, e.g. a scrape of its LoRA residency.

Every foreign exception (httpx, timeouts, JSON) is translated here or in the protocol modules that use the pool.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from backends.base import Delta, Health
from backends.http_transport import KeepAliveTransport
from backends.lora_affinity import LoraResidency
from gateway.errors import BackendUnavailable, GatewayError, UpstreamError
from gateway.request_context import current_request

YIELD_EVERY_READS = 8

ErrorMapper = Callable[[int, bytes], GatewayError]
"""Turns an upstream error answer (HTTP status, raw body) into one of our errors."""


def _deadline(seconds: float | None) -> AbstractAsyncContextManager[Any]:
    """A cheap per-await timeout raising ``TimeoutError`` (asyncio.timeout on 3.11+, anyio before)."""
    if sys.version_info >= (3, 11):
        return asyncio.timeout(seconds)
    return anyio.fail_after(seconds)


@dataclass(frozen=True)
class Timeouts:
    """Seconds. ``first_byte`` runs from the start of an attempt to the first line of the answer (prefill
    included); ``idle`` is the longest silence allowed between two lines of a stream afterwards."""

    connect: float = 2.0
    first_byte: float = 120.0
    idle: float = 60.0
    request: float = 30.0  # whole non-streaming calls (model lists, adapter loads)
    health: float = 2.0
    health_interval: float = 5.0


@dataclass
class Replica:
    """One upstream base URL and what the pool knows about it."""

    url: str
    healthy: bool = True
    in_flight: int = 0
    last_error: str = ""
    registered: set[str] = field(default_factory=set)  # adapters the upstream confirmed it serves
    refused: dict[str, str] = field(default_factory=dict)  # adapter -> why it cannot load it (not routed there)
    lora: LoraResidency = field(default_factory=LoraResidency)

    def forget_adapters(self) -> None:
        """It restarted, or may have: what it had loaded is unknown until asked again."""
        self.registered.clear()
        self.refused.clear()
        self.lora.forget()


Watcher = Callable[[Replica], Awaitable[None]]


def default_error_mapper(status: int, body: bytes) -> GatewayError:
    return UpstreamError(f"upstream answered HTTP {status}: {body[:200].decode('utf-8', 'replace')}")


class UpstreamPool:
    """Replicas of one upstream service. Build it, ``await start()``, use, ``await aclose()``."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeouts: Timeouts | None = None,
        health_path: str = "/health",
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_idle_connections: int = 1000,
    ) -> None:
        if not urls:
            raise ValueError("an upstream pool needs at least one URL")
        self.replicas = tuple(Replica(url.rstrip("/")) for url in urls)
        self.timeouts = timeouts or Timeouts()
        self.health_path = health_path
        t = self.timeouts
        # The read timeout here bounds non-streaming calls (health, model lists, adapter loads); streams use
        # ``_stream_timeout`` and the first-byte and idle deadlines of ``stream_lines``.
        if transport is None:
            transport = KeepAliveTransport(max_idle_per_origin=max_idle_connections)
        self._client = httpx.AsyncClient(
            headers=headers,
            transport=transport,
            timeout=httpx.Timeout(connect=t.connect, read=t.request, write=t.request, pool=t.connect),
        )
        # Streams get no per-read timer from httpx: the first-byte and idle deadlines below already bound each read.
        self._stream_timeout = httpx.Timeout(connect=t.connect, read=None, write=t.request, pool=t.connect)
        self._health_task: asyncio.Task[None] | None = None
        self._watchers: list[Watcher] = []
        self.lora_affinity = True  # False: fewest in flight only (the baseline of bench/lora_affinity.py)

    def add_watcher(self, watcher: Watcher) -> None:
        """Run ``watcher(replica)`` for each healthy replica after every health round (its errors are its own)."""
        self._watchers.append(watcher)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Run one health round now, then keep checking every ``health_interval`` seconds in the background."""
        await self.check_health()
        if self._health_task is None and self.timeouts.health_interval > 0:
            self._health_task = asyncio.create_task(self._health_loop(), name="upstream-health")

    async def aclose(self) -> None:
        """Stop health checks and close every connection. Idempotent."""
        task, self._health_task = self._health_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self._client.aclose()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.timeouts.health_interval)
            await self.check_health()

    async def check_health(self) -> None:
        """Probe every replica's ``health_path`` concurrently; a 2xx marks it healthy. Then run the watchers."""
        await asyncio.gather(*(self._probe(replica) for replica in self.replicas))

    async def _probe(self, replica: Replica) -> None:
        try:
            response = await self._client.get(replica.url + self.health_path, timeout=self.timeouts.health)
        except httpx.HTTPError as exc:
            self._mark_down(replica, exc)
            return
        if response.is_success and not replica.healthy:
            replica.forget_adapters()  # back from down: possibly a fresh process
        replica.healthy = response.is_success
        if replica.healthy:
            for watcher in self._watchers:
                await watcher(replica)
        replica.last_error = "" if response.is_success else f"health check answered HTTP {response.status_code}"

    def health(self) -> Health:
        healthy = [r.url for r in self.replicas if r.healthy]
        return Health(
            ok=bool(healthy),
            detail=f"{len(healthy)}/{len(self.replicas)} upstream replicas healthy",
            extra={
                r.url: {"healthy": r.healthy, "in_flight": r.in_flight, "error": r.last_error} for r in self.replicas
            },
        )

    # ------------------------------------------------------------------ routing
    def candidates(self, adapter: str | None = None) -> list[Replica]:
        """Replicas in the order to try them: healthy ones (for an adapter: by lora-affinity score, then) by fewest
        in flight, then unhealthy ones. Replicas that refused ``adapter`` are left out."""
        usable = [r for r in self.replicas if adapter is None or adapter not in r.refused]
        if adapter is None or not self.lora_affinity:
            healthy = sorted((r for r in usable if r.healthy), key=lambda r: r.in_flight)
        else:
            healthy = sorted((r for r in usable if r.healthy), key=lambda r: (-r.lora.score(adapter), r.in_flight))
        return healthy + [r for r in usable if not r.healthy]

    def _mark_down(self, replica: Replica, exc: BaseException) -> None:
        if replica.healthy:
            replica.forget_adapters()
        replica.healthy = False
        replica.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    async def stream_lines(
        self,
        path: str,
        payload: dict[str, Any],
        *,
        error_mapper: ErrorMapper = default_error_mapper,
        first_line_error: Callable[[str], GatewayError | None] | None = None,
        adapter: str | None = None,
        prepare: Watcher | None = None,
        repair: Callable[[Replica, int, bytes], Awaitable[bool]] | None = None,
    ) -> AsyncGenerator[str, None]:
        """POST ``payload`` as JSON and yield the answer line by line (blank lines included).

        Retries on another replica until the first non-blank line arrives; never after. ``first_line_error``
        recognises an in-stream error object as that first line: a 5xx-class one is retried like a 5xx status.
        Closing the iterator before the answer ended closes the upstream connection, which is how the upstream
        learns the request was cancelled; reading it to the end returns the connection to the keep-alive pool.
        ``adapter`` (the upstream's LoRA name) orders the replicas; ``prepare`` and ``repair``: see the module doc.
        """
        failures: list[str] = []
        answered: GatewayError | None = None  # the error of the last replica that answered with a 5xx
        queue = self.candidates(adapter)
        repaired: set[str] = set()
        while queue:
            replica = queue.pop(0)
            if prepare is not None:
                try:
                    await prepare(replica)
                except BackendUnavailable as exc:  # unreachable; the pool marked it down
                    failures.append(f"{replica.url}: {exc.message}")
                    continue
                except GatewayError as exc:  # it cannot take the adapter
                    failures.append(f"{replica.url}: {exc.message}")
                    answered = exc
                    continue
            replica.in_flight += 1
            if adapter is not None:
                replica.lora.begin(adapter)
            response: httpx.Response | None = None
            try:
                try:
                    async with _deadline(self.timeouts.first_byte):
                        request = self._client.build_request(
                            "POST", replica.url + path, json=payload, timeout=self._stream_timeout,
                            headers=_request_headers(),
                        )
                        response = await self._client.send(request, stream=True)
                        if response.status_code >= 400:
                            body = await response.aread()
                            error = error_mapper(response.status_code, body)
                            if response.status_code < 500:
                                if (repair is not None and replica.url not in repaired
                                        and await repair(replica, response.status_code, body)):
                                    repaired.add(replica.url)  # fixed: the same replica once more
                                    queue.insert(0, replica)
                                    continue
                                raise error
                            replica.last_error = f"HTTP {response.status_code}"
                            failures.append(f"{replica.url}: HTTP {response.status_code}")
                            answered = error
                            continue
                        reader = _LineReader(response.aiter_bytes())
                        lines = await reader.read()
                        while not any(line.strip() for line in lines):
                            lines += await reader.read()
                        first = next(line for line in lines if line.strip())
                        in_stream = first_line_error(first) if first_line_error is not None else None
                        if in_stream is not None:
                            if in_stream.status_code < 500:
                                raise in_stream
                            # 200 and then an error before any text (a dead engine): nothing reached the
                            # caller yet, so another replica may still answer.
                            replica.healthy, replica.last_error = False, f"error event: {in_stream.message}"
                            failures.append(f"{replica.url}: {replica.last_error}")
                            answered = in_stream
                            continue
                except StopAsyncIteration:
                    failures.append(f"{replica.url}: empty answer")
                    answered = UpstreamError(f"upstream {replica.url} closed the stream without answering")
                    continue
                except (httpx.TransportError, TimeoutError) as exc:
                    self._mark_down(replica, exc)
                    failures.append(f"{replica.url}: {replica.last_error}")
                    continue
                replica.healthy = True
                observer = current_request()
                if observer is not None:
                    observer.replica = replica.url
                reads = 0
                while True:
                    for line in lines:
                        yield line
                    # A turn for the event loop every few reads: from an upstream faster than us every read finds
                    # bytes buffered and returns without suspending, so without this a long answer holds the loop to
                    # its end (the client's hang-up and our cancellation unnoticed, other requests stalled). Not every
                    # read: resuming the whole generator chain costs ~10 us, and reads normally suspend anyway.
                    reads += 1
                    if reads % YIELD_EVERY_READS == 0:
                        await asyncio.sleep(0)
                    try:
                        async with _deadline(self.timeouts.idle):
                            lines = await reader.read()
                    except StopAsyncIteration:
                        return
                    except TimeoutError as exc:
                        raise UpstreamError(
                            f"upstream {replica.url} sent nothing for {self.timeouts.idle:g}s mid-stream"
                        ) from exc
                    except httpx.HTTPError as exc:
                        self._mark_down(replica, exc)
                        raise UpstreamError(
                            f"upstream {replica.url} broke off the stream: {replica.last_error}"
                        ) from exc
            finally:
                replica.in_flight -= 1
                if adapter is not None:
                    replica.lora.end(adapter)
                if response is not None:
                    await response.aclose()
        if answered is not None:
            raise answered
        raise BackendUnavailable("no upstream replica could be reached: " + "; ".join(failures))

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: Any = None,
        replica: Replica | None = None,
        error_mapper: ErrorMapper = default_error_mapper,
        ok_statuses: tuple[int, ...] = (),
    ) -> httpx.Response:
        """One non-streaming call, to ``replica`` or to the best candidate (retried before any answer).

        Returns the response when its status is 2xx or in ``ok_statuses``; otherwise raises ``error_mapper``'s error.
        """
        targets = [replica] if replica is not None else self.candidates()
        failures: list[str] = []
        for target in targets:
            try:
                response = await self._client.request(
                    method, target.url + path, json=json, content=content, timeout=self.timeouts.request,
                    headers=_request_headers(),
                )
            except httpx.TransportError as exc:
                self._mark_down(target, exc)
                failures.append(f"{target.url}: {target.last_error}")
                continue
            if response.is_success or response.status_code in ok_statuses:
                return response
            raise error_mapper(response.status_code, response.content)
        raise BackendUnavailable("no upstream replica could be reached: " + "; ".join(failures))


def _request_headers() -> dict[str, str] | None:
    """``x-request-id`` of the request being served, so upstream logs can be matched with ours."""
    ctx = current_request()
    return None if ctx is None or not ctx.request_id else {"x-request-id": ctx.request_id}


class _LineReader:
    """Complete lines from a byte stream, one network read at a time (a line never splits a UTF-8 character:
    byte 0x0A only ever encodes ``\\n``). ``read()`` raises ``StopAsyncIteration`` at the end of the stream."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._rest = b""

    async def read(self) -> list[str]:
        while True:
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                if self._rest:
                    rest, self._rest = self._rest, b""
                    return [rest.decode("utf-8", "replace").rstrip("\r")]
                raise
            data = self._rest + chunk
            cut = data.rfind(b"\n")
            if cut < 0:
                self._rest = data
                continue
            self._rest = data[cut + 1 :]
            return [line.rstrip("\r") for line in data[:cut].decode("utf-8", "replace").split("\n")]


async def relay(
    lines: AsyncGenerator[str, None], parse: Callable[[AsyncGenerator[str, None]], AsyncGenerator[Delta, None]]
) -> AsyncGenerator[Delta, None]:
    """Deltas parsed from an upstream's lines. Closing this iterator closes the parser and then the lines, which
    closes the upstream connection at once (not at garbage collection): that is how the upstream learns of a cancel.
    """
    deltas = parse(lines)
    try:
        async for delta in deltas:
            yield delta
    finally:
        await deltas.aclose()
        await lines.aclose()
