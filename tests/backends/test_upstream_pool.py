"""UpstreamPool routing, failover and health, against real local servers (fake OpenAI-compatible upstreams)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from backends.openai_compat import OpenAICompatBackend
from backends.upstream_pool import Timeouts, UpstreamPool
from gateway.errors import BackendUnavailable, UpstreamError
from tests.backends.fakes import openai as fake
from tests.backends.fakes.recording import Recorder
from tests.backends.fakes.server import ServerThread, free_port, serve
from tests.backends.support import collect, gen_request, text_of

ANSWERS = {"base": "one two three four five six"}
FAST = Timeouts(connect=0.5, first_byte=0.5, idle=0.5, health=0.5, health_interval=0)


@pytest.fixture
def recorders() -> tuple[Recorder, Recorder]:
    return Recorder(), Recorder()


@pytest.fixture
def replicas(recorders):  # type: ignore[no-untyped-def]
    with serve(fake.create_app(ANSWERS, recorders[0])) as a, serve(fake.create_app(ANSWERS, recorders[1])) as b:
        yield a, b


def backend_for(urls: list[str], timeouts: Timeouts = FAST) -> OpenAICompatBackend:
    return OpenAICompatBackend(UpstreamPool(urls, timeouts=timeouts), base_model="base")


def calls(recorder: Recorder) -> int:
    return len(recorder.bodies("/v1/completions"))


async def test_failover_when_first_replica_refuses_connections(replicas, recorders) -> None:
    b = backend_for([f"http://127.0.0.1:{free_port()}", replicas[1].url])
    deltas = await collect(b.generate(gen_request()))
    assert text_of(deltas) == ANSWERS["base"]
    assert calls(recorders[1]) == 1
    assert not b.pool.replicas[0].healthy, "a refused connection marks the replica down"
    await b.aclose()


async def test_failover_on_5xx_before_first_byte(replicas, recorders) -> None:
    recorders[0].faults.status = 503
    b = backend_for([replicas[0].url, replicas[1].url])
    deltas = await collect(b.generate(gen_request()))
    assert text_of(deltas) == ANSWERS["base"]
    assert (calls(recorders[0]), calls(recorders[1])) == (1, 1), "tried on A, answered by B"
    await b.aclose()


async def test_failover_on_first_byte_timeout(replicas, recorders) -> None:
    recorders[0].faults.delay_first = 2.0
    b = backend_for([replicas[0].url, replicas[1].url])
    start = time.perf_counter()
    deltas = await collect(b.generate(gen_request()))
    assert text_of(deltas) == ANSWERS["base"]
    assert 0.4 < time.perf_counter() - start < 1.5
    assert calls(recorders[1]) == 1
    await b.aclose()


async def test_no_retry_after_the_first_byte(replicas, recorders) -> None:
    recorders[0].faults.drop_after = 2
    b = backend_for([replicas[0].url, replicas[1].url])
    got = []
    with pytest.raises(UpstreamError):
        async for delta in b.generate(gen_request()):
            got.append(delta)
    assert text_of(got) == "one two"
    assert calls(recorders[1]) == 0, "bytes already reached the caller: never replayed elsewhere"
    await b.aclose()


async def test_idle_timeout_mid_stream(replicas, recorders) -> None:
    recorders[0].faults.delay_each = 1.0
    b = backend_for([replicas[0].url])
    start = time.perf_counter()
    with pytest.raises(UpstreamError, match="sent nothing"):
        await collect(b.generate(gen_request()))
    assert time.perf_counter() - start < 1.2
    await b.aclose()


async def test_client_errors_are_not_retried(replicas, recorders) -> None:
    recorders[0].faults.status = 400
    b = backend_for([replicas[0].url, replicas[1].url])
    with pytest.raises(Exception) as info:
        await collect(b.generate(gen_request()))
    assert info.value.status_code == 400
    assert calls(recorders[1]) == 0
    await b.aclose()


async def test_all_replicas_down_is_503_fast() -> None:
    b = backend_for([f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"])
    start = time.perf_counter()
    with pytest.raises(BackendUnavailable, match="no upstream replica"):
        await collect(b.generate(gen_request()))
    assert time.perf_counter() - start < 0.3
    await b.aclose()


async def test_all_replicas_5xx_keeps_the_upstream_error(replicas, recorders) -> None:
    recorders[0].faults.status = recorders[1].faults.status = 500
    b = backend_for([replicas[0].url, replicas[1].url])
    with pytest.raises(UpstreamError, match="engine failure injected"):
        await collect(b.generate(gen_request()))
    await b.aclose()


async def test_least_in_flight_routing(replicas, recorders) -> None:
    recorders[0].faults.delay_each = recorders[1].faults.delay_each = 0.05
    b = backend_for([replicas[0].url, replicas[1].url], Timeouts(health_interval=0))
    streams = [b.generate(gen_request()) for _ in range(4)]
    firsts = await asyncio.gather(*(s.__anext__() for s in streams))
    assert all(d.text == "one" for d in firsts)
    assert [r.in_flight for r in b.pool.replicas] == [2, 2]
    assert (calls(recorders[0]), calls(recorders[1])) == (2, 2)
    for s in streams:
        await s.aclose()
    assert [r.in_flight for r in b.pool.replicas] == [0, 0]
    await b.aclose()


async def test_health_checks_mark_down_and_up_in_background(recorders) -> None:
    a = ServerThread(fake.create_app(ANSWERS, recorders[0])).start()
    pool = UpstreamPool([a.url], timeouts=Timeouts(health=0.3, health_interval=0.1))
    await pool.start()
    assert pool.health().ok
    recorders[0].faults.health_status = 503
    await asyncio.sleep(0.35)
    assert not pool.health().ok
    assert "503" in pool.replicas[0].last_error
    recorders[0].faults.health_status = 200
    await asyncio.sleep(0.35)
    assert pool.health().ok
    a.stop()
    await asyncio.sleep(0.35)
    assert not pool.health().ok
    await pool.aclose()
    assert pool._health_task is None


async def test_unhealthy_replica_is_tried_last(replicas, recorders) -> None:
    recorders[0].faults.health_status = 503
    b = backend_for([replicas[0].url, replicas[1].url])
    await b.pool.check_health()
    for _ in range(3):
        await collect(b.generate(gen_request()))
    assert (calls(recorders[0]), calls(recorders[1])) == (0, 3)
    await b.aclose()


async def test_error_event_before_any_text_is_retried_on_another_replica(replicas, recorders) -> None:
    recorders[0].faults.error_after = 0  # 200, then {"error": {..., "code": 500}} as the first event
    b = backend_for([replicas[0].url, replicas[1].url])
    deltas = await collect(b.generate(gen_request()))
    assert text_of(deltas) == ANSWERS["base"]
    assert (calls(recorders[0]), calls(recorders[1])) == (1, 1)
    assert not b.pool.replicas[0].healthy
    recorders[1].faults.error_after = 0
    with pytest.raises(UpstreamError, match="engine died"):
        await collect(b.generate(gen_request()))
    await b.aclose()


class _Flood(httpx.AsyncByteStream):
    """An answer whose bytes are always ready: no read of it ever suspends (an upstream faster than the gateway)."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(5000):
            yield b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n'
        yield b"data: [DONE]\n\n"


async def test_a_stream_that_never_waits_still_lets_other_tasks_run() -> None:
    # Otherwise a client's hang-up (noticed by another task) would go unnoticed until the upstream finished.
    transport = httpx.MockTransport(lambda request: httpx.Response(200, stream=_Flood()))
    pool = UpstreamPool(["http://upstream"], timeouts=FAST, transport=transport)
    other = asyncio.create_task(asyncio.sleep(0))  # done after a few turns of the event loop
    lines = 0
    async for _ in pool.stream_lines("/v1/completions", {}):
        lines += 1
        if other.done():
            break
    await pool.aclose()
    assert other.done() and lines < 1000, "the other task ran while the answer was still streaming"
