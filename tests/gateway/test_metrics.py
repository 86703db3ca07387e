"""Metrics and the access log, in-process: a known mix of requests, then the figures per adapter and variant."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.demo import DemoModels
from gateway.metrics import TOKEN_LATENCY_BUCKETS, TTFT_BUCKETS
from gateway.settings import AdapterConfig, RouteConfig, Settings
from tests.gateway.scripted import ScriptedBackend, app_client

WHO = [{"role": "user", "content": "你是谁？"}]


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition text: (name, labels) -> value."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples(text).items() if n == name and wanted <= ls)


def settings_for(demo: DemoModels, **extra: Any) -> Settings:
    return Settings(model=str(demo.base_dir), served_model_name="tiny-qwen", template="qwen",
                    adapters=(AdapterConfig(name="pku-assistant", path=str(demo.adapters["pku-assistant"])),
                              AdapterConfig(name="cat-assistant", path=str(demo.adapters["cat-assistant"]))),
                    **extra)


@pytest.fixture
def backend(demo_models: DemoModels) -> ScriptedBackend:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_models.base_dir))
    return ScriptedBackend(tokenizer.encode("我是北大助手", add_special_tokens=False))


async def test_metrics_follow_a_known_mix_of_requests(demo_models: DemoModels, backend: ScriptedBackend,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    async with app_client(settings_for(demo_models), backend) as client:
        usage = {"prompt": 0, "completion": 0}
        for model, stream in (("pku-assistant", False), ("pku-assistant", True), ("cat-assistant", False)):
            body = {"model": model, "messages": WHO, "stream": stream, "stream_options": {"include_usage": True}}
            if not stream:
                body.pop("stream_options")
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            if model == "pku-assistant":
                last = (json.loads(response.text.split("data: ")[-2]) if stream else response.json())["usage"]
                usage["prompt"] += last["prompt_tokens"]
                usage["completion"] += last["completion_tokens"]
        cut = await client.post("/v1/completions", json={"model": "tiny-qwen", "prompt": "你好", "max_tokens": 2})
        assert cut.json()["choices"][0]["finish_reason"] == "length"
        missing = await client.post("/v1/chat/completions", json={"model": "nope", "messages": WHO})
        assert missing.status_code == 404
        text = (await client.get("/metrics")).text

    pku = {"adapter": "pku-assistant", "model": "pku-assistant", "backend": "torch", "model_name": "tiny-qwen"}
    assert value(text, "vllm:request_success_total", finished_reason="stop", **pku) == 2
    assert value(text, "vllm:request_success_total", adapter="cat-assistant") == 1
    assert value(text, "vllm:request_success_total", model="tiny-qwen", adapter="", finished_reason="length") == 1
    assert value(text, "vllm:prompt_tokens_total", **pku) == usage["prompt"]
    assert value(text, "vllm:generation_tokens_total", **pku) == usage["completion"] == 2 * len(backend.tokens)
    assert value(text, "vllm:generation_tokens_total", model="tiny-qwen") == 2
    assert value(text, "vllm:time_to_first_token_seconds_count", **pku) == 2
    assert value(text, "vllm:e2e_request_latency_seconds_count", **pku) == 2
    assert value(text, "vllm:request_queue_time_seconds_count", **pku) == 2
    # one gap between consecutive tokens of each answer
    assert value(text, "vllm:inter_token_latency_seconds_count", **pku) == 2 * (len(backend.tokens) - 1)
    assert value(text, "gateway:request_errors_total", error_type="invalid_request_error", status="404") == 1
    assert value(text, "vllm:num_requests_running") == 0 and value(text, "vllm:num_requests_waiting") == 0
    assert value(text, "gateway:adapters_resident") == 2
    assert value(text, "gateway:adapter_loads_total", adapter="pku-assistant") == 1
    buckets = sorted(float(dict(ls)["le"]) for (n, ls), _ in samples(text).items()
                     if n == "vllm:time_to_first_token_seconds_bucket" and ("adapter", "pku-assistant") in ls)
    assert buckets[:-1] == list(TTFT_BUCKETS)  # vLLM's boundaries, then +Inf
    itl = sorted(float(dict(ls)["le"]) for (n, ls), _ in samples(text).items()
                 if n == "vllm:inter_token_latency_seconds_bucket" and ("adapter", "pku-assistant") in ls)
    assert itl[:-1] == list(TOKEN_LATENCY_BUCKETS)

    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    chats = [line for line in lines if line["path"] == "/v1/chat/completions"]
    assert [line["status"] for line in chats] == [200, 200, 200, 404]
    first = chats[0]
    assert first["model"] == first["adapter"] == "pku-assistant" and first["backend"] == "torch"
    assert first["completion_tokens"] == len(backend.tokens) and first["finish_reason"] == "stop"
    assert first["ttft_s"] is not None and first["total_s"] >= first["ttft_s"]
    assert first["client_disconnected"] is False and first["request_id"].startswith("req-")
    assert chats[3]["error_type"] == "invalid_request_error" and chats[3]["prompt_tokens"] is None


async def test_waiting_then_running_and_lora_requests_info(demo_models: DemoModels, backend: ScriptedBackend) -> None:
    backend.hold = asyncio.Event()
    async with app_client(settings_for(demo_models, max_adapters=3), backend) as client:
        body = {"model": "cat-assistant", "messages": WHO, "stream": True}
        request = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
        while backend.arrived == 0:
            await asyncio.sleep(0.01)
        text = (await client.get("/metrics")).text
        assert value(text, "vllm:num_requests_waiting", adapter="cat-assistant") == 1
        info = [dict(ls) for (n, ls), _ in samples(text).items() if n == "vllm:lora_requests_info"]
        assert info == [{"max_lora": "3", "waiting_lora_adapters": "cat-assistant", "running_lora_adapters": ""}]
        backend.hold.set()
        assert (await request).status_code == 200
        text = (await client.get("/metrics")).text
        assert value(text, "vllm:num_requests_waiting") == 0 and value(text, "vllm:num_requests_running") == 0
        info = [dict(ls) for (n, ls), _ in samples(text).items() if n == "vllm:lora_requests_info"]
        assert info == [{"max_lora": "3", "waiting_lora_adapters": "", "running_lora_adapters": ""}]


async def test_a_route_labels_model_and_variant(demo_models: DemoModels, backend: ScriptedBackend) -> None:
    """An A/B route names itself as ``model`` and its variant as ``variant`` (gateway.experiments.hooks)."""
    route = RouteConfig(variants={"cat-assistant": 1}, sticky="none")
    async with app_client(settings_for(demo_models, routes={"helpful-route": route}), backend) as client:
        response = await client.post("/v1/chat/completions", json={"model": "helpful-route", "messages": WHO})
        assert response.status_code == 200, response.text
        text = (await client.get("/metrics")).text
    assert value(text, "vllm:request_success_total", model="helpful-route", variant="cat-assistant",
                 adapter="cat-assistant") == 1


WORKER = """
import sys, time
from gateway.metrics import Metrics
from gateway.request_context import RequestContext
metrics = Metrics(model_name="m", backend="vllm", max_model_len=1024)
for i in range(int(sys.argv[1])):
    ctx = RequestContext(request_id=str(i), method="POST", path="/v1/completions")
    ctx.generation_started(prompt_tokens=10, max_tokens=5, model="a", adapter="a")
    metrics.request_started(ctx)
    ctx.output(3)
    metrics.first_output(ctx)
    ctx.finished("stop", 3, None)
    ctx.finish()
    metrics.request_ended(ctx)
metrics.adapter_loaded("a", 0.1)
print("done", flush=True)
"""

RENDER = """
from gateway.metrics import Metrics
print(Metrics(model_name="m", backend="vllm", max_model_len=1024).render().decode())
"""


def test_multiprocess_figures_are_the_sum(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    root = Path(__file__).parents[2]
    for count in ("2", "3"):
        subprocess.run([sys.executable, "-c", WORKER, count], env=env, cwd=root, check=True, timeout=60)
    text = subprocess.run([sys.executable, "-c", RENDER], env=env, cwd=root, check=True, timeout=60,
                          capture_output=True, text=True).stdout
    assert value(text, "vllm:request_success_total", adapter="a", finished_reason="stop") == 5
    assert value(text, "vllm:prompt_tokens_total", adapter="a") == 50
    assert value(text, "vllm:generation_tokens_total", adapter="a") == 15
    assert value(text, "gateway:adapter_loads_total", adapter="a") == 2
    assert value(text, "vllm:time_to_first_token_seconds_count", adapter="a") == 5
