"""``gateway serve --workers N``: N processes on one port in front of an upstream, stateless per process."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai

from gateway.demo import DemoModels
from tests.backends.fakes.server import serve
from tests.backends.fakes.vllm import FakeVLLM
from tests.servers import gateway_process


def workers_of(pid: int) -> list[int]:
    """uvicorn's worker processes (multiprocessing spawn children; not its resource tracker)."""
    kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [kid for kid in kids if b"spawn_main" in Path(f"/proc/{kid}/cmdline").read_bytes()]


def environ(pid: int) -> dict[str, str]:
    pairs = (item.partition("=") for item in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if item)
    return {key: value for key, _, value in pairs}


def test_two_workers_serve_one_port_and_refuse_runtime_adapter_changes(demo_models: DemoModels) -> None:
    pku = str(demo_models.adapters["pku-assistant"])
    fake = FakeVLLM(base="tiny", disk=frozenset({pku}), tokens=3)
    with serve(fake.app()) as upstream:
        args = ["--backend", "vllm", "--upstream", upstream.url, "--model", str(demo_models.base_dir),
                "--upstream-model", "tiny", "--template", "qwen", "--adapter", f"pku={pku}", "--workers", "2"]
        with gateway_process(args) as gateway:
            workers = workers_of(gateway.process.pid)
            assert len(workers) == 2
            metrics_dirs = {environ(pid).get("PROMETHEUS_MULTIPROC_DIR") for pid in workers}
            (metrics_dir,) = metrics_dirs
            assert metrics_dir and Path(metrics_dir).is_dir()
            assert fake.loras == {"pku": pku}, "loaded once: the second worker found it served"

            api = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
            for _ in range(6):
                answer = api.completions.create(model="pku", prompt="hello", max_tokens=3)
                assert answer.choices[0].text == " t0 t1 t2"

            refused = httpx.post(f"{gateway.url}/v1/adapters", json={"name": "other", "path": pku})
            assert refused.status_code == 409
            assert refused.json()["error"]["code"] == "multiple_workers"
            assert "--adapter-root" in refused.json()["error"]["message"]
            unload = httpx.post(f"{gateway.url}/v1/unload_lora_adapter", json={"lora_name": "pku"})
            assert unload.status_code == 409
            assert httpx.get(f"{gateway.url}/v1/adapters").status_code == 200

            gateway.process.send_signal(signal.SIGTERM)
            assert gateway.process.wait(timeout=30) == 0
            assert not Path(metrics_dir).exists(), "the metrics folder is removed at exit"


def test_workers_with_the_torch_backend_are_refused_with_a_sentence() -> None:
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--demo", "--workers", "2"],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2])
    assert done.returncode == 2
    assert "needs an upstream backend" in " ".join(done.stderr.split())
