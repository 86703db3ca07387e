"""VLLMBackend's protocol with vLLM, played by an ``httpx.MockTransport`` that records what it receives.

The real-server counterpart is tests/backends/test_vllm_real.py (marker ``vllm``).
"""

from __future__ import annotations

import json

import httpx
import pytest

from backends.upstream_pool import Timeouts, UpstreamPool
from backends.vllm import VLLMBackend
from gateway.errors import AdapterLoadError, UpstreamError
from tests.backends.support import collect, gen_request, text_of

MODELS = {
    "object": "list",
    "data": [
        {"id": "tiny", "object": "model", "root": "/models/tiny", "parent": None},
        {"id": "served", "object": "model", "root": "/saves/served", "parent": "tiny"},
    ],
}


class FakeVLLM:
    """Answers like vLLM 0.32 and records (url, json body) of every call."""

    def __init__(self, echo_offset: int = 0) -> None:
        self.calls: list[tuple[str, object]] = []
        self.echo_offset = echo_offset
        self.loaded: dict[str, dict[str, str]] = {}  # replica host -> LoRA name -> path

    def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.calls.append((str(request.url), body))
        path = request.url.path
        loras = self.loaded.setdefault(request.url.host, {})
        if path == "/v1/models":  # like vLLM: the LoRAs loaded at runtime are listed too
            loaded = [{"id": n, "object": "model", "root": p, "parent": "tiny"} for n, p in loras.items()]
            return httpx.Response(200, json={"object": "list", "data": MODELS["data"] + loaded})
        if path == "/v1/load_lora_adapter":
            if not body["lora_path"].startswith("/saves/"):
                err = {"error": {"message": "No adapter found", "type": "NotFoundError", "param": None, "code": 404}}
                return httpx.Response(404, json=err)
            loras[body["lora_name"]] = body["lora_path"]
            return httpx.Response(200, text=f"Success: LoRA adapter '{body['lora_name']}' added successfully.")
        if path == "/v1/unload_lora_adapter":
            loras.pop(body["lora_name"], None)
            return httpx.Response(200, text="ok")
        if path == "/v1/completions":
            ids = [i + self.echo_offset for i in body["prompt"]]
            events = [
                {"choices": [{"index": 0, "text": "Hi", "token_ids": [9], "prompt_token_ids": ids}]},
                {"choices": [{"index": 0, "text": " you", "token_ids": [10], "finish_reason": "stop"}]},
                {"choices": [], "usage": {"prompt_tokens": len(ids), "completion_tokens": 2, "total_tokens": 0}},
            ]
            sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})
        return httpx.Response(404, json={"detail": "Not Found"})


def make(fake: FakeVLLM, urls: tuple[str, ...] = ("http://a",), **kwargs) -> VLLMBackend:  # type: ignore[no-untyped-def]
    pool = UpstreamPool(list(urls), transport=httpx.MockTransport(fake.handler), timeouts=Timeouts(health_interval=0))
    return VLLMBackend(pool, **kwargs)


async def test_payload_token_ids_and_vllm_extensions() -> None:
    fake = FakeVLLM()
    b = make(fake)
    await b.start()
    request = gen_request(top_k=4, stop=("</s>",), stop_token_ids=(151645, 151643), seed=1)
    deltas = await collect(b.generate(request))
    assert text_of(deltas) == "Hi you"
    assert [d.token_ids for d in deltas] == [(9,), (10,), ()]
    assert deltas[-1].prompt_tokens == len(request.prompt_token_ids)
    sent = fake.calls[-1][1]
    assert sent == {
        "model": "tiny",
        "prompt": list(request.prompt_token_ids),
        "max_tokens": 32,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 1,
        "stop": ["</s>"],
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
        "top_k": 4,
        "stop_token_ids": [151645, 151643],
    }
    await b.aclose()


async def test_prompt_echo_mismatch_is_an_upstream_error() -> None:
    b = make(FakeVLLM(echo_offset=1), base_model="tiny")
    with pytest.raises(UpstreamError, match="other prompt token ids"):
        await collect(b.generate(gen_request()))
    await b.aclose()


async def test_adapters_served_or_loaded_on_every_replica() -> None:
    fake = FakeVLLM()
    b = make(fake, urls=("http://a", "http://b"), adapters={"served": "/saves/served", "new": "/saves/new"})
    await b.start()
    loads = [(url, body) for url, body in fake.calls if url.endswith("/v1/load_lora_adapter")]
    assert loads == [
        ("http://a/v1/load_lora_adapter", {"lora_name": "new", "lora_path": "/saves/new"}),
        ("http://b/v1/load_lora_adapter", {"lora_name": "new", "lora_path": "/saves/new"}),
    ]
    await collect(b.generate(gen_request("served")))
    assert fake.calls[-1][1]["model"] == "served"
    await b.load_adapter("new", "/saves/new")  # idempotent
    assert len([c for c in fake.calls if c[0].endswith("load_lora_adapter")]) == 2
    await b.unload_adapter("new")
    unloads = [body for url, body in fake.calls if url.endswith("/v1/unload_lora_adapter")]
    assert unloads == [{"lora_name": "new"}, {"lora_name": "new"}]
    await b.unload_adapter("served")  # served by vLLM itself: only forgotten
    assert len([c for c in fake.calls if c[0].endswith("/v1/unload_lora_adapter")]) == 2
    await b.aclose()


async def test_bad_adapter_path_and_runtime_updates_off() -> None:
    b = make(FakeVLLM(), base_model="tiny")
    with pytest.raises(AdapterLoadError, match="No adapter found"):
        await b.load_adapter("x", "/elsewhere/x")
    await b.aclose()
    off = make(FakeVLLM(), base_model="tiny", runtime_lora_updating=False)
    with pytest.raises(AdapterLoadError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
        await off.load_adapter("x", "/saves/x")
    assert not off.capabilities.runtime_adapters
    await off.aclose()


async def test_adapter_folders_are_named_as_the_upstream_sees_them() -> None:
    """vLLM in a container: the gateway's /data/saves is vLLM's /saves; the longest prefix wins."""
    fake = FakeVLLM()
    paths = {"/data/saves": "/saves", "/data/saves/team": "/saves/shared/team"}
    b = make(fake, base_model="tiny", adapter_paths=paths, adapters={"new": "/data/saves/new"})
    await b.start()
    await b.load_adapter("team-run", "/data/saves/team/run1/checkpoint-9")
    await b.load_adapter("served-elsewhere", "/data/saves/served")  # vLLM serves it as "served", root /saves/served
    await b.load_adapter("outside", "/saves/x")  # under no local prefix: sent unchanged
    loads = [body for url, body in fake.calls if url.endswith("/v1/load_lora_adapter")]
    assert loads == [
        {"lora_name": "new", "lora_path": "/saves/new"},
        {"lora_name": "team-run", "lora_path": "/saves/shared/team/run1/checkpoint-9"},
        {"lora_name": "outside", "lora_path": "/saves/x"},
    ]
    await collect(b.generate(gen_request("served-elsewhere")))
    assert fake.calls[-1][1]["model"] == "served"
    assert b.upstream_path("/data/savesX/a") == "/data/savesX/a"  # a prefix is whole folders, not characters
    await b.aclose()
