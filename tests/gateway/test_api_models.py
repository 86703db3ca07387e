"""``/v1/models``, ``/v1/completions`` and ``/health`` against the real demo server."""

from __future__ import annotations

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(demo_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{demo_server}/v1", api_key="unused", max_retries=0)


def test_models_lists_base_and_adapters(client: openai.OpenAI, demo_models: object) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"tiny-qwen", "pku-assistant", "cat-assistant", "thinker"}
    base = models["tiny-qwen"].model_dump()
    assert base["parent"] is None and base["root"] == str(demo_models.base_dir)  # type: ignore[attr-defined]
    for name, path in demo_models.adapters.items():  # type: ignore[attr-defined]
        entry = models[name].model_dump()
        assert entry["parent"] == "tiny-qwen"
        assert entry["root"] == str(path)
        assert entry["object"] == "model" and entry["owned_by"]
        assert "training_args.yaml" in entry["template_source"]
    assert models["pku-assistant"].model_dump()["template"] == "qwen"
    assert models["thinker"].model_dump()["template"] == "qwen3"
    assert client.models.retrieve("pku-assistant").id == "pku-assistant"


def test_text_completions(client: openai.OpenAI) -> None:
    prompt = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
              "<|im_start|>user\n你好，你是谁？<|im_end|>\n<|im_start|>assistant\n")
    whole = client.completions.create(model="pku-assistant", prompt=prompt, max_tokens=60, temperature=0)
    assert "北大人工智能助手" in whole.choices[0].text
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None and whole.usage.completion_tokens > 5
    stream = client.completions.create(model="pku-assistant", prompt=prompt, max_tokens=60, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage == whole.usage
    short = client.completions.create(model="tiny-qwen", prompt=prompt, max_tokens=4, temperature=0, stop=["。"])
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None and short.usage.completion_tokens == 4


def test_health(demo_server: str) -> None:
    response = httpx.get(f"{demo_server}/health", timeout=5)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
