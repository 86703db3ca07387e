"""``response_format``, ``tool_choice`` and the ``max_tokens`` cap, in-process, over a scriptable fake backend.

The fake records the ``GenerationRequest`` each choice becomes and answers with scripted text, so these tests see
exactly which constraint the gateway asks a backend to enforce, and what the client gets back from the answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends.base import Capabilities, Delta, GenerationRequest
from gateway.app import create_app
from gateway.demo import DemoModels
from gateway.settings import AdapterConfig, Settings
from tests.gateway.scripted import FakeBackend

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "北京天气怎么样？"}]


class ScriptedBackend(FakeBackend):
    """Answers every request with ``answer`` as one text delta; remembers the requests."""

    capabilities = Capabilities(runtime_adapters=True, token_ids_in=True, token_ids_out=False, max_context=512)

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []
        self.answer = "hello"

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        self.requests.append(request)
        yield Delta(text=self.answer)
        yield Delta(text="", finish_reason="stop", completion_tokens=3)


@pytest.fixture(scope="module")
async def app_client(demo_models: DemoModels) -> AsyncIterator[tuple[httpx.AsyncClient, ScriptedBackend]]:
    backend = ScriptedBackend()
    settings = Settings(
        model=str(demo_models.base_dir),
        served_model_name="tiny-qwen",
        adapters=(AdapterConfig(name="thinker", path=str(demo_models.adapters["thinker"])),
                  AdapterConfig(name="react", path=str(Path(demo_models.adapters["pku-assistant"])),
                                template="llama2")),
    )
    app = create_app(settings, backend=backend)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, backend


@pytest.fixture
def api(app_client: tuple[httpx.AsyncClient, ScriptedBackend]) -> tuple[httpx.AsyncClient, ScriptedBackend]:
    """The module's app, with a backend that has seen no request yet."""
    client, backend = app_client
    backend.requests.clear()
    backend.answer = "hello"
    return client, backend


async def chat(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await client.post("/v1/chat/completions", json={"model": "tiny-qwen", "messages": ASK, **body})


def error_of(response: httpx.Response, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    return str(error["message"])


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "get_time"),
        ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "not in tools"),
        ({"tool_choice": "required"}, "required"),
        ({"tool_choice": "required", "tools": []}, "required"),
    ],
)
async def test_tool_choice_must_match_tools(api: tuple[httpx.AsyncClient, ScriptedBackend], body: dict[str, Any],
                                            says: str) -> None:
    client, backend = api
    assert says in error_of(await chat(client, **body), "tool_choice")
    assert backend.requests == []


async def test_json_schema_reaches_the_backend_as_a_constraint(api: tuple[httpx.AsyncClient, ScriptedBackend]) -> None:
    client, backend = api
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    backend.answer = '{"answer": 2}'
    fmt = {"type": "json_schema", "json_schema": {"name": "sum", "schema": schema, "strict": True}}
    response = await chat(client, response_format=fmt, n=2)
    assert response.status_code == 200, response.text
    assert [json.loads(c["message"]["content"]) for c in response.json()["choices"]] == [{"answer": 2}] * 2
    assert len(backend.requests) == 2
    for request in backend.requests:
        constraint = request.sampling.constraint
        assert constraint is not None
        assert (json.loads(constraint.json_schema), constraint.prefix, constraint.thought) == (schema, "", None)
        assert constraint.param == "response_format"


async def test_json_object_and_text(api: tuple[httpx.AsyncClient, ScriptedBackend]) -> None:
    client, backend = api
    assert (await chat(client, response_format={"type": "json_object"})).status_code == 200
    assert (await chat(client, response_format={"type": "text"})).status_code == 200
    assert (await chat(client)).status_code == 200
    json_object, text, plain = (r.sampling.constraint for r in backend.requests)
    assert json_object is not None and json.loads(json_object.json_schema) == {"type": "object"}
    assert text is None and plain is None


@pytest.mark.parametrize(
    ("fmt", "param"),
    [
        ({"type": "xml"}, "response_format"),
        ({"type": "json_schema"}, "response_format.json_schema.json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}},
         "response_format.json_schema.json_schema.name"),
    ],
)
async def test_bad_response_format_is_400(api: tuple[httpx.AsyncClient, ScriptedBackend], fmt: dict[str, Any],
                                          param: str) -> None:
    client, _ = api
    error_of(await chat(client, response_format=fmt), param)


async def test_forced_tool_on_a_thinking_template(api: tuple[httpx.AsyncClient, ScriptedBackend]) -> None:
    client, backend = api
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
    backend.answer = "<think>\n\n</think>\n\n" + call
    named = {"type": "function", "function": {"name": "get_weather"}}
    response = await chat(client, model="thinker", tools=[WEATHER, TIME], tool_choice=named)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "北京"}'}
    constraint = backend.requests[-1].sampling.constraint
    assert constraint is not None and constraint.param == "tool_choice"
    assert (constraint.prefix, constraint.suffix) == ("<tool_call>\n", "\n</tool_call>")
    assert constraint.thought == ("<think>\n", "\n</think>\n\n")  # thinking on: a thought may come first
    assert json.loads(constraint.json_schema)["properties"]["name"] == {"const": "get_weather"}

    off = await chat(client, model="thinker", tools=[WEATHER, TIME], tool_choice="required",
                     chat_template_kwargs={"enable_thinking": False})
    assert off.status_code == 200, off.text
    required = backend.requests[-1].sampling.constraint
    assert required is not None and required.thought is None  # the prompt already holds the empty thought
    names = [c["properties"]["name"]["const"] for c in json.loads(required.json_schema)["anyOf"]]
    assert names == ["get_weather", "get_time"]


async def test_forcing_a_format_not_covered_is_400(api: tuple[httpx.AsyncClient, ScriptedBackend]) -> None:
    client, backend = api
    message = error_of(await chat(client, model="react", tools=[WEATHER], tool_choice="required"), "tool_choice")
    assert "llama2" in message
    assert backend.requests == []
    assert (await chat(client, model="react", tools=[WEATHER], tool_choice="auto")).status_code == 200


async def test_response_format_with_forced_tool_is_400(api: tuple[httpx.AsyncClient, ScriptedBackend]) -> None:
    client, _ = api
    error_of(await chat(client, tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}),
             "response_format")


async def test_a_capped_max_tokens_is_logged_and_reported(api: tuple[httpx.AsyncClient, ScriptedBackend],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    client, backend = api
    with caplog.at_level(logging.INFO, logger="gateway.generation"):
        capped = await chat(client, max_tokens=100_000)
        streamed = await chat(client, max_completion_tokens=100_000, stream=True)
        fits = await chat(client, max_tokens=5)
    room = backend.requests[0].sampling.max_tokens
    assert room < 100_000
    assert capped.headers["x-gateway-max-tokens-capped"] == str(room)
    assert streamed.headers["x-gateway-max-tokens-capped"] == str(room)
    assert "x-gateway-max-tokens-capped" not in fits.headers
    logged = [r.getMessage() for r in caplog.records if "capped" in r.getMessage()]
    assert len(logged) == 2 and f"capped to {room}" in logged[0]
    completions = await client.post("/v1/completions", json={"model": "tiny-qwen", "prompt": "hi", "max_tokens": 10**6})
    assert completions.headers["x-gateway-max-tokens-capped"] == str(backend.requests[-1].sampling.max_tokens)
