"""End to end: the real app (uvicorn on 127.0.0.1) with an upstream backend, driven by the OpenAI SDK.

The upstreams are the LMDeploy and Ollama fakes, so the tests see what the gateway sent them: the prompt it
rendered with the adapter's training template, and the stop strings.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from gateway.app import create_app
from gateway.settings import AdapterConfig, Settings
from tests.backends.fakes import lmdeploy as lmdeploy_fake
from tests.backends.fakes import ollama as ollama_fake
from tests.backends.fakes.recording import Recorder
from tests.backends.fakes.server import ServerThread, serve

pytestmark = pytest.mark.slow

QUESTION = "你是谁？"


@pytest.fixture(scope="module")
def demo(demo_models):  # type: ignore[no-untyped-def]
    return demo_models


def gateway_for(settings: Settings) -> ServerThread:
    return ServerThread(create_app(settings), lifespan="on").start()


def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def lmdeploy_gateway(demo) -> Iterator[tuple[ServerThread, Recorder]]:  # type: ignore[no-untyped-def]
    recorder = Recorder()
    answers = {"qwen-base": "I am the base model.", "pku-assistant": "I am the PKU assistant."}
    with serve(lmdeploy_fake.create_app("qwen-base", answers, recorder)) as upstream:
        settings = Settings(
            model=str(demo.base_dir),
            served_model_name="tiny-qwen",
            template="qwen",
            adapters=(AdapterConfig(name="pku-assistant", path=str(demo.adapters["pku-assistant"])),),
            backend="lmdeploy",
            upstream=(upstream.url,),
            upstream_health_interval=0,
        )
        server = gateway_for(settings)
        try:
            yield server, recorder
        finally:
            server.stop()


def test_lmdeploy_chat_streams_with_training_template(lmdeploy_gateway) -> None:  # type: ignore[no-untyped-def]
    server, recorder = lmdeploy_gateway
    api = client(server)
    assert {m.id for m in api.models.list()} >= {"tiny-qwen", "pku-assistant"}
    stream = api.chat.completions.create(
        model="pku-assistant",
        messages=[{"role": "user", "content": QUESTION}],
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "I am the PKU assistant."
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    (sent,) = recorder.bodies("/v1/completions")
    assert sent["model"] == "pku-assistant"
    assert sent["prompt"].startswith("<|im_start|>system\n")
    assert sent["prompt"].endswith(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_end|>" in sent["stop"]
    base = api.chat.completions.create(model="tiny-qwen", messages=[{"role": "user", "content": QUESTION}])
    assert base.choices[0].message.content == "I am the base model."
    assert recorder.bodies("/v1/completions")[-1]["model"] == "qwen-base"


def test_a_client_hanging_up_ends_the_upstream_stream(lmdeploy_gateway) -> None:  # type: ignore[no-untyped-def]
    """The gateway closes its upstream connection as soon as the client goes: the engine stops generating."""
    server, recorder = lmdeploy_gateway
    recorder.faults.delay_each = 0.5  # 5 pieces: 2.5 s if nobody hung up
    stream = client(server).chat.completions.create(
        model="pku-assistant", messages=[{"role": "user", "content": QUESTION}], stream=True
    )
    first = next(chunk for chunk in stream if chunk.choices and chunk.choices[0].delta.content)
    assert first.choices[0].delta.content.startswith("I")
    stream.close()
    deadline = time.monotonic() + 1.0
    while recorder.aborted == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (recorder.aborted, recorder.completed) == (1, 0)
    recorder.faults.delay_each = 0.0
    answer = client(server).chat.completions.create(model="tiny-qwen", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "I am the base model."


def test_lmdeploy_upstream_error_reaches_the_client_as_openai_error(lmdeploy_gateway) -> None:  # type: ignore[no-untyped-def]
    server, recorder = lmdeploy_gateway
    recorder.faults.status = 500
    with pytest.raises(openai.APIStatusError) as info:
        client(server).chat.completions.create(model="pku-assistant", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 502


def test_ollama_adapter_created_and_used(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    recorder = Recorder()
    with serve(ollama_fake.create_app({"tiny-qwen:latest": "Base answer."}, recorder)) as upstream:
        settings = Settings(
            model=str(demo.base_dir),
            served_model_name="tiny-qwen",
            template="qwen",
            adapters=(AdapterConfig(name="pku-assistant", path=str(demo.adapters["pku-assistant"])),),
            backend="ollama",
            upstream=(upstream.url,),
            upstream_model="tiny-qwen",
            upstream_health_interval=0,
        )
        server = gateway_for(settings)
        try:
            api = client(server)
            (create,) = recorder.bodies("/api/create")
            assert create["from"] == "tiny-qwen" and set(create["adapters"]) == {
                "adapter_model.safetensors",
                "adapter_config.json",
            }
            reply = api.chat.completions.create(model="pku-assistant", messages=[{"role": "user", "content": QUESTION}])
            digest = create["adapters"]["adapter_model.safetensors"]
            assert reply.choices[0].message.content == f"Base answer. +{digest[7:15]}"
            assert reply.usage is not None and reply.usage.completion_tokens == 3
            (sent,) = recorder.bodies("/api/generate")
            assert sent["raw"] is True and sent["model"] == "pku-assistant"
            assert sent["prompt"].endswith("<|im_start|>assistant\n")
            completion = api.completions.create(model="tiny-qwen", prompt="Once upon", max_tokens=1)
            assert completion.choices[0].text == "Base"
            assert completion.choices[0].finish_reason == "length"
        finally:
            server.stop()


def test_upstream_settings_from_yaml_and_errors(tmp_path: Path) -> None:
    from gateway.settings import SettingsError

    config = tmp_path / "gateway.yaml"
    config.write_text(
        "model: qwen2.5:7b\nbackend: ollama\nupstream: [http://gpu-1:11434, http://gpu-2:11434]\n"
        "upstream_idle_timeout: 5\nupstream_model: qwen2.5:7b-instruct\n"
    )
    settings = Settings.load(config)
    assert settings.upstream == ("http://gpu-1:11434", "http://gpu-2:11434")
    assert (settings.backend, settings.upstream_model, settings.upstream_idle_timeout) == (
        "ollama",
        "qwen2.5:7b-instruct",
        5,
    )
    with pytest.raises(SettingsError, match="--upstream"):
        Settings.load(None, model="m", backend="vllm")


def test_cli_serve_help_lists_upstream_flags() -> None:
    from typer.testing import CliRunner

    from gateway.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in ("--backend", "--upstream", "--upstream-model", "--upstream-api-key", "--tokenizer"):
        assert flag in result.output


def test_gateway_serve_process_with_lmdeploy_upstream(demo) -> None:  # type: ignore[no-untyped-def]
    from tests.servers import running_gateway

    recorder = Recorder()
    answers = {"qwen-base": "Base.", "pku-assistant": "PKU here."}
    with serve(lmdeploy_fake.create_app("qwen-base", answers, recorder)) as upstream:
        args = [
            "--model",
            str(demo.base_dir),
            "--served-model-name",
            "tiny-qwen",
            "--template",
            "qwen",
            "--backend",
            "lmdeploy",
            "--upstream",
            upstream.url,
            "--adapter",
            f"pku-assistant={demo.adapters['pku-assistant']}",
        ]
        with running_gateway(args) as url:
            api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            reply = api.chat.completions.create(model="pku-assistant", messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content == "PKU here."
    assert recorder.bodies("/v1/completions")[0]["model"] == "pku-assistant"


def test_gateway_ready_follows_upstream_health_checks(demo) -> None:  # type: ignore[no-untyped-def]
    import time

    import httpx

    recorder = Recorder()
    with serve(lmdeploy_fake.create_app("qwen-base", {"qwen-base": "x"}, recorder)) as upstream:
        settings = Settings(
            model=str(demo.base_dir),
            served_model_name="tiny-qwen",
            template="qwen",
            backend="lmdeploy",
            upstream=(upstream.url,),
            upstream_health_interval=0.1,
        )
        server = gateway_for(settings)
        try:
            assert httpx.get(server.url + "/ready").status_code == 200
            recorder.faults.health_status = 503
            deadline = time.monotonic() + 2
            while httpx.get(server.url + "/ready").status_code != 503:
                assert time.monotonic() < deadline, "gateway /ready never noticed the upstream going down"
                time.sleep(0.05)
            body = httpx.get(server.url + "/health")  # alive all the same: a liveness probe must not restart it
            assert body.status_code == 200
            assert body.json()["backend"] == "lmdeploy" and body.json()[upstream.url]["healthy"] is False
        finally:
            server.stop()
