"""Per-model policies in-process (``httpx.ASGITransport`` over ``create_app`` with a scriptable backend): sampling
defaults from generation_config.json and the config, tool policies, tool_choice "none", the tools-over-context 400,
dropping the oldest history, and message shapes real clients send."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends.base import Capabilities, Delta, GenerationRequest
from gateway.app import create_app
from gateway.demo import DemoModels
from gateway.settings import AdapterConfig, SamplingDefaultsConfig, Settings
from tests.gateway.scripted import FakeBackend

WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "查询城市的天气",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}]
HELLO = [{"role": "user", "content": "你好，你是谁？"}]


class ScriptedBackend(FakeBackend):
    """Records every request; answers each with the scripted text's token ids."""

    capabilities = Capabilities(runtime_adapters=True)

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []
        self.answer: tuple[int, ...] = ()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        self.requests.append(request)
        for token_id in self.answer:
            yield Delta(token_ids=(token_id,))
        yield Delta(finish_reason="stop")


@pytest.fixture(scope="module")
def folders(demo_models: DemoModels, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo base; pku-assistant as built; a copy of it with its own generation_config.json."""
    own = tmp_path_factory.mktemp("adapters") / "own-config"
    shutil.copytree(demo_models.adapters["pku-assistant"], own)
    (own / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_k": 5}), encoding="utf-8")
    return {"base": demo_models.base_dir, "pku-assistant": demo_models.adapters["pku-assistant"],
            "thinker": demo_models.adapters["thinker"], "own-config": own}


def settings(folders: dict[str, Path], **overrides: Any) -> Settings:
    adapters = overrides.pop("adapters", (
        AdapterConfig(name="pku-assistant", path=str(folders["pku-assistant"])),
        AdapterConfig(name="own-config", path=str(folders["own-config"]),
                      sampling_defaults=SamplingDefaultsConfig(top_p=0.5)),
        AdapterConfig(name="thinker", path=str(folders["thinker"]), tool_policy="render"),
    ))
    return Settings(model=str(folders["base"]), served_model_name="tiny-qwen", template="qwen", adapters=adapters,
                    **overrides)


class Gateway:
    def __init__(self, client: httpx.AsyncClient, backend: ScriptedBackend) -> None:
        self.client, self.backend = client, backend

    async def chat(self, **body: Any) -> httpx.Response:
        body.setdefault("messages", HELLO)
        return await self.client.post("/v1/chat/completions", json=body)

    async def models(self) -> dict[str, dict[str, Any]]:
        listed = (await self.client.get("/v1/models")).json()["data"]
        return {model["id"]: model for model in listed}


async def serve(config: Settings) -> AsyncIterator[Gateway]:
    backend = ScriptedBackend()
    app = create_app(config, backend=backend)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield Gateway(client, backend)


@pytest.fixture
async def gateway(folders: dict[str, Path]) -> AsyncIterator[Gateway]:
    async for served in serve(settings(folders)):
        yield served


# --- sampling defaults -------------------------------------------------------------------------------------------


async def test_a_request_without_sampling_fields_gets_the_models_generation_config(gateway: Gateway) -> None:
    assert (await gateway.chat(model="pku-assistant")).status_code == 200
    sampling = gateway.backend.requests[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0.7, 0.8, 20)  # the demo base's file
    assert (await gateway.chat(model="pku-assistant", temperature=0, top_k=3)).status_code == 200
    sampling = gateway.backend.requests[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0.0, 0.8, 3)  # set fields win, field by field
    assert (await gateway.chat(model="pku-assistant", temperature=None)).status_code == 200
    assert gateway.backend.requests[-1].sampling.temperature == 0.7  # null is "not set"


async def test_an_adapters_own_file_and_config_override_the_base(gateway: Gateway) -> None:
    await gateway.chat(model="own-config")
    sampling = gateway.backend.requests[-1].sampling
    # its generation_config.json replaces the base's (no top_p there: OpenAI's 1.0), then the config's top_p
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0.3, 0.5, 5)
    models = await gateway.models()
    assert models["own-config"]["sampling_defaults"] == {"temperature": 0.3, "top_p": 0.5, "top_k": 5}
    assert models["tiny-qwen"]["sampling_defaults"] == {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
    completions = await gateway.client.post("/v1/completions", json={"model": "own-config", "prompt": "你好"})
    assert completions.status_code == 200
    assert gateway.backend.requests[-1].sampling.temperature == 0.3


async def test_generation_config_none_gives_openais_defaults(folders: dict[str, Path]) -> None:
    config = settings(folders, generation_config="none", sampling_defaults=SamplingDefaultsConfig(top_k=7))
    async for served in serve(config):
        await served.chat(model="pku-assistant")
        sampling = served.backend.requests[-1].sampling
        assert (sampling.temperature, sampling.top_p, sampling.top_k) == (1.0, 1.0, 7)
        assert (await served.models())["pku-assistant"]["sampling_defaults"] == {
            "temperature": 1.0, "top_p": 1.0, "top_k": 7}


def test_bad_sampling_defaults_in_the_config_are_refused() -> None:
    from gateway.settings import SettingsError

    with pytest.raises(SettingsError, match="sampling_defaults"):
        Settings.load(None, model="m", sampling_defaults={"temperature": 5})
    with pytest.raises(SettingsError, match="sampling_defaults"):
        Settings.load(None, model="m", sampling_defaults={"frequency": 1})


# --- tool policies -----------------------------------------------------------------------------------------------


async def test_auto_ignores_tools_for_a_fine_tune_without_tool_training(gateway: Gateway) -> None:
    answer = await gateway.chat(model="pku-assistant", tools=WEATHER)
    assert answer.status_code == 200
    assert answer.headers["x-gateway-tools-ignored"] == "1"
    assert "get_weather" not in gateway.backend.requests[-1].prompt_text
    plain = await gateway.chat(model="pku-assistant")
    assert gateway.backend.requests[-1].prompt_text == gateway.backend.requests[-2].prompt_text
    assert "x-gateway-tools-ignored" not in plain.headers
    # an explicit tool_choice is the client asking for tools: rendered
    asked = await gateway.chat(model="pku-assistant", tools=WEATHER, tool_choice="auto")
    assert "x-gateway-tools-ignored" not in asked.headers
    assert "get_weather" in gateway.backend.requests[-1].prompt_text
    models = await gateway.models()
    assert models["pku-assistant"]["tool_policy"] == "auto"
    assert "tool_choice" in models["pku-assistant"]["tool_handling"]
    assert models["thinker"]["tool_policy"] == "render"


async def test_a_model_that_renders_tools_parses_calls_and_none_hides_them(gateway: Gateway,
                                                                          folders: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folders["base"])
    gateway.backend.answer = tuple(tokenizer.encode(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>', add_special_tokens=False))
    called = (await gateway.chat(model="thinker", tools=WEATHER)).json()
    assert "get_weather" in gateway.backend.requests[-1].prompt_text
    assert called["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    # tool_choice "none": not offered (the prompt has no tools) and nothing is parsed as a call
    refused = await gateway.chat(model="thinker", tools=WEATHER, tool_choice="none")
    assert "get_weather" not in gateway.backend.requests[-1].prompt_text
    assert "x-gateway-tools-ignored" not in refused.headers
    assert refused.json()["choices"][0]["message"].get("tool_calls") is None
    gateway.backend.answer = ()


async def test_ignore_refuses_a_forced_tool_call(folders: dict[str, Path]) -> None:
    config = settings(folders, adapter_tool_policies={"pku-assistant": "ignore"})
    async for served in serve(config):
        forced = await served.chat(model="pku-assistant", tools=WEATHER, tool_choice="required")
        assert forced.status_code == 400
        assert forced.json()["error"]["param"] == "tool_choice"
        assert (await served.models())["pku-assistant"]["tool_policy"] == "ignore"
        streamed = await served.chat(model="pku-assistant", tools=WEATHER, tool_choice="auto", stream=True)
        assert streamed.status_code == 200 and streamed.headers["x-gateway-tools-ignored"] == "1"


async def test_tools_that_overflow_the_context_are_named_in_the_400(folders: dict[str, Path]) -> None:
    many = [{"type": "function", "function": {"name": f"tool_{i}", "description": "一个很长的描述。" * 40,
                                              "parameters": {"type": "object", "properties": {}}}}
            for i in range(12)]
    async for served in serve(settings(folders, tool_policy="render")):
        refused = await served.chat(model="tiny-qwen", tools=many)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert (error["code"], error["param"]) == ("context_length_exceeded", "tools")
        assert "--tool-policy ignore" in error["message"] and "12 tools" in error["message"]


def test_the_cli_takes_tool_policies_and_the_generation_config_mode() -> None:
    from typer.testing import CliRunner

    from gateway.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", "/nonexistent", "--tool-policy", "sometimes"])
    assert result.exit_code != 0 and "tool_policy" in result.output
    result = CliRunner().invoke(app, ["serve", "--model", "/nonexistent", "--adapter-tool-policy", "x"])
    assert result.exit_code != 0 and "NAME=VALUE" in result.output


def test_auto_reads_tool_training_from_a_llama_factory_run(tmp_path: Path) -> None:
    from gateway.tool_policy import resolve_tool_handling

    factory = tmp_path / "LLaMA-Factory"
    run = factory / "saves" / "qwen" / "lora" / "train_1"
    run.mkdir(parents=True)
    (factory / "data").mkdir()
    (factory / "data" / "dataset_info.json").write_text(json.dumps({
        "identity": {"file_name": "identity.json"},
        "agent": {"file_name": "agent.json", "formatting": "sharegpt",
                  "columns": {"messages": "conversations", "tools": "tools"}},
    }))
    args = {"template": "qwen", "dataset_dir": "data", "output_dir": "saves/qwen/lora/train_1"}
    (run / "training_args.yaml").write_text(json.dumps({**args, "dataset": "identity"}))
    assert not resolve_tool_handling(None, base_dir=None, adapter_dir=run).trained_with_tools
    (run / "training_args.yaml").write_text(json.dumps({**args, "dataset": "identity,agent"}))
    handling = resolve_tool_handling(None, base_dir=None, adapter_dir=run)
    assert handling.trained_with_tools and "dataset_info.json" in handling.reason
    assert handling.offers_tools(WEATHER, None)
    assert not resolve_tool_handling("ignore", base_dir=None, adapter_dir=run).offers_tools(WEATHER, None)


# --- history and message shapes ----------------------------------------------------------------------------------


async def test_a_chat_too_long_for_the_context_drops_its_oldest_messages(gateway: Gateway) -> None:
    long = "北京大学创办于1898年。" * 300  # ~5,000 tokens in a 2,048-token model
    two_users = [{"role": "user", "content": long}, {"role": "user", "content": "你好，你是谁？"}]
    answer = await gateway.chat(model="pku-assistant", messages=two_users)
    assert answer.status_code == 200
    assert answer.headers["x-gateway-messages-dropped"] == "1"
    assert long not in gateway.backend.requests[-1].prompt_text
    rendered = (await gateway.client.post("/v1/chat/render", json={"model": "pku-assistant",
                                                                    "messages": two_users})).json()
    assert rendered["messages_dropped"] == 1 and rendered["prompt"].endswith("你好，你是谁？<|im_end|>\n"
                                                                             "<|im_start|>assistant\n")
    alone = await gateway.chat(model="pku-assistant", messages=[{"role": "user", "content": long}])
    assert alone.status_code == 400 and alone.json()["error"]["code"] == "context_length_exceeded"


async def test_history_overflow_error_keeps_the_400(folders: dict[str, Path]) -> None:
    long = "北京大学创办于1898年。" * 300
    async for served in serve(settings(folders, history_overflow="error")):
        refused = await served.chat(model="pku-assistant", messages=[{"role": "user", "content": long},
                                                                     {"role": "user", "content": "你好"}])
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"


async def test_the_render_endpoint_shows_merged_messages(gateway: Gateway) -> None:
    two = [{"role": "user", "content": "A"}, {"role": "developer", "content": "D"}, {"role": "user", "content": "B"}]
    rendered = (await gateway.client.post("/v1/chat/render", json={"model": "pku-assistant", "messages": two})).json()
    assert rendered["prompt"] == ("<|im_start|>system\nD<|im_end|>\n<|im_start|>user\nA\n\nB<|im_end|>\n"
                                  "<|im_start|>assistant\n")


async def test_an_image_part_is_a_400_with_its_code(gateway: Gateway) -> None:
    image = [{"role": "user", "content": [{"type": "text", "text": "这是什么颜色？"},
                                          {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}]}]
    for stream in (False, True):
        refused = await gateway.chat(model="pku-assistant", messages=image, stream=stream)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert (error["code"], error["param"]) == ("unsupported_content_type", "messages[0].content[1]")


async def test_a_final_assistant_message_is_continued(gateway: Gateway) -> None:
    messages = [*HELLO, {"role": "assistant", "content": "我是北大"}]
    assert (await gateway.chat(model="pku-assistant", messages=messages)).status_code == 200
    assert gateway.backend.requests[-1].prompt_text.endswith("<|im_start|>assistant\n我是北大")

