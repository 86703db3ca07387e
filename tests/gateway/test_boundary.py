"""The app's one boundary, in-process: anything unexpected becomes the OpenAI error body with a request id, a
stream that fails mid-way ends with an error event and ``[DONE]``, and every response carries ``x-request-id``.

The backend is a scriptable fake that raises what real code could raise (a bug, a foreign exception) where a
backend's contract says it raises only ``GatewayError``: the boundary must hold anyway.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from backends.base import Capabilities, Delta, GenerationRequest
from gateway.app import create_app
from gateway.demo import DemoModels
from gateway.settings import Settings
from tests.gateway.scripted import FakeBackend

CHAT = {"model": "tiny-qwen", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class ExplodingBackend(FakeBackend):
    """Yields ``tokens_before`` of ``tokens``, then raises ``error`` (``None``: finishes normally)."""

    tokens: tuple[int, ...]
    error: BaseException | None = None
    tokens_before: int = 0
    capabilities: Capabilities = Capabilities(runtime_adapters=True, max_context=2048)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        for token in self.tokens[: self.tokens_before]:
            yield Delta(token_ids=(token,))
        if self.error is not None:
            raise self.error
        yield Delta(token_ids=self.tokens[-1:], finish_reason="stop", completion_tokens=self.tokens_before + 1)


@pytest.fixture
async def app_and_backend(demo_models: DemoModels) -> AsyncIterator[tuple[httpx.AsyncClient, ExplodingBackend]]:
    from transformers import AutoTokenizer

    text = "one two three four five six seven eight nine ten eleven twelve"
    words = AutoTokenizer.from_pretrained(str(demo_models.base_dir)).encode(text)
    backend = ExplodingBackend(tokens=tuple(words))
    app = create_app(Settings(model=str(demo_models.base_dir), served_model_name="tiny-qwen", template="qwen"),
                     backend=backend)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            yield http, backend


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error  # type: ignore[no-any-return]


async def test_an_unexpected_exception_is_an_openai_500_with_the_request_id(app_and_backend) -> None:  # type: ignore[no-untyped-def]
    http, backend = app_and_backend
    backend.error = ZeroDivisionError("a bug")
    response = await http.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "trace-42"})
    error = assert_openai_error(response, 500)
    assert error["type"] == "server_error"
    assert response.headers["x-request-id"] == "trace-42"
    assert "trace-42" in str(error["message"])
    backend.error = None
    assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200  # still serving


async def test_a_stream_failing_with_any_exception_ends_with_an_error_event_and_done(app_and_backend) -> None:  # type: ignore[no-untyped-def]
    http, backend = app_and_backend
    backend.error, backend.tokens_before = KeyError("a bug"), len(backend.tokens) - 1  # past the stop hold-back
    response = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status_code == 200
    events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and response.headers["x-request-id"] in error["message"]
    assert len(events) >= 4  # the role chunk and tokens came before the error
    # The real SDK raises it as an API error instead of hanging or ending silently.
    sdk = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="x", max_retries=0, http_client=http)
    with pytest.raises(openai.APIError):
        async for _ in await sdk.chat.completions.create(model="tiny-qwen", messages=CHAT["messages"],  # type: ignore[arg-type]
                                                         stream=True):
            pass


async def test_every_response_carries_a_request_id(app_and_backend) -> None:  # type: ignore[no-untyped-def]
    http, _ = app_and_backend
    answers = [await http.post("/v1/chat/completions", json=CHAT), await http.get("/v1/models"),
               await http.get("/v1/nothing"), await http.post("/v1/chat/completions", json={"model": 1}),
               await http.get("/health")]
    ids = [a.headers["x-request-id"] for a in answers]
    assert all(i.startswith("req-") for i in ids) and len(set(ids)) == len(ids)
    echoed = await http.get("/health", headers={"x-request-id": "abc.DEF-123"})
    assert echoed.headers["x-request-id"] == "abc.DEF-123"
    insane = await http.get("/health", headers={"x-request-id": "x" * 500})  # not echoed: a new one instead
    assert insane.headers["x-request-id"].startswith("req-")


async def test_a_405_keeps_its_allow_header(app_and_backend) -> None:  # type: ignore[no-untyped-def]
    http, _ = app_and_backend
    response = await http.put("/v1/chat/completions", json=CHAT)
    error = assert_openai_error(response, 405)
    assert response.headers["allow"] == "POST"
    assert error["code"] == "method_not_allowed"
