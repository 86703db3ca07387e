"""Run folders made by ``llamafactory-cli train`` itself (tests/data/lf_runs, with the script that made them) served
by the gateway answer exactly what LLaMA-Factory's own ``ChatModel`` answered with them (greedy, float32): a
missing, empty and custom system prompt, multi-turn, streamed and not. qwen, default and alpaca are served with
nothing but the folder (no template named, no YAML); llama3, whose folder says nothing of its template (its CLI saved
the base's own Jinja), with the YAML its user trained it with (``--adapter-config``) — and with the tokens
LLaMA-Factory added for that template (gateway.template_tokens). LLaMA-Factory cleans tokenization spaces in
non-streamed answers only; ``--decode-clean-up always`` gives those, the default (the tokenizer's setting: off for
this Qwen-style tokenizer) its streamed ones.

Merged exports (``llamafactory-cli export``) served as the base, no adapter and no template named, answer what
ChatModel answers on the merged model, which is what the adapter answered on the base."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.demo import DemoModels
from gateway.settings import AdapterConfig, Settings
from tests.gateway.scripted import chat_content

DATA = Path(__file__).parents[1] / "data" / "lf_runs"
RECORDED = json.loads((DATA / "answers.json").read_text(encoding="utf-8"))
RUNS = {name: cases for name, cases in RECORDED["runs"].items() if cases is not None}
EXPORTS = {name: cases for name, cases in RECORDED["exports"].items() if cases is not None}
# llama3 keeps the model's own Jinja (LLaMA-Factory's CLI saved the base's), so only the user's YAML names it.
TRAINING_CONFIGS = {"llama3": DATA / "train_yaml" / "llama3.yaml"}


def _messages(case: dict[str, Any]) -> list[dict[str, str]]:
    system = [] if case["system"] is None else [{"role": "system", "content": case["system"]}]
    return system + list(case["messages"])


def _runs_on_demo_base(demo_models: DemoModels, clean_up: str) -> Settings:
    assert demo_models.base_dir.parent.name == RECORDED["base"], (
        "the demo base changed since LLaMA-Factory answered: rerun tests/data/lf_runs/make_lf_runs.py")
    configs = {name: str(TRAINING_CONFIGS[name]) if name in TRAINING_CONFIGS else None for name in RUNS}
    return Settings(model=str(demo_models.base_dir), served_model_name="tiny-qwen", device="cpu", dtype="float32",
                    decode_clean_up=clean_up,
                    adapters=tuple(AdapterConfig(name=name, path=str(DATA / name), training_config=configs[name])
                                   for name in sorted(RUNS)))


async def _gateway(config: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(config)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw",
                                     timeout=120) as client:
            yield client


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


async def _chat(client: httpx.AsyncClient, model: str, messages: list[dict[str, str]], stream: bool) -> str:
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": RECORDED["max_new_tokens"],
            "stream": stream}
    return await chat_content(client, body)


async def _mismatches(client: httpx.AsyncClient, recorded: dict[str, list[dict[str, Any]]], clean_up: str,
                      served_as: dict[str, str] | None = None) -> list[tuple[Any, ...]]:
    """Every case of ``recorded`` (model name → cases) asked streamed and not; what differs from LLaMA-Factory."""
    wrong = []
    for name, cases in sorted(recorded.items()):
        for case in cases:
            # LLaMA-Factory's non-streamed text is cleaned, its streamed text is not; ours is one of them, both ways
            expected = case["answer"] if clean_up == "always" else case["stream_answer"]
            for stream in (False, True):
                got = await _chat(client, (served_as or {}).get(name, name), _messages(case), stream)
                if got != expected:
                    wrong.append((name, case["case"], stream, got, expected))
    return wrong


def test_the_runs_cover_the_templates_of_the_issue() -> None:
    assert {"qwen", "default", "alpaca", "llama3"} <= set(RUNS)
    assert {"qwen", "alpaca"} <= set(EXPORTS)
    assert {c["case"] for cases in [*RUNS.values(), *EXPORTS.values()] for c in cases} == {
        "missing system", "empty system", "custom system", "multi-turn"}


@pytest.mark.parametrize("clean_up", ["tokenizer", "always"])
async def test_every_answer_is_llamafactorys(demo_models: DemoModels, clean_up: str) -> None:
    async for client in _gateway(_runs_on_demo_base(demo_models, clean_up)):
        models = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
        for name in RUNS:
            assert models[name]["state"] == "available"
        for name in ("default", "alpaca"):  # their saved Jinja is LLaMA-Factory's translation: served as the template
            assert models[name]["template"] == name
            assert models[name]["template_source"].startswith(f"LLaMA-Factory's Jinja for template {name}")
        assert models["llama3"]["template"] == "llama3"
        assert str(TRAINING_CONFIGS["llama3"]) in models["llama3"]["template_source"]
        wrong = await _mismatches(client, RUNS, clean_up)
        assert not wrong, "\n".join(map(repr, wrong))


async def _render(client: httpx.AsyncClient, model: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    response = await client.post("/v1/chat/render", json={"model": model, "messages": messages})
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_llama3_has_the_tokens_llamafactory_added_and_only_llama3(demo_models: DemoModels) -> None:
    """<|eot_id|> and <|eom_id|> are single ids for llama3 — the very ids of the tokenizer LLaMA-Factory saved in
    the run — in its prompt, in a user's text and as stop ids; the base and the other runs tokenize that text as
    before (pieces of the base vocabulary), and their stops have no llama3 token."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(DATA / "llama3")  # what LLaMA-Factory's training tokenized with
    base = AutoTokenizer.from_pretrained(demo_models.base_dir)
    eot, eom = saved.convert_tokens_to_ids(["<|eot_id|>", "<|eom_id|>"])
    assert (eot, eom) == (len(base), len(base) + 1)  # new tokens, not in the base vocabulary
    text = [{"role": "user", "content": "a<|eot_id|>b<|eom_id|>c"}]
    async for client in _gateway(_runs_on_demo_base(demo_models, "tokenizer")):
        llama3 = await _render(client, "llama3", text)
        assert llama3["token_ids"] == saved.encode(llama3["prompt"], add_special_tokens=False)
        assert llama3["token_ids"].count(eot) == 2 and llama3["token_ids"].count(eom) == 1  # end of turn + user's
        assert set(llama3["stop"]) == {"<|eot_id|>", "<|eom_id|>"}
        for model in ("tiny-qwen", "qwen", "default"):
            rendered = await _render(client, model, text)
            assert rendered["token_ids"] == base.encode(rendered["prompt"], add_special_tokens=False)
            assert max(rendered["token_ids"]) < len(base)
            assert not {"<|eot_id|>", "<|eom_id|>"} & set(rendered["stop"])
        # A raw completion prompt on llama3 is its vocabulary too: the added token is one id, echoed back as text
        body = {"model": "llama3", "prompt": "x<|eot_id|>", "max_tokens": 1, "echo": True, "temperature": 0}
        response = await client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] == len(saved.encode("x<|eot_id|>", add_special_tokens=False))


@pytest.mark.parametrize("name", sorted(EXPORTS))
async def test_a_merged_export_served_as_the_base_answers_as_its_adapter(name: str) -> None:
    """``--model export_<template>`` alone: the template comes from what the export carries (its Modelfile first,
    /v1/models says so), and every answer is ChatModel's on the merged model — the adapter's on the base too."""
    folder = DATA / f"export_{name}"
    config = Settings(model=str(folder), served_model_name="merged", device="cpu", dtype="float32")
    async for client in _gateway(config):
        model = (await client.get("/v1/models")).json()["data"][0]
        assert (model["id"], model["template"]) == ("merged", name)
        assert model["template_source"].startswith(f"LLaMA-Factory's Modelfile for template {name}")
        assert str(folder / "Modelfile") in model["template_source"]
        wrong = await _mismatches(client, {name: EXPORTS[name]}, "tokenizer", served_as={name: "merged"})
        assert not wrong, "\n".join(map(repr, wrong))
    assert [c["stream_answer"] for c in EXPORTS[name]] == [c["stream_answer"] for c in RUNS[name]]


async def test_an_export_without_its_modelfile_gets_its_template_from_the_exported_jinja(tmp_path: Path) -> None:
    """The Modelfile is Ollama's; a user may keep only the Hugging Face files. LLaMA-Factory also wrote its template's
    Jinja into the exported tokenizer, which alone names ``alpaca`` (default system and all)."""
    folder = tmp_path / "export_alpaca"
    shutil.copytree(DATA / "export_alpaca", folder)
    (folder / "Modelfile").unlink()
    config = Settings(model=str(folder), served_model_name="merged", device="cpu", dtype="float32")
    async for client in _gateway(config):
        model = (await client.get("/v1/models")).json()["data"][0]
        assert model["template"] == "alpaca"
        assert model["template_source"].startswith("LLaMA-Factory's Jinja for template alpaca")
        wrong = await _mismatches(client, {"alpaca": EXPORTS["alpaca"]}, "tokenizer", served_as={"alpaca": "merged"})
        assert not wrong, "\n".join(map(repr, wrong))
