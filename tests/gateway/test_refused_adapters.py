"""One configured adapter the backend cannot serve (layer_replication) does not stop the server: the rest are
served, the refused one is listed with its reason, and requests for it get a 422 that says why — in-process and on a
real server."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from backends.base import Capabilities, Delta, GenerationRequest, Health
from backends.lora import read_adapter
from gateway.app import create_app
from gateway.demo import DemoModels
from gateway.settings import AdapterConfig, Settings

HELLO = [{"role": "user", "content": "你好，你是谁？"}]


class CheckingBackend:
    """Answers nothing but checks adapter folders with the native backend's real reader (it refuses
    layer_replication)."""

    capabilities = Capabilities(runtime_adapters=True)

    def __init__(self) -> None:
        self.loaded: set[str] = set()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        yield Delta(finish_reason="stop")

    async def load_adapter(self, name: str, path: str) -> None:
        read_adapter(name, path)
        self.loaded.add(name)

    async def unload_adapter(self, name: str) -> None:
        self.loaded.discard(name)

    async def health(self) -> Health:
        return Health(ok=True)

    async def aclose(self) -> None:
        return None


@pytest.fixture(scope="module")
def replicated(demo_models: DemoModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pku-assistant's folder with ``layer_replication`` in its adapter_config.json (a model with repeated layers)."""
    folder = tmp_path_factory.mktemp("adapters") / "rep"
    shutil.copytree(demo_models.adapters["pku-assistant"], folder)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    changed = {**config, "layer_replication": [[0, 2], [1, 2]]}
    (folder / "adapter_config.json").write_text(json.dumps(changed), encoding="utf-8")
    return folder


async def test_in_process_the_rest_is_served_and_the_refused_one_says_why(
        demo_models: DemoModels, replicated: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = Settings(model=str(demo_models.base_dir), served_model_name="tiny-qwen", template="qwen", adapters=(
        AdapterConfig(name="rep", path=str(replicated)),
        AdapterConfig(name="pku-assistant", path=str(demo_models.adapters["pku-assistant"])),
    ))
    backend = CheckingBackend()
    app = create_app(config, backend=backend)
    with caplog.at_level("ERROR"):
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
                assert backend.loaded == {"pku-assistant"}
                models = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
                assert models["rep"]["state"] == "refused" and "layer_replication" in models["rep"]["reason"]
                assert models["pku-assistant"]["state"] == "available" and models["pku-assistant"]["reason"] is None
                listed = {a["id"]: a for a in (await client.get("/v1/adapters")).json()["data"]}
                assert listed["rep"]["state"] == "refused" and "layer_replication" in listed["rep"]["reason"]
                assert listed["pku-assistant"]["state"] == "loaded"
                refused = await client.post("/v1/chat/completions", json={"model": "rep", "messages": HELLO})
                assert refused.status_code == 422
                error = refused.json()["error"]
                assert error["code"] == "adapter_refused" and error["param"] == "model"
                assert "layer_replication" in error["message"]
                served = await client.post("/v1/chat/completions", json={"model": "pku-assistant", "messages": HELLO})
                assert served.status_code == 200
    lines = [r.getMessage() for r in caplog.records if "rep" in r.getMessage()]
    assert len(lines) == 1 and "layer_replication" in lines[0] and not any(r.exc_info for r in caplog.records)


@pytest.fixture(scope="module")
def variants(demo_models: DemoModels, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters saved by peft on the demo base: DoRA (served) and ``modules_to_save`` on a norm (refused at install,
    not when read)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("variants")
    options = {"dora": {"use_dora": True, "target_modules": ["q_proj", "v_proj"]},
               "norm": {"target_modules": ["q_proj"], "modules_to_save": ["norm"]}}
    for name, config in options.items():
        torch.manual_seed(3)
        model = AutoModelForCausalLM.from_pretrained(demo_models.base_dir)
        get_peft_model(model, LoraConfig(r=4, init_lora_weights=False, **config)).save_pretrained(root / name)
    return {name: root / name for name in options}


def test_a_real_server_starts_and_refuses_only_the_replicated_adapter(demo_models: DemoModels, demo_cache_home: Path,
                                                                      replicated: Path,
                                                                      variants: dict[str, Path]) -> None:
    from tests.servers import running_gateway

    env = {"XDG_CACHE_HOME": str(demo_cache_home)}
    flags = ["--demo", "--adapter", f"rep={replicated}", "--adapter", f"dora={variants['dora']}",
             "--adapter", f"norm={variants['norm']}", "--adapter-template", "dora=qwen"]
    with running_gateway(flags, env=env) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        models = {m.id: m.model_dump() for m in client.models.list()}
        assert models["rep"]["state"] == "refused" and "layer_replication" in models["rep"]["reason"]
        with pytest.raises(openai.UnprocessableEntityError, match="layer_replication"):
            client.chat.completions.create(model="rep", messages=HELLO, max_tokens=4)  # type: ignore[arg-type]
        # refused when installed on the model (the file reads fine): the same state, reason and 422
        assert models["norm"]["state"] == "refused" and "modules_to_save" in models["norm"]["reason"]
        with pytest.raises(openai.UnprocessableEntityError, match="only the input embedding and the output head"):
            client.chat.completions.create(model="norm", messages=HELLO, max_tokens=4)  # type: ignore[arg-type]
        assert models["dora"]["state"] != "refused"  # DoRA is served
        dora = client.chat.completions.create(model="dora", messages=HELLO, max_tokens=4)  # type: ignore[arg-type]
        assert dora.choices[0].finish_reason in ("stop", "length")
        answer = client.chat.completions.create(model="pku-assistant", messages=HELLO, max_tokens=8, temperature=0)
        assert answer.choices[0].message.content
