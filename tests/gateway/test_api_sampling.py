"""Sampling-parameter plumbing, in-process: the app over a scriptable fake backend that records every
``GenerationRequest``, so what each request field becomes in ``SamplingParams`` is checked exactly."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from backends.base import Capabilities, Delta, GenerationRequest, TokenLogprob
from gateway.app import create_app
from gateway.settings import Settings
from tests.gateway.scripted import FakeBackend


class RecordingBackend(FakeBackend):
    """Answers every request with tokens 40, 41 (each with a logprob entry when asked), then stops."""

    capabilities = Capabilities(runtime_adapters=True)

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        self.requests.append(request)
        s = request.sampling
        prompt = None
        if s.prompt_logprobs is not None:
            prompt = (None, *(TokenLogprob(t, -1.0) for t in request.prompt_token_ids[1:]))
        for i, token in enumerate((40, 41)):
            entry = () if s.logprobs is None else (TokenLogprob(token, -0.5, ((token, -0.5),) * s.logprobs),)
            yield Delta(token_ids=(token,), logprobs=entry, prompt_logprobs=prompt if i == 0 else None,
                        finish_reason="length" if i == 1 else None)


@pytest.fixture(scope="module")
async def app_client(demo_models: Any) -> AsyncIterator[tuple[httpx.AsyncClient, RecordingBackend]]:
    backend = RecordingBackend()
    settings = Settings(model=str(demo_models.base_dir), served_model_name="tiny-qwen", template="qwen")
    app = create_app(settings, backend=backend)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway") as client:
            yield client, backend


async def test_chat_fields_become_sampling_params(app_client: Any) -> None:
    client, backend = app_client
    body = {"model": "tiny-qwen", "messages": [{"role": "user", "content": "hi"}], "n": 2, "seed": 5,
            "frequency_penalty": 0.5, "presence_penalty": -0.5, "repetition_penalty": 1.15, "min_p": 0.1,
            "logit_bias": {"17": -100, "3": 2.5}, "logprobs": True, "top_logprobs": 4, "temperature": 0.3}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    first, second = (r.sampling for r in backend.requests[-2:])
    assert (first.frequency_penalty, first.presence_penalty, first.repetition_penalty, first.min_p) == (
        0.5, -0.5, 1.15, 0.1)
    assert first.logit_bias == ((17, -100.0), (3, 2.5))
    assert (first.logprobs, first.prompt_logprobs) == (4, None)
    assert (first.seed, second.seed) == (5, 6)  # per choice
    logprobs = response.json()["choices"][0]["logprobs"]["content"]
    assert [len(e["top_logprobs"]) for e in logprobs] == [4, 4]


async def test_omitted_fields_are_neutral(app_client: Any) -> None:
    client, backend = app_client
    response = await client.post("/v1/chat/completions", json={"model": "tiny-qwen",
                                                               "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200 and response.json()["choices"][0]["logprobs"] is None
    s = backend.requests[-1].sampling
    assert (s.frequency_penalty, s.presence_penalty, s.repetition_penalty, s.min_p, s.logit_bias, s.logprobs) == (
        0.0, 0.0, 1.0, 0.0, (), None)


async def test_logprobs_without_top_logprobs_means_zero_alternatives(app_client: Any) -> None:
    client, backend = app_client
    body = {"model": "tiny-qwen", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}
    response = await client.post("/v1/chat/completions", json=body)
    assert backend.requests[-1].sampling.logprobs == 0
    assert all(e["top_logprobs"] == [] for e in response.json()["choices"][0]["logprobs"]["content"])


async def test_completions_echo_asks_for_prompt_logprobs(app_client: Any) -> None:
    client, backend = app_client
    body = {"model": "tiny-qwen", "prompt": [5, 6, 7], "echo": True, "logprobs": 2, "max_tokens": 2}
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    request = backend.requests[-1]
    assert request.prompt_token_ids == (5, 6, 7)
    assert (request.sampling.logprobs, request.sampling.prompt_logprobs) == (2, 2)
    logprobs = response.json()["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"] == [None, -1.0, -1.0, -0.5, -0.5]
    assert logprobs["top_logprobs"][0] is None and len(logprobs["tokens"]) == 5
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])


async def test_echo_without_logprobs_asks_for_none(app_client: Any) -> None:
    client, backend = app_client
    response = await client.post("/v1/completions", json={"model": "tiny-qwen", "prompt": "Hello", "echo": True,
                                                          "max_tokens": 2})
    assert response.json()["choices"][0]["text"].startswith("Hello")
    assert backend.requests[-1].sampling.prompt_logprobs is None
    assert response.json()["choices"][0]["logprobs"] is None


async def test_several_prompts_are_answered_in_order(app_client: Any) -> None:
    client, backend = app_client
    body = {"model": "tiny-qwen", "prompt": [[5, 6], [7, 8, 9]], "n": 2, "max_tokens": 2}
    response = await client.post("/v1/completions", json=body)
    assert [c["index"] for c in response.json()["choices"]] == [0, 1, 2, 3]
    assert [r.prompt_token_ids for r in backend.requests[-4:]] == [(5, 6), (5, 6), (7, 8, 9), (7, 8, 9)]
    assert response.json()["usage"]["prompt_tokens"] == 5


@pytest.mark.parametrize("body, param", [
    ({"prompt": [5, 10**7]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "hi", "logit_bias": {"-1": 3}}, "logit_bias"),
    ({"prompt": "hi", "presence_penalty": -3}, "presence_penalty"),
])
async def test_bad_completion_fields_are_named(app_client: Any, body: dict[str, Any], param: str) -> None:
    client, _ = app_client
    response = await client.post("/v1/completions", json={"model": "tiny-qwen", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert param in (error["param"] or "") + error["message"]
