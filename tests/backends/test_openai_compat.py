"""OpenAICompatBackend (and the shared SSE completions parsing) against a fake OpenAI-compatible server."""

from __future__ import annotations

import httpx
import pytest

from backends.completions import parse_completion_stream
from backends.openai_compat import OpenAICompatBackend
from backends.upstream_pool import Timeouts, UpstreamPool
from gateway.errors import AdapterLoadError, InvalidRequest, ModelNotFound, UpstreamError
from tests.backends.fakes import openai as fake
from tests.backends.fakes.recording import Recorder
from tests.backends.fakes.server import serve
from tests.backends.support import collect, gen_request, text_of, until

ANSWERS = {"base-7b": "Hello there, friend.", "pku-lora": "PKU answer here."}


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def upstream(recorder):  # type: ignore[no-untyped-def]
    with serve(fake.create_app(ANSWERS, recorder, lora_parent="base-7b")) as server:
        yield server


async def make(url: str, **kwargs) -> OpenAICompatBackend:  # type: ignore[no-untyped-def]
    b = OpenAICompatBackend(UpstreamPool([url], timeouts=Timeouts(health_interval=0)), **kwargs)
    await b.start()
    return b


async def test_standard_fields_only_and_text_prompt(upstream, recorder) -> None:
    b = await make(upstream.url)
    assert b.base_model == "base-7b"
    # top_k is no OpenAI field: a model default (generation_config.json) is left to the upstream's own defaults
    request = gen_request(top_k=20, defaulted=frozenset({"top_k"}), stop=("\n",), stop_token_ids=(7,), seed=5)
    deltas = await collect(b.generate(request))
    assert text_of(deltas) == ANSWERS["base-7b"]
    (sent,) = recorder.bodies("/v1/completions")
    assert sent == {
        "model": "base-7b",
        "prompt": request.prompt_text,
        "max_tokens": 32,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 5,
        "stop": ["\n"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert deltas[-1].prompt_tokens == 5 and deltas[-1].completion_tokens == 3
    await b.aclose()


async def test_a_top_k_the_request_sets_is_refused(upstream, recorder) -> None:
    b = await make(upstream.url)
    with pytest.raises(InvalidRequest) as refused:
        await collect(b.generate(gen_request(top_k=20)))
    assert refused.value.param == "top_k" and "openai backend" in refused.value.message
    assert recorder.bodies("/v1/completions") == []
    await b.aclose()


async def test_token_prompt_option_sends_ids(upstream, recorder) -> None:
    b = await make(upstream.url, token_prompt=True)
    request = gen_request()
    await collect(b.generate(request))
    assert recorder.bodies("/v1/completions")[0]["prompt"] == list(request.prompt_token_ids)
    assert b.capabilities.token_ids_in
    await b.aclose()


async def test_adapters_matched_by_name_or_served_root(upstream, recorder) -> None:
    b = await make(upstream.url, adapters={"pku": "/loras/pku-lora"})
    deltas = await collect(b.generate(gen_request("pku")))
    assert text_of(deltas) == ANSWERS["pku-lora"]
    assert recorder.bodies("/v1/completions")[0]["model"] == "pku-lora"
    with pytest.raises(AdapterLoadError):
        await b.load_adapter("other", "/loras/other")
    await b.aclose()


async def test_nested_error_bodies(upstream, recorder) -> None:
    b = await make(upstream.url, served_adapters={"ghost": "ghost-lora"})
    b._adapters["ghost"] = ("ghost-lora", None)  # the upstream dropped it after start
    with pytest.raises(ModelNotFound, match="does not exist"):
        await collect(b.generate(gen_request("ghost")))
    recorder.faults.status = 400
    with pytest.raises(InvalidRequest, match="engine failure injected"):
        await collect(b.generate(gen_request()))
    await b.aclose()


async def test_error_event_mid_stream(upstream, recorder) -> None:
    recorder.faults.error_after = 1
    b = await make(upstream.url)
    got = []
    with pytest.raises(UpstreamError, match="engine died"):
        async for delta in b.generate(gen_request()):
            got.append(delta)
    assert text_of(got) == "Hello"
    await b.aclose()


async def _lines(*lines: str):  # type: ignore[no-untyped-def]
    for line in lines:
        yield line


async def test_parser_edge_cases() -> None:
    # keep-alive comments and blank lines are ignored; finish without usage still ends the stream
    deltas = await collect(
        parse_completion_stream(
            _lines(
                ": ping",
                "",
                'data: {"choices":[{"index":0,"text":"a","token_ids":[5]}]}',
                "",
                'data: {"choices":[{"index":0,"text":"","finish_reason":"length"}]}',
                "data: [DONE]",
            )
        )
    )
    assert [(d.text, d.token_ids, d.finish_reason) for d in deltas] == [("a", (5,), None), ("", (), "length")]
    with pytest.raises(UpstreamError, match="without a finish reason"):
        await collect(parse_completion_stream(_lines('data: {"choices":[{"index":0,"text":"a"}]}')))
    with pytest.raises(UpstreamError, match="not JSON"):
        await collect(parse_completion_stream(_lines("data: {oops")))
    with pytest.raises(UpstreamError, match="abort"):
        await collect(
            parse_completion_stream(_lines('data: {"choices":[{"index":0,"text":"","finish_reason":"abort"}]}'))
        )


async def test_mock_transport_flat_error_object_in_stream() -> None:
    body = b'data: {"object":"error","message":"bad things","type":"x","code":400}\n\n'

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    pool = UpstreamPool(["http://up"], transport=httpx.MockTransport(handler), timeouts=Timeouts(health_interval=0))
    b = OpenAICompatBackend(pool, base_model="m")
    with pytest.raises(InvalidRequest, match="bad things"):
        await collect(b.generate(gen_request()))
    await b.aclose()


async def test_closing_early_reaches_the_upstream(upstream, recorder) -> None:
    recorder.faults.delay_each = 0.05
    b = await make(upstream.url)
    stream = b.generate(gen_request())
    await stream.__anext__()
    await stream.aclose()
    await until(lambda: recorder.aborted == 1)
    await b.aclose()
