"""Hostile input against a real ``gateway serve --demo``: each reproduction of issue 10 answers a clear OpenAI
error (or is served), the connection stays usable, and no request holds or freezes the server for the others."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from gateway.demo import DemoModels
from tests.gateway.test_api_errors import assert_error

KEY = {"Authorization": "Bearer sekret"}
HI = [{"role": "user", "content": "你好，你是谁？"}]
BODY_LIMIT = 2 << 20
ENUM_TOOL = {"type": "function", "function": {"name": "pick", "parameters": {
    "type": "object", "properties": {"n": {"type": "integer", "enum": [1, 2]}, "odd": True, "items": {"items": 5}},
    "required": "n"}}}


@pytest.fixture(scope="module")
def server(demo_models: DemoModels, demo_cache_home: Path) -> Iterator[str]:
    from tests.servers import running_gateway

    pku = demo_models.adapters["pku-assistant"]
    args = ["--demo", "--api-key", "sekret", "--max-queue", "4", "--max-body-bytes", str(BODY_LIMIT),
            "--adapter", f"react-tools={pku}", "--adapter-template", "react-tools=default",  # the ReAct tool format
            "--adapter-tool-policy", "react-tools=render"]  # its prompt shows a request's tools
    with running_gateway(args, env={"XDG_CACHE_HOME": str(demo_cache_home)}) as url:
        yield url


@pytest.fixture
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, headers=KEY, timeout=60) as client:  # one keep-alive connection
        yield client


def chat(http: httpx.Client, **fields: Any) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": "tiny-qwen", "messages": HI, "max_tokens": 8, **fields})


def raw(server: str, request: bytes) -> bytes:
    """Send ``request`` as it is on a fresh connection; the whole answer, up to the server closing or 5 s."""
    url = urlsplit(server)
    with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
                    break
        except TimeoutError:
            pass
    return answer


def test_a_lone_surrogate_is_400_and_the_connection_stays_usable(http: httpx.Client) -> None:
    bodies = [
        b'{"model": "tiny-qwen", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"model": "tiny-\\udfff", "messages": [{"role": "user", "content": "hi"}]}',
        b'{"model": "tiny-qwen", "messages": [{"role": "user", "content": "hi"}], "user": "\\ud800x"}',
    ]
    for body in bodies:
        response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        error = assert_error(response, 400)
        assert error["code"] == "invalid_unicode" and error["param"]
    surrogate_prompt = b'{"model": "tiny-qwen", "prompt": "a\\ud800", "max_tokens": 2}'
    assert_error(http.post("/v1/completions", content=surrogate_prompt, headers={"content-type": "application/json"}),
                 400, "prompt")
    pair = b'{"model": "tiny-qwen", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "max_tokens": 2}'
    assert http.post("/v1/chat/completions", content=pair, headers={"content-type": "application/json"}).status_code \
        == 200  # a valid surrogate pair is an emoji
    assert chat(http).status_code == 200  # same connection


@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1])
def test_a_seed_outside_int64_is_400(http: httpx.Client, seed: int) -> None:
    assert_error(chat(http, seed=seed), 400, "seed")


def test_seeds_at_the_int64_edges_are_served(http: httpx.Client) -> None:
    for seed in (2**63 - 1, -(2**63), -1):
        response = chat(http, seed=seed, n=2, temperature=1.0)  # choice 1 samples with seed + 1, wrapped
        assert response.status_code == 200, response.text


def test_a_tiny_temperature_is_greedy(http: httpx.Client) -> None:
    greedy = chat(http, temperature=0, max_tokens=16).json()["choices"][0]["message"]["content"]
    for temperature in (1e-39, 5e-324, 1e-6):
        response = chat(http, temperature=temperature, max_tokens=16, n=2)
        assert response.status_code == 200, response.text
        assert [c["message"]["content"] for c in response.json()["choices"]] == [greedy, greedy]


@pytest.mark.parametrize(("field", "value"), [("stream", "yes"), ("n", "2"), ("temperature", "0.5"),
                                              ("max_tokens", 8.0), ("stream", 1), ("seed", "7")])
def test_types_are_strict(http: httpx.Client, field: str, value: Any) -> None:
    assert_error(chat(http, **{field: value}), 400, field)


def test_an_integer_is_still_a_number(http: httpx.Client) -> None:
    assert chat(http, temperature=1, top_p=1).status_code == 200


def test_a_non_ascii_bearer_token_is_401(server: str) -> None:
    for token in ("Bearer é".encode(), "Bearer 北大".encode(), b"Bearer \xff"):
        response = httpx.get(f"{server}/v1/models", headers={"Authorization": token}, timeout=10)
        assert_error(response, 401)


def test_a_tool_schema_with_integer_enums_renders(http: httpx.Client) -> None:
    response = http.post("/v1/chat/render", json={"model": "react-tools", "messages": HI, "tools": [ENUM_TOOL]})
    assert response.status_code == 200, response.text
    assert "should be one of [1, 2]" in response.json()["prompt"]
    assert chat(http, model="react-tools", tools=[ENUM_TOOL]).status_code == 200


def test_more_choices_than_the_queue_holds_is_400(http: httpx.Client) -> None:
    response = chat(http, n=5)  # --max-queue 4
    error = assert_error(response, 400, "n")
    assert "max-queue" in str(error["message"]) and "retry-after" not in response.headers
    assert chat(http, n=4).status_code == 200


def test_a_body_over_the_limit_is_413(server: str, http: httpx.Client) -> None:
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekret\r\n"
            f"Content-Type: application/json\r\nContent-Length: {100_000_000}\r\n\r\n").encode()
    answer = raw(server, head + b'{"model": "tiny-qwen", ')  # 100 MB announced: refused before it is sent
    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"code":"request_too_large"' in rest

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked, counted as it comes
        yield b'{"model": "tiny-qwen", "messages": [{"role": "user", "content": "'
        for _ in range(BODY_LIMIT // 65536 + 2):
            yield b"a" * 65536
        yield b'"}]}'

    response = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert assert_error(response, 413)["code"] == "request_too_large"
    assert chat(http).status_code == 200


def test_health_answers_while_a_big_prompt_is_tokenized(server: str) -> None:
    text = "北京大学 hello world, " * (BODY_LIMIT // 40)  # ~1 MiB of JSON: a second or more of tokenization
    big: dict[str, float] = {}

    def send_big() -> None:
        big["sent"] = time.monotonic()
        response = httpx.post(f"{server}/v1/chat/completions", headers=KEY, timeout=120,
                              json={"model": "tiny-qwen", "messages": [{"role": "user", "content": text}]})
        big["answered"] = time.monotonic()
        big["status"] = response.status_code

    thread = threading.Thread(target=send_big)
    thread.start()
    checks: list[tuple[float, float]] = []
    with httpx.Client(timeout=60) as client:
        while thread.is_alive():
            start = time.monotonic()
            assert client.get(f"{server}/health").status_code == 200
            checks.append((start, time.monotonic()))
            time.sleep(0.02)
    thread.join()
    assert big["status"] == 400  # far over the 2048-token context, which only tokenizing can tell
    # Health checks that ran entirely inside the big request's time (with a margin at both ends): on the loop, a
    # tokenization this long leaves none; off the loop, they answer in milliseconds.
    inside = [end - start for start, end in checks if start > big["sent"] + 0.1 and end < big["answered"] - 0.1]
    took = big["answered"] - big["sent"]
    assert took > 0.5, big  # long enough to tell (about 1 s on a quiet machine, several on a busy one)
    # Handing the text to Rust still holds the GIL ~0.3 s: a check may wait that long, never the whole request.
    assert len(inside) >= 3 and max(inside) < took / 2, (big, checks)


def test_a_non_streamed_request_whose_client_left_frees_its_rows(server: str) -> None:
    body = (b'{"model": "tiny-qwen", "prompt": "hi", "n": 4, "max_tokens": 2000, "ignore_eos": true}')
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekret\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    url = urlsplit(server)

    def batch() -> int:
        return int(httpx.get(f"{server}/health", timeout=10).json()["batch"])

    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head + body)
        deadline = time.monotonic() + 30
        while batch() < 4:
            assert time.monotonic() < deadline, "the 4 choices never ran"
            time.sleep(0.02)
        time.sleep(0.2)  # decoding: 4 x 2000 tokens take many seconds from here
        assert batch() == 4
    left = time.monotonic()
    while batch() != 0:
        assert time.monotonic() - left < 2.0, "rows still decoding after the client left"
        time.sleep(0.02)
    assert httpx.post(f"{server}/v1/completions", headers=KEY, timeout=30,
                      json={"model": "tiny-qwen", "prompt": "hi", "max_tokens": 3}).status_code == 200
