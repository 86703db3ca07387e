"""Engine bounds through a real server: a full queue answers 429 with ``Retry-After``; a client that hangs up
frees its batch row at once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gateway.demo import DemoModels

LONG = {"model": "tiny-qwen", "prompt": "你好", "max_tokens": 2000, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server(demo_models: DemoModels, demo_cache_home: Path) -> Iterator[str]:
    from tests.servers import running_gateway

    args = ["--demo", "--max-batch-size", "1", "--max-queue", "1"]
    with running_gateway(args, env={"XDG_CACHE_HOME": str(demo_cache_home)}) as url:
        yield url


def health(server: str) -> dict[str, int]:
    return httpx.get(f"{server}/health", timeout=5).json()  # type: ignore[no-any-return]


def wait_for(condition: object, seconds: float) -> float:
    """Seconds until ``condition()`` held; fails the test after ``seconds``."""
    start = time.monotonic()
    while not condition():  # type: ignore[operator]
        assert time.monotonic() - start < seconds, "timed out"
        time.sleep(0.02)
    return time.monotonic() - start


def test_a_full_queue_answers_429_with_retry_after(server: str) -> None:
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{server}/v1/completions", json=LONG) as running:
        events = (line for line in running.iter_lines() if line.startswith("data:"))  # keep it: closing it hangs up
        assert next(events)
        assert health(server)["batch"] == 1
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(httpx.post, f"{server}/v1/completions", timeout=60,
                                 json={"model": "tiny-qwen", "prompt": "你好", "max_tokens": 3})
            wait_for(lambda: health(server)["queued"] == 1, 10)
            refused = httpx.post(f"{server}/v1/chat/completions", timeout=10,
                                 json={"model": "tiny-qwen", "messages": [{"role": "user", "content": "hi"}]})
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["type"] == "rate_limit_error"
            running.close()  # the running stream goes away, the queued request gets its row
            assert queued.result(timeout=60).status_code == 200


def test_a_client_that_disconnects_frees_its_row(server: str) -> None:
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{server}/v1/completions", json=LONG) as stream:
        events = (line for line in stream.iter_lines() if line.startswith("data:"))
        next(events), next(events)
        assert health(server)["batch"] == 1
    # 2000 tokens would take seconds; the row must go as soon as the server sees the connection close.
    assert wait_for(lambda: health(server)["batch"] == 0, 1.5) < 1.5
    still_serving = httpx.post(f"{server}/v1/completions", timeout=30,
                               json={"model": "tiny-qwen", "prompt": "你好", "max_tokens": 3})
    assert still_serving.status_code == 200
