"""LMDeployBackend against a faithful fake of LMDeploy's api_server, over real HTTP."""

from __future__ import annotations

import time

import pytest

from backends.lmdeploy import LMDeployBackend
from backends.upstream_pool import Timeouts, UpstreamPool
from gateway.errors import AdapterLoadError, InvalidRequest, ModelNotFound, UpstreamError
from tests.backends.fakes import lmdeploy as fake
from tests.backends.fakes.recording import Recorder
from tests.backends.fakes.server import serve
from tests.backends.support import collect, gen_request, text_of, until

ANSWERS = {"qwen-base": "I am a helpful assistant.", "pku": "I am the PKU assistant, trained on campus lore."}


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def upstream(recorder: Recorder):  # type: ignore[no-untyped-def]
    with serve(fake.create_app("qwen-base", ANSWERS, recorder)) as server:
        yield server


@pytest.fixture
async def backend(upstream):  # type: ignore[no-untyped-def]
    pool = UpstreamPool([upstream.url], timeouts=Timeouts(health_interval=0, first_byte=2, idle=2))
    b = LMDeployBackend(pool, adapters={"pku": "/saves/pku"})
    await b.start()
    yield b
    await b.aclose()


async def test_discovers_base_and_streams_adapter_answer_with_usage(backend, recorder) -> None:
    assert backend.base_model == "qwen-base"
    deltas = await collect(backend.generate(gen_request("pku")))
    assert text_of(deltas) == ANSWERS["pku"]
    assert len(deltas) > 2, "the answer must arrive in several pieces"
    last = deltas[-1]
    assert last.finish_reason == "stop"
    assert (last.prompt_tokens, last.completion_tokens) == (5, 9)
    assert all(d.finish_reason is None for d in deltas[:-1])


async def test_sends_rendered_text_adapter_as_model_and_sampling(backend, recorder) -> None:
    request = gen_request("pku", max_tokens=7, temperature=0.3, top_p=0.9, top_k=0, seed=11, stop=("<|im_end|>",))
    await collect(backend.generate(request))
    (sent,) = recorder.bodies("/v1/completions")
    assert sent["model"] == "pku"
    assert sent["prompt"] == request.prompt_text, "LMDeploy takes a list prompt as a batch: text must be sent"
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"], sent["seed"]) == (7, 0.3, 0.9, 11)
    assert sent["top_k"] == 0, "LMDeploy defaults top_k to 40; 'off' must be sent explicitly"
    assert sent["stop"] == ["<|im_end|>"]
    assert sent["skip_special_tokens"] is False, "special stop words must reach the gateway's stop matching"


async def test_base_model_request(backend, recorder) -> None:
    deltas = await collect(backend.generate(gen_request(None)))
    assert text_of(deltas) == ANSWERS["qwen-base"]
    assert recorder.bodies("/v1/completions")[0]["model"] == "qwen-base"


async def test_stop_string_and_length(backend) -> None:
    stopped = await collect(backend.generate(gen_request("pku", stop=(" trained",))))
    assert text_of(stopped) == "I am the PKU assistant,"
    assert stopped[-1].finish_reason == "stop"
    cut = await collect(backend.generate(gen_request("pku", max_tokens=3)))
    assert text_of(cut) == "I am the"
    assert cut[-1].finish_reason == "length"
    assert cut[-1].completion_tokens == 3


async def test_flat_error_bodies_are_mapped(backend, recorder) -> None:
    with pytest.raises(InvalidRequest, match="top_p"):
        await collect(backend.generate(gen_request("pku", top_p=1.5)))
    recorder.faults.status = 500
    with pytest.raises(UpstreamError, match="engine failure injected"):
        await collect(backend.generate(gen_request("pku")))


async def test_unknown_adapter_is_model_not_found_without_a_request(backend, recorder) -> None:
    with pytest.raises(ModelNotFound):
        await collect(backend.generate(gen_request("nope")))
    assert recorder.bodies("/v1/completions") == []


async def test_error_mid_stream_after_text(backend, recorder) -> None:
    recorder.faults.error_after = 2
    got = []
    with pytest.raises(UpstreamError, match="mid-stream"):
        async for delta in backend.generate(gen_request("pku")):
            got.append(delta)
    assert text_of(got) == "I am"


async def test_connection_dropped_mid_stream(backend, recorder) -> None:
    recorder.faults.drop_after = 3
    with pytest.raises(UpstreamError, match="broke off"):
        await collect(backend.generate(gen_request("pku")))


async def test_adapter_not_served_cannot_be_loaded(backend) -> None:
    with pytest.raises(AdapterLoadError, match="cannot load adapters at runtime"):
        await backend.load_adapter("other", "/saves/other")
    await backend.load_adapter("pku", "/saves/pku")  # already there: returns at once


async def test_closing_early_closes_the_upstream_stream(backend, recorder) -> None:
    recorder.faults.delay_each = 0.05
    stream = backend.generate(gen_request("pku"))
    first = await stream.__anext__()
    assert first.text == "I"
    start = time.perf_counter()
    await stream.aclose()
    assert time.perf_counter() - start < 0.5
    assert backend.pool.replicas[0].in_flight == 0
    await until(lambda: recorder.aborted == 1)
    assert recorder.completed == 0


async def test_full_read_reuses_the_connection_and_completes(backend, recorder) -> None:
    for _ in range(3):
        await collect(backend.generate(gen_request("pku")))
    assert (recorder.completed, recorder.aborted) == (3, 0)


async def test_start_logs_that_answers_also_end_on_the_models_eos(upstream, caplog) -> None:  # type: ignore[no-untyped-def]
    """LMDeploy cannot stop on the template's ids only (it adds the model's eos to every request): said at start."""
    b = LMDeployBackend(UpstreamPool([upstream.url], timeouts=Timeouts(health_interval=0)))
    with caplog.at_level("WARNING", logger="backends.lmdeploy"):
        await b.start()
    await b.aclose()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "backends.lmdeploy"]
    assert "generation_config.json's eos_token_id" in line and "LLaMA-Factory" in line
