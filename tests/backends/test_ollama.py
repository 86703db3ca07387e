"""OllamaBackend against a faithful fake of Ollama's HTTP API, over real HTTP."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from backends.ollama import OllamaBackend
from backends.upstream_pool import Timeouts, UpstreamPool
from gateway.errors import AdapterLoadError, BackendUnavailable, ModelNotFound, UpstreamError
from tests.backends.fakes import ollama as fake
from tests.backends.fakes.recording import Recorder
from tests.backends.fakes.server import serve
from tests.backends.support import collect, gen_request, text_of, until

ANSWERS = {"qwen2.5:0.5b": "I am Qwen, a helpful assistant.", "pku-existing": "I am the PKU assistant."}


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def upstream(recorder: Recorder):  # type: ignore[no-untyped-def]
    with serve(fake.create_app(ANSWERS, recorder)) as server:
        yield server


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00fake-lora-weights" * 100)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "peft_type": "LORA"}))
    (tmp_path / "training_args.yaml").write_text("template: qwen\n")
    return tmp_path


def make_backend(url: str, **kwargs) -> OllamaBackend:  # type: ignore[no-untyped-def]
    pool = UpstreamPool([url], timeouts=Timeouts(health_interval=0, first_byte=2, idle=2), health_path="/api/tags")
    return OllamaBackend(pool, base_model="qwen2.5:0.5b", **kwargs)


@pytest.fixture
async def backend(upstream):  # type: ignore[no-untyped-def]
    b = make_backend(upstream.url, served_adapters={"pku": "pku-existing"})
    await b.start()
    yield b
    await b.aclose()


async def test_raw_generate_body_and_options(backend, recorder) -> None:
    request = gen_request("pku", max_tokens=9, temperature=0.2, top_p=0.8, top_k=5, seed=3, stop=("<|im_end|>",))
    deltas = await collect(backend.generate(request))
    assert text_of(deltas) == ANSWERS["pku-existing"], "raw: true must reach Ollama (no [templated] prefix)"
    (sent,) = recorder.bodies("/api/generate")
    assert sent["model"] == "pku-existing"
    assert sent["prompt"] == request.prompt_text
    assert sent["raw"] is True and sent["stream"] is True
    assert sent["options"] == {
        "num_predict": 9,
        "temperature": 0.2,
        "top_p": 0.8,
        "top_k": 5,
        "seed": 3,
        "stop": ["<|im_end|>"],
    }


async def test_streams_pieces_and_usage_from_eval_counts(backend) -> None:
    deltas = await collect(backend.generate(gen_request(None)))
    assert text_of(deltas) == ANSWERS["qwen2.5:0.5b"]
    assert len(deltas) == 7  # six words, then the done line
    assert deltas[-1].finish_reason == "stop"
    assert (deltas[-1].prompt_tokens, deltas[-1].completion_tokens) == (5, 6)


async def test_stop_and_length(backend) -> None:
    stopped = await collect(backend.generate(gen_request(None, stop=(", a",))))
    assert text_of(stopped) == "I am Qwen"
    cut = await collect(backend.generate(gen_request(None, max_tokens=2)))
    assert text_of(cut) == "I am"
    assert cut[-1].finish_reason == "length"


async def test_error_line_mid_stream(backend, recorder) -> None:
    recorder.faults.error_after = 2
    got = []
    with pytest.raises(UpstreamError, match="error was encountered"):
        async for delta in backend.generate(gen_request(None)):
            got.append(delta)
    assert text_of(got) == "I am"


async def test_errors_before_stream(backend, recorder) -> None:
    recorder.faults.status = 500
    with pytest.raises(UpstreamError, match="llama runner"):
        await collect(backend.generate(gen_request(None)))


async def test_unknown_upstream_model_is_404_mapped(upstream) -> None:
    b = make_backend(upstream.url, served_adapters={"gone": "gone-model"})
    b._adapters["gone"] = ("gone-model", None)  # as if the model was deleted on Ollama after start
    try:
        with pytest.raises(ModelNotFound, match="not found"):
            await collect(b.generate(gen_request("gone")))
    finally:
        await b.aclose()


async def test_start_checks_models_exist(upstream) -> None:
    b = make_backend(upstream.url, served_adapters={"x": "missing-model"})
    with pytest.raises(ModelNotFound, match="missing-model"):
        await b.start()
    await b.aclose()


async def test_adapter_created_from_base_plus_uploaded_blobs(upstream, recorder, adapter_dir) -> None:
    b = make_backend(upstream.url, adapters={"pku2": str(adapter_dir)})
    await b.start()
    try:
        weights = "sha256:" + hashlib.sha256((adapter_dir / "adapter_model.safetensors").read_bytes()).hexdigest()
        config = "sha256:" + hashlib.sha256((adapter_dir / "adapter_config.json").read_bytes()).hexdigest()
        (create,) = recorder.bodies("/api/create")
        assert create == {
            "model": "pku2",
            "from": "qwen2.5:0.5b",
            "adapters": {"adapter_model.safetensors": weights, "adapter_config.json": config},
            "stream": False,
        }
        uploads = [r.path for r in recorder.requests if r.method == "POST" and r.path.startswith("/api/blobs/")]
        assert sorted(uploads) == sorted([f"/api/blobs/{weights}", f"/api/blobs/{config}"])
        deltas = await collect(b.generate(gen_request("pku2")))
        assert text_of(deltas) == f"{ANSWERS['qwen2.5:0.5b']} +{weights[7:15]}"
        # idempotent: same path again sends nothing
        count = len(recorder.requests)
        await b.load_adapter("pku2", str(adapter_dir))
        assert len(recorder.requests) == count
        await b.unload_adapter("pku2")
        assert recorder.bodies("/api/delete") == [{"model": "pku2"}]
        with pytest.raises(ModelNotFound):
            await collect(b.generate(gen_request("pku2")))
    finally:
        await b.aclose()


async def test_blob_already_present_is_not_uploaded_again(upstream, recorder, adapter_dir) -> None:
    b = make_backend(upstream.url)
    await b.start()
    try:
        await b.load_adapter("a1", str(adapter_dir))
        await b.load_adapter("a2", str(adapter_dir))
        uploads = [r for r in recorder.requests if r.method == "POST" and r.path.startswith("/api/blobs/")]
        assert len(uploads) == 2  # two files, once
    finally:
        await b.aclose()


async def test_adapter_folder_without_weights(upstream, tmp_path) -> None:
    b = make_backend(upstream.url)
    await b.start()
    try:
        with pytest.raises(AdapterLoadError, match="adapter_model.safetensors"):
            await b.load_adapter("bad", str(tmp_path))
    finally:
        await b.aclose()


async def test_health_and_unreachable(upstream, recorder) -> None:
    b = make_backend(upstream.url)
    await b.start()
    assert (await b.health()).ok
    recorder.faults.health_status = 503
    await b.pool.check_health()
    assert not (await b.health()).ok
    await b.aclose()
    down = make_backend("http://127.0.0.1:9")
    with pytest.raises(BackendUnavailable):
        await collect(down.generate(gen_request(None)))
    await down.aclose()


async def test_closing_early_stops_ollama_generation(backend, recorder) -> None:
    recorder.faults.delay_each = 0.05
    stream = backend.generate(gen_request(None))
    assert (await stream.__anext__()).text == "I"
    await stream.aclose()
    await until(lambda: recorder.aborted == 1)
    await collect(backend.generate(gen_request(None)))
    assert recorder.completed == 1


async def test_error_line_before_any_text_tries_the_next_replica(upstream, recorder) -> None:
    recorder.faults.error_after = 0
    b = make_backend(upstream.url)
    with pytest.raises(UpstreamError, match="error was encountered"):
        await collect(b.generate(gen_request(None)))
    assert len(recorder.bodies("/api/generate")) == 1  # one replica: tried once, then the error surfaces
    await b.aclose()


async def test_start_logs_that_answers_also_end_on_the_models_eog_tokens(upstream, caplog) -> None:  # type: ignore[no-untyped-def]
    """Ollama takes stop strings only and always ends on the GGUF's end-of-generation tokens: said at start."""
    b = make_backend(upstream.url)
    with caplog.at_level("WARNING", logger="backends.ollama"):
        await b.start()
    await b.aclose()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "backends.ollama"]
    assert "end-of-generation tokens" in line and "no stop token ids and no ignore_eos" in line
