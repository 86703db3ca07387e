"""Adapters at runtime, end to end: a real ``gateway serve`` with an adapter root, two adapter slots (one pinned),
an admin key, the admin API, vLLM's load/unload bodies and the OpenAI SDK."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from gateway.demo import DemoModels

ADMIN = {"Authorization": "Bearer sekret"}
WHO = "你好，你是谁？"
ANSWERS = {"pku-assistant": "北大人工智能助手", "cat-assistant": "猫猫助手", "thinker": "思考者", "cat-run": "猫猫助手"}


def _broken_copies(root: Path, outside: Path, pku: Path) -> None:
    """Folders that must be refused: pickle weights only, shapes of another model, a symlink leading out."""
    pickle_only = root / "pickle-only"
    pickle_only.mkdir()
    shutil.copy(pku / "adapter_config.json", pickle_only)
    torch.save(load_file(pku / "adapter_model.safetensors"), pickle_only / "adapter_model.bin")
    wrong = root / "wrong-shape"
    wrong.mkdir()
    shutil.copy(pku / "adapter_config.json", wrong)
    tensors = {k: (v[:, :32].contiguous() if "lora_A" in k else v)
               for k, v in load_file(pku / "adapter_model.safetensors").items()}
    save_file(tensors, wrong / "adapter_model.safetensors")
    shutil.copytree(pku, outside / "pku")
    (root / "escape").symlink_to(outside / "pku", target_is_directory=True)


@pytest.fixture(scope="module")
def server(demo_models: DemoModels, demo_cache_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.servers import running_gateway

    root = tmp_path_factory.mktemp("adapter-root")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(demo_models.adapters["pku-assistant"], root / "pku-run")
    shutil.copytree(demo_models.adapters["cat-assistant"], root / "cat-run")
    _broken_copies(root, outside, demo_models.adapters["pku-assistant"])
    args = ["--demo", "--adapter-root", str(root), "--max-adapters", "2", "--pin", "pku-assistant",
            "--admin-key", "sekret"]
    with running_gateway(args, env={"XDG_CACHE_HOME": str(demo_cache_home)}) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def answer(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": WHO}], temperature=0)
    return reply.choices[0].message.content or ""


def adapters(server: str) -> dict[str, dict[str, Any]]:
    response = httpx.get(f"{server}/v1/adapters", headers=ADMIN, timeout=30)
    assert response.status_code == 200, response.text
    return {a["id"]: a for a in response.json()["data"]}


def admin(server: str, method: str, path: str, body: Any = None) -> httpx.Response:
    return httpx.request(method, f"{server}{path}", json=body, headers=ADMIN, timeout=60)


def test_admin_endpoints_need_the_admin_key(server: str) -> None:
    assert httpx.get(f"{server}/v1/adapters", timeout=10).status_code == 401
    wrong = httpx.post(f"{server}/v1/adapters", json={"name": "x", "path": "cat-run"},
                       headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert "x" not in adapters(server)


def test_listing_reports_state_size_rank_template(server: str, demo_models: DemoModels) -> None:
    listed = adapters(server)
    pku = listed["pku-assistant"]
    assert pku["state"] == "loaded" and pku["pinned"] and pku["source"] == "config"
    assert pku["rank"] == 8 and pku["size_bytes"] == (demo_models.adapters["pku-assistant"]
                                                      / "adapter_model.safetensors").stat().st_size
    assert pku["template"] == "qwen" and "training_args.yaml" in pku["template_source"]
    assert listed["thinker"]["template"] == "qwen3"
    assert listed["cat-run"]["source"] == "root" and listed["cat-run"]["state"] == "on_disk"
    assert sum(a["state"] == "loaded" for a in listed.values()) <= 2
    assert not {"pickle-only", "wrong-shape", "escape"} & set(listed)  # refused folders are not offered


def test_load_use_unload_then_404(server: str, client: openai.OpenAI) -> None:
    loaded = admin(server, "POST", "/v1/adapters", {"name": "pku-copy", "path": "pku-run", "base": "tiny-qwen"})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["state"] == "loaded" and loaded.json()["source"] == "api"
    assert "pku-copy" in {m.id for m in client.models.list()}
    assert ANSWERS["pku-assistant"] in answer(client, "pku-copy")
    assert adapters(server)["pku-copy"]["last_used"] is not None
    assert admin(server, "DELETE", "/v1/adapters/pku-copy").json() == {"id": "pku-copy", "object": "adapter",
                                                                       "deleted": True}
    with pytest.raises(openai.NotFoundError):
        answer(client, "pku-copy")
    assert admin(server, "DELETE", "/v1/adapters/pku-copy").status_code == 404
    assert "pku-copy" not in adapters(server)


def test_vllm_load_and_unload_bodies(server: str, client: openai.OpenAI) -> None:
    loaded = admin(server, "POST", "/v1/load_lora_adapter", {"lora_name": "kitty", "lora_path": "cat-run"})
    assert loaded.status_code == 200 and "kitty" in loaded.text
    assert ANSWERS["cat-assistant"] in answer(client, "kitty")
    unloaded = admin(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "kitty"})
    assert unloaded.status_code == 200
    assert "kitty" not in adapters(server)


def test_lazy_load_from_the_root_by_run_and_checkpoint_name(server: str, client: openai.OpenAI,
                                                            demo_models: DemoModels) -> None:
    (checkpoint,) = demo_models.adapters["pku-assistant"].glob("checkpoint-*")
    name = f"pku-run/{checkpoint.name}"
    assert {"cat-run", "pku-run", name} <= {m.id for m in client.models.list()}
    assert adapters(server)[name]["state"] == "on_disk"
    assert ANSWERS["pku-assistant"] in answer(client, name)
    listed = adapters(server)[name]
    assert listed["source"] == "root" and listed["loads"] == 1 and listed["state"] == "loaded"
    assert client.models.retrieve(name).model_dump()["template"] == "qwen"


def test_eviction_keeps_two_resident_and_every_answer_right(server: str, client: openai.OpenAI) -> None:
    rotation = ["pku-assistant", "cat-assistant", "thinker", "cat-run"]
    for _ in range(2):
        for model in rotation:
            assert ANSWERS[model] in answer(client, model), model
            assert sum(a["state"] != "on_disk" for a in adapters(server).values()) <= 2
    with ThreadPoolExecutor(8) as pool:  # all four at once: the three unpinned ones share one slot
        replies = list(pool.map(lambda m: (m, answer(client, m)), rotation * 2))
    assert all(ANSWERS[model] in text for model, text in replies), replies
    listed = adapters(server)
    assert listed["pku-assistant"]["loads"] == 1  # pinned: never evicted
    assert listed["cat-assistant"]["loads"] >= 2 and listed["thinker"]["loads"] >= 2
    assert all(a["in_flight"] == 0 for a in listed.values())


def test_concurrent_loads_of_one_name_load_once(server: str) -> None:
    body = {"name": "twin", "path": "cat-run"}
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: admin(server, "POST", "/v1/adapters", body), range(6)))
    assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
    assert adapters(server)["twin"]["loads"] == 1
    other = admin(server, "POST", "/v1/adapters", {"name": "twin", "path": "pku-run"})
    assert other.status_code == 409  # same name, another folder
    assert admin(server, "DELETE", "/v1/adapters/twin").status_code == 200


@pytest.mark.parametrize("path", ["../outside/pku", "escape", "pku-run/../../outside/pku", "/etc", "nowhere"])
def test_paths_outside_the_roots_are_refused(server: str, client: openai.OpenAI, path: str) -> None:
    before = adapters(server)
    response = admin(server, "POST", "/v1/adapters", {"name": "evil", "path": path})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "path"
    with pytest.raises(openai.NotFoundError):
        answer(client, path)
    assert adapters(server).keys() == before.keys()


def test_a_folder_outside_the_roots_is_refused_even_if_valid(server: str, demo_models: DemoModels) -> None:
    path = str(demo_models.adapters["pku-assistant"])
    response = admin(server, "POST", "/v1/adapters", {"name": "evil", "path": path})
    assert response.status_code == 422 and "outside" in response.json()["error"]["message"]


@pytest.mark.parametrize(("path", "words"), [("pickle-only", "safetensors"), ("wrong-shape", "does not fit")])
def test_unsafe_or_misfitting_adapters_are_refused_and_nothing_changes(server: str, client: openai.OpenAI,
                                                                       path: str, words: str) -> None:
    before = {name: a["state"] for name, a in adapters(server).items()}
    response = admin(server, "POST", "/v1/adapters", {"name": "bad", "path": path})
    assert response.status_code == 422 and words in response.json()["error"]["message"], response.text
    with pytest.raises(openai.UnprocessableEntityError):
        answer(client, path)  # a request naming the run folder gets the same refusal
    assert {name: a["state"] for name, a in adapters(server).items()} == before
    assert ANSWERS["pku-assistant"] in answer(client, "pku-assistant")


def test_unload_waits_for_requests_in_flight(server: str) -> None:
    assert admin(server, "POST", "/v1/adapters", {"name": "busy", "path": "cat-run"}).status_code == 200
    body = {"model": "busy", "prompt": "猫", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{server}/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        refused = admin(server, "DELETE", "/v1/adapters/busy")
        assert refused.status_code == 409 and "in flight" in refused.json()["error"]["message"]
    for _ in range(50):  # the server notices the closed connection and releases the adapter
        if admin(server, "DELETE", "/v1/adapters/busy").status_code == 200:
            break
        time.sleep(0.1)
    assert "busy" not in adapters(server)


def test_a_different_base_is_refused(server: str) -> None:
    response = admin(server, "POST", "/v1/adapters", {"name": "x", "path": "cat-run", "base": "Llama-3-8B"})
    assert response.status_code == 422 and response.json()["error"]["param"] == "base"
    assert "x" not in adapters(server)
