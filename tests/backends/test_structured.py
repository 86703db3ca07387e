"""Grammar-constrained decoding in the native engine, on the demo model sampled at temperature 1.

The demo base knows nothing about JSON, so only the grammar can make its answers valid: every answer that ends
by itself (``finish_reason: stop``) must parse and validate; rows without a constraint must not change.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import jsonschema
import pytest
from transformers import AutoTokenizer

from backends.base import GenerationRequest, OutputConstraint, SamplingParams
from backends.torch_native import TorchBackend
from gateway.demo import DemoModels
from gateway.errors import InvalidRequest

SCHEMAS: dict[str, dict[str, Any]] = {
    "object": {"type": "object"},
    "weather": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
                "additionalProperties": False},
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
            "admin": {"type": "boolean"},
        },
        "required": ["name", "age", "tags", "admin"],
        "additionalProperties": False,
    },
    "choice": {"anyOf": [{"type": "integer"}, {"enum": ["yes", "no"]}, {"type": "null"}]},
    "nested": {
        "type": "object",
        "properties": {"id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                       "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
                           "type": "object", "properties": {"qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                           "required": ["qty"], "additionalProperties": False}}},
        "required": ["id", "items"],
        "additionalProperties": False,
    },
}
SAMPLES = 6


@pytest.fixture(scope="module")
async def demo(demo_models: DemoModels) -> AsyncIterator[tuple[TorchBackend, Any]]:
    tokenizer = AutoTokenizer.from_pretrained(demo_models.base_dir)
    backend = await TorchBackend.load(demo_models.base_dir, device="cpu", dtype="float32", max_batch_size=16,
                                      pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer)
    yield backend, tokenizer
    await backend.aclose()


def _request(tokenizer: Any, constraint: OutputConstraint | None, *, max_tokens: int = 300,
             temperature: float = 1.0, seed: int = 0) -> GenerationRequest:
    prompt = "<|im_start|>user\n给我一个JSON<|im_end|>\n<|im_start|>assistant\n"
    ids = tuple(tokenizer.encode(prompt, add_special_tokens=False))
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                              stop_token_ids=(tokenizer.convert_tokens_to_ids("<|im_end|>"),), constraint=constraint)
    return GenerationRequest(request_id=f"s{seed}", prompt_token_ids=ids, prompt_text=prompt, adapter=None,
                             sampling=sampling)


async def _run(backend: TorchBackend, tokenizer: Any, request: GenerationRequest) -> tuple[str, str | None, int]:
    tokens: list[int] = []
    finish = None
    async for delta in backend.generate(request):
        tokens.extend(delta.token_ids)
        finish = delta.finish_reason or finish
    return tokenizer.decode(tokens), finish, len(tokens)


async def test_every_finished_answer_validates(demo: tuple[TorchBackend, Any]) -> None:
    backend, tokenizer = demo
    jobs = [(name, _request(tokenizer, OutputConstraint(json.dumps(schema)), seed=seed))
            for name, schema in SCHEMAS.items() for seed in range(SAMPLES)]
    results = await asyncio.gather(*(_run(backend, tokenizer, request) for _, request in jobs))
    finished = 0
    for (name, _), (text, finish, _count) in zip(jobs, results, strict=True):
        if finish == "stop":
            finished += 1
            jsonschema.validate(json.loads(text), SCHEMAS[name])  # raises on any invalid answer
    assert finished >= len(jobs) * 0.8, f"only {finished} of {len(jobs)} answers ended within max_tokens"


async def test_unconstrained_rows_are_untouched_by_constrained_neighbours(demo: tuple[TorchBackend, Any]) -> None:
    backend, tokenizer = demo
    plain = _request(tokenizer, None, max_tokens=24, temperature=0.0)
    alone = await _run(backend, tokenizer, plain)
    neighbours = [_request(tokenizer, OutputConstraint(json.dumps(SCHEMAS["person"])), seed=s) for s in range(4)]
    together = await asyncio.gather(_run(backend, tokenizer, plain),
                                    *(_run(backend, tokenizer, r) for r in neighbours))
    assert together[0] == alone
    assert not alone[0].lstrip().startswith("{")  # the demo base does not answer JSON by itself


async def test_a_constrained_row_does_not_depend_on_its_neighbours(demo: tuple[TorchBackend, Any]) -> None:
    backend, tokenizer = demo
    greedy = _request(tokenizer, OutputConstraint(json.dumps(SCHEMAS["weather"])), temperature=0.0)
    alone = await _run(backend, tokenizer, greedy)
    others = [_request(tokenizer, OutputConstraint(json.dumps(SCHEMAS[n])), seed=1) for n in ("person", "nested")]
    together = await asyncio.gather(_run(backend, tokenizer, greedy), *(_run(backend, tokenizer, r) for r in others),
                                    _run(backend, tokenizer, _request(tokenizer, None, max_tokens=30)))
    assert together[0] == alone
    assert alone[1] == "stop"
    assert json.loads(alone[0])["city"] is not None


async def test_max_tokens_cuts_the_answer_with_length(demo: tuple[TorchBackend, Any]) -> None:
    backend, tokenizer = demo
    text, finish, count = await _run(backend, tokenizer, _request(
        tokenizer, OutputConstraint(json.dumps(SCHEMAS["person"])), max_tokens=5))
    assert (finish, count) == ("length", 5)
    assert text.startswith('{"name": "')  # constrained as far as it went; not complete JSON


async def test_a_tool_call_in_qwen_format(demo: tuple[TorchBackend, Any]) -> None:
    backend, tokenizer = demo
    call = {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": SCHEMAS["weather"]},
            "required": ["name", "arguments"], "additionalProperties": False}
    constraint = OutputConstraint(json.dumps(call), prefix="<tool_call>\n", suffix="\n</tool_call>",
                                  thought=("<think>\n", "\n</think>\n\n"), param="tool_choice")
    for seed in range(4):
        text, finish, _ = await _run(backend, tokenizer, _request(tokenizer, constraint, seed=seed))
        assert finish == "stop"
        body = text.split("</think>\n\n")[-1]  # an optional thought may come first
        assert body.startswith("<tool_call>\n") and body.endswith("\n</tool_call>")
        jsonschema.validate(json.loads(body.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>")), call)


async def test_a_schema_that_cannot_compile_is_a_400(demo: tuple[TorchBackend, Any]) -> None:
    backend, tokenizer = demo
    bad = OutputConstraint(json.dumps({"type": "string", "pattern": "(unclosed"}))
    with pytest.raises(InvalidRequest) as raised:
        await _run(backend, tokenizer, _request(tokenizer, bad))
    assert raised.value.param == "response_format"
    # The backend keeps serving.
    ok = _request(tokenizer, replace(bad, json_schema=json.dumps(SCHEMAS["choice"])), temperature=0.0)
    assert (await _run(backend, tokenizer, ok))[1] == "stop"
