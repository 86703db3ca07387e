"""Penalties, min-p, logit bias and logprobs on the upstream backends: mapped to each engine's own field (checked in
what the fake upstreams record), or refused with a 400 that names the field and the backend."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from backends.lmdeploy import LMDeployBackend
from backends.ollama import OllamaBackend
from backends.openai_compat import OpenAICompatBackend
from backends.upstream_pool import Timeouts, UpstreamPool
from backends.vllm import VLLMBackend
from gateway.errors import InvalidRequest
from tests.backends.fakes import lmdeploy as lmdeploy_fake
from tests.backends.fakes import ollama as ollama_fake
from tests.backends.fakes import openai as openai_fake
from tests.backends.fakes.recording import Recorder
from tests.backends.fakes.server import serve
from tests.backends.support import collect, gen_request, text_of

PENALTIES: dict[str, Any] = {"frequency_penalty": 0.5, "presence_penalty": -0.25, "repetition_penalty": 1.1,
                             "min_p": 0.05}
BIAS = ((7, -100.0), (9, 2.5))


def timeouts() -> Timeouts:
    return Timeouts(health_interval=0, first_byte=2, idle=2)


# --- vLLM: everything as-is, logprobs passed through ------------------------------------------------------------


class LogprobVLLM:
    """Answers like vLLM 0.32 with ``return_token_ids`` + ``return_tokens_as_token_ids`` (and ``echo``)."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "tiny", "parent": None}]})
        if request.url.path != "/v1/completions":
            return httpx.Response(200)  # health
        body = json.loads(request.content)
        self.bodies.append(body)
        ids = body["prompt"]
        first: dict[str, Any] = {"index": 0, "text": "Hi", "token_ids": [9], "prompt_token_ids": ids}
        second: dict[str, Any] = {"index": 0, "text": " you", "token_ids": [10], "finish_reason": "stop"}
        if body.get("logprobs") is not None:
            prompt_part: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
            if body.get("echo"):
                prompt_part = {
                    "tokens": [f"token_id:{i}" for i in ids],
                    "token_logprobs": [None] + [-1.0 - k for k in range(len(ids) - 1)],
                    "top_logprobs": [None] + [{f"token_id:{i}": -1.0 - k, "token_id:3": -0.5}
                                              for k, i in enumerate(ids[1:])],
                }
            first["logprobs"] = {
                "tokens": prompt_part["tokens"] + ["token_id:9"],
                "token_logprobs": prompt_part["token_logprobs"] + [-0.25],
                "top_logprobs": prompt_part["top_logprobs"] + [{"token_id:9": -0.25, "token_id:4": -2.0}],
                "text_offset": list(range(len(prompt_part["tokens"]) + 1)),
            }
            second["logprobs"] = {"tokens": ["token_id:10"], "token_logprobs": [-0.75],
                                  "top_logprobs": [{"token_id:5": -0.5, "token_id:10": -0.75}], "text_offset": [2]}
        events = [{"choices": [first]}, {"choices": [second]},
                  {"choices": [], "usage": {"prompt_tokens": len(ids), "completion_tokens": 2}}]
        sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})


async def vllm(fake: LogprobVLLM) -> VLLMBackend:
    backend = VLLMBackend(UpstreamPool(["http://v"], transport=httpx.MockTransport(fake.handler),
                                       timeouts=Timeouts(health_interval=0)))
    await backend.start()
    return backend


async def test_vllm_takes_penalties_and_bias_as_is() -> None:
    fake = LogprobVLLM()
    backend = await vllm(fake)
    await collect(backend.generate(gen_request(logit_bias=BIAS, **PENALTIES)))
    sent = fake.bodies[-1]
    assert {k: sent[k] for k in PENALTIES} == PENALTIES
    assert sent["logit_bias"] == {"7": -100.0, "9": 2.5}
    assert "logprobs" not in sent and "echo" not in sent
    await backend.aclose()


async def test_vllm_neutral_values_are_not_sent() -> None:
    fake = LogprobVLLM()
    backend = await vllm(fake)
    await collect(backend.generate(gen_request()))
    assert not set(fake.bodies[-1]) & {*PENALTIES, "logit_bias", "logprobs", "echo"}
    await backend.aclose()


async def test_vllm_logprobs_pass_through_as_token_ids() -> None:
    fake = LogprobVLLM()
    backend = await vllm(fake)
    deltas = await collect(backend.generate(gen_request(logprobs=1)))
    sent = fake.bodies[-1]
    assert sent["logprobs"] == 1 and sent["return_tokens_as_token_ids"] is True and "echo" not in sent
    assert text_of(deltas) == "Hi you"
    entries = [e for d in deltas for e in d.logprobs]
    assert [(e.token_id, e.logprob, e.top) for e in entries] == [(9, -0.25, ((9, -0.25),)), (10, -0.75, ((5, -0.5),))]
    assert all(d.prompt_logprobs is None for d in deltas)
    await backend.aclose()


async def test_vllm_echo_gives_prompt_logprobs_and_no_prompt_text() -> None:
    fake = LogprobVLLM()
    backend = await vllm(fake)
    request = gen_request(logprobs=2, prompt_logprobs=2)
    deltas = await collect(backend.generate(request))
    assert fake.bodies[-1]["echo"] is True
    prompt = deltas[0].prompt_logprobs
    assert prompt is not None and len(prompt) == len(request.prompt_token_ids) and prompt[0] is None
    assert [e.token_id for e in prompt[1:] if e] == list(request.prompt_token_ids[1:])
    assert prompt[1] is not None and prompt[1].top == ((3, -0.5), (request.prompt_token_ids[1], -1.0))
    assert [e.token_id for d in deltas for e in d.logprobs] == [9, 10]
    await backend.aclose()


# --- LMDeploy: penalties as-is; no logit bias, no logprobs -------------------------------------------------------


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


async def test_lmdeploy_takes_penalties_as_is(recorder: Recorder) -> None:
    answers = {"qwen-base": "I am a helpful assistant."}
    with serve(lmdeploy_fake.create_app("qwen-base", answers, recorder)) as server:
        backend = LMDeployBackend(UpstreamPool([server.url], timeouts=timeouts()))
        await backend.start()
        await collect(backend.generate(gen_request(**PENALTIES)))
        (sent,) = recorder.bodies("/v1/completions")
        assert {k: sent[k] for k in PENALTIES} == PENALTIES
        for field, value in (("logit_bias", BIAS), ("logprobs", 0)):
            with pytest.raises(InvalidRequest, match=f"{field} .*lmdeploy") as caught:
                await collect(backend.generate(gen_request(**{field: value})))
            assert caught.value.param == field
        await backend.aclose()
    assert len(recorder.bodies("/v1/completions")) == 1  # refused before anything was sent


# --- Ollama: its option names; no logit bias, no logprobs --------------------------------------------------------


async def test_ollama_maps_penalties_to_its_options(recorder: Recorder) -> None:
    with serve(ollama_fake.create_app({"qwen2.5:0.5b": "I am Qwen."}, recorder)) as server:
        pool = UpstreamPool([server.url], timeouts=timeouts(), health_path="/api/tags")
        backend = OllamaBackend(pool, base_model="qwen2.5:0.5b")
        await backend.start()
        await collect(backend.generate(gen_request(**PENALTIES)))
        (sent,) = recorder.bodies("/api/generate")
        options = sent["options"]
        assert (options["repeat_penalty"], options["presence_penalty"], options["frequency_penalty"],
                options["min_p"]) == (1.1, -0.25, 0.5, 0.05)
        assert "repetition_penalty" not in options
        for field, value, param in (("logit_bias", BIAS, "logit_bias"), ("logprobs", 3, "logprobs"),
                                    ("prompt_logprobs", 1, "echo")):
            with pytest.raises(InvalidRequest, match="ollama") as caught:
                await collect(backend.generate(gen_request(**{field: value})))
            assert caught.value.param == param
        await backend.aclose()


# --- any OpenAI-compatible server: OpenAI's fields only ----------------------------------------------------------


async def test_openai_compat_sends_openai_fields_and_refuses_vllm_extensions(recorder: Recorder) -> None:
    answers = {"base-7b": "Hello there, friend."}
    with serve(openai_fake.create_app(answers, recorder, lora_parent="base-7b")) as server:
        backend = OpenAICompatBackend(UpstreamPool([server.url], timeouts=timeouts()))
        await backend.start()
        await collect(backend.generate(gen_request(frequency_penalty=0.5, presence_penalty=0.25, logit_bias=BIAS)))
        (sent,) = recorder.bodies("/v1/completions")
        assert (sent["frequency_penalty"], sent["presence_penalty"]) == (0.5, 0.25)
        assert sent["logit_bias"] == {"7": -100.0, "9": 2.5}
        for field, value in (("repetition_penalty", 1.2), ("min_p", 0.1), ("logprobs", 1)):
            with pytest.raises(InvalidRequest, match=f"{field} is not supported by the openai backend") as caught:
                await collect(backend.generate(gen_request(**{field: value})))
            assert caught.value.param == field
        await backend.aclose()
