"""Structured output on upstreams: what each engine is sent for ``response_format``, or the 400 it gets instead."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from backends.base import GenerationRequest, OutputConstraint
from backends.lmdeploy import LMDeployBackend
from backends.ollama import OllamaBackend
from backends.openai_compat import OpenAICompatBackend
from backends.upstream_pool import Timeouts, UpstreamPool
from gateway.errors import InvalidRequest
from tests.backends.fakes import lmdeploy as fake_lmdeploy
from tests.backends.fakes import ollama as fake_ollama
from tests.backends.fakes import openai as fake_openai
from tests.backends.fakes.recording import Recorder
from tests.backends.fakes.server import serve
from tests.backends.support import collect, gen_request
from tests.backends.test_vllm import FakeVLLM, make

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
JSON_MODE = OutputConstraint(json.dumps({"type": "object"}))
JSON_SCHEMA = OutputConstraint(json.dumps(SCHEMA))
TOOL_CALL = OutputConstraint(json.dumps(SCHEMA), prefix="<tool_call>\n", suffix="\n</tool_call>", param="tool_choice")


def constrained(constraint: OutputConstraint) -> GenerationRequest:
    request = gen_request()
    return replace(request, sampling=replace(request.sampling, constraint=constraint))


@pytest.mark.parametrize("constraint", [JSON_MODE, JSON_SCHEMA])
async def test_vllm_gets_structured_outputs_json(constraint: OutputConstraint) -> None:
    fake = FakeVLLM()
    backend = make(fake)
    await backend.start()
    try:
        await collect(backend.generate(constrained(constraint)))
        await collect(backend.generate(gen_request()))
    finally:
        await backend.aclose()
    with_constraint, without = (body for url, body in fake.calls if url.endswith("/v1/completions"))
    assert with_constraint["structured_outputs"] == {"json": json.loads(constraint.json_schema)}  # type: ignore[index]
    assert "structured_outputs" not in without  # type: ignore[operator]


async def test_vllm_refuses_forced_tool_calls() -> None:
    backend = make(FakeVLLM(), base_model="tiny")
    with pytest.raises(InvalidRequest, match="vllm") as raised:
        backend.generate(constrained(TOOL_CALL))
    assert raised.value.param == "tool_choice"
    await backend.aclose()


@pytest.mark.parametrize(("constraint", "expected"), [(JSON_MODE, "json"), (JSON_SCHEMA, SCHEMA)])
async def test_ollama_gets_format(constraint: OutputConstraint, expected: object) -> None:
    recorder = Recorder()
    with serve(fake_ollama.create_app({"qwen2.5:0.5b": "{}"}, recorder)) as server:
        pool = UpstreamPool([server.url], timeouts=Timeouts(health_interval=0, first_byte=2, idle=2),
                            health_path="/api/tags")
        backend = OllamaBackend(pool, base_model="qwen2.5:0.5b")
        await backend.start()
        try:
            await collect(backend.generate(constrained(constraint)))
            with pytest.raises(InvalidRequest, match="Ollama") as raised:
                backend.generate(constrained(TOOL_CALL))
            assert raised.value.param == "tool_choice"
        finally:
            await backend.aclose()
    (sent,) = recorder.bodies("/api/generate")
    assert sent["format"] == expected


async def test_lmdeploy_refuses_with_the_field_and_sends_nothing() -> None:
    recorder = Recorder()
    with serve(fake_lmdeploy.create_app("qwen-base", {"qwen-base": "{}"}, recorder)) as server:
        pool = UpstreamPool([server.url], timeouts=Timeouts(health_interval=0, first_byte=2, idle=2))
        backend = LMDeployBackend(pool)
        await backend.start()
        try:
            for constraint in (JSON_SCHEMA, TOOL_CALL):
                with pytest.raises(InvalidRequest, match="lmdeploy") as raised:
                    backend.generate(constrained(constraint))
                assert raised.value.param == constraint.param
        finally:
            await backend.aclose()
    assert recorder.bodies("/v1/completions") == []


async def test_openai_compatible_refuses_with_the_field() -> None:
    recorder = Recorder()
    with serve(fake_openai.create_app({"base": "{}"}, recorder)) as server:
        backend = OpenAICompatBackend(UpstreamPool([server.url], timeouts=Timeouts(health_interval=0)))
        await backend.start()
        try:
            with pytest.raises(InvalidRequest, match="openai") as raised:
                backend.generate(constrained(JSON_SCHEMA))
            assert raised.value.param == "response_format"
        finally:
            await backend.aclose()
    assert recorder.bodies("/v1/completions") == []

