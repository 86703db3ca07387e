"""The gateway starts while its upstream is still coming up: alive, not ready, then ready without a restart;
and each request's ``x-request-id`` travels on to the upstream."""

from __future__ import annotations

import json
import logging
import time

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.demo import DemoModels
from gateway.settings import AdapterConfig, Settings
from tests.backends.fakes import lmdeploy as lmdeploy_fake
from tests.backends.fakes.recording import Recorder
from tests.backends.fakes.server import ServerThread, free_port

pytestmark = pytest.mark.slow


def test_not_ready_until_the_upstream_answers_then_serves(demo_models: DemoModels,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    port = free_port()
    recorder = Recorder()
    settings = Settings(
        model=str(demo_models.base_dir), served_model_name="tiny-qwen", template="qwen", backend="lmdeploy",
        adapters=(AdapterConfig(name="pku-assistant", path=str(demo_models.adapters["pku-assistant"])),),
        upstream=(f"http://127.0.0.1:{port}",), upstream_health_interval=0.2,
    )
    gateway = ServerThread(create_app(settings), lifespan="on").start()  # nothing listens on the upstream port
    upstream: ServerThread | None = None
    try:
        assert httpx.get(gateway.url + "/health").status_code == 200
        ready = httpx.get(gateway.url + "/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
        models = httpx.get(gateway.url + "/v1/models")
        assert models.status_code == 503 and models.json()["error"]["code"] == "not_ready"
        answers = {"qwen-base": "base.", "pku-assistant": "PKU here."}
        upstream = ServerThread(lmdeploy_fake.create_app("qwen-base", answers, recorder), port=port).start()
        deadline = time.monotonic() + 10
        while httpx.get(gateway.url + "/ready").status_code != 200:
            assert time.monotonic() < deadline, "the gateway never became ready"
            time.sleep(0.1)
        api = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        reply = api.chat.completions.with_raw_response.create(
            model="pku-assistant", messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-request-id": "abc-1"})
        assert reply.parse().choices[0].message.content == "PKU here."
        assert reply.headers["x-request-id"] == "abc-1"
        (sent,) = [r for r in recorder.requests if r.path == "/v1/completions"]
        assert sent.headers["x-request-id"] == "abc-1"
        (line,) = [json.loads(r.getMessage()) for r in caplog.records
                   if r.name == "gateway.access" and "abc-1" in r.getMessage()]
        assert line["replica"] == f"http://127.0.0.1:{port}" and line["backend"] == "lmdeploy"
        assert line["adapter"] == "pku-assistant" and line["status"] == 200
    finally:
        gateway.stop()
        if upstream is not None:
            upstream.stop()
