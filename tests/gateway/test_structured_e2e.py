"""Structured output end to end: a real ``gateway serve --demo``, the real openai SDK, the demo's real models."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "查询城市的天气", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "description": "城市名称"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CST"]}}, "required": ["zone"]}}}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0},
                   "languages": {"type": "array", "items": {"enum": ["zh", "en", "fr"]}, "maxItems": 3}},
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(demo_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{demo_server}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("model", ["tiny-qwen", "pku-assistant"])
def test_json_schema_answers_validate(client: openai.OpenAI, model: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "你好，你是谁？"}], response_format=fmt,  # type: ignore[arg-type]
        temperature=1.0, seed=7, n=3, max_tokens=200,
    )
    for choice in answer.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), PERSON)


def test_json_object_streamed(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="tiny-qwen", messages=[{"role": "user", "content": "Who are you?"}], max_tokens=300,
        response_format={"type": "json_object"}, temperature=0.7, seed=1, stream=True,
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    if finish == ["stop"]:
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens: allowed to be incomplete, but it is the start of an object
        assert finish == ["length"] and text.startswith("{")


@pytest.mark.parametrize("thinking", [True, False])
def test_forced_tool_call_on_thinker(client: openai.OpenAI, thinking: bool) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    answer = client.chat.completions.create(
        model="thinker", messages=[{"role": "user", "content": "北京天气怎么样？"}], tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice=named, temperature=1.0, seed=3, max_tokens=400,  # type: ignore[arg-type]
        extra_body={"chat_template_kwargs": {"enable_thinking": thinking}},
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_time"  # not what the thinker was trained to call: forced
    assert json.loads(call.function.arguments)["zone"] in ("UTC", "CST")


def test_required_tool_call_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="thinker", messages=[{"role": "user", "content": "北京天气怎么样？"}], tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice="required", temperature=0, max_tokens=400, stream=True,
    )
    chunks = list(stream)
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["tool_calls"]
    assert len(calls) == 1 and calls[0].function is not None
    assert calls[0].function.name in ("get_weather", "get_time")
    arguments = json.loads(calls[0].function.arguments or "")
    jsonschema.validate(arguments, (WEATHER if calls[0].function.name == "get_weather" else TIME)["function"][
        "parameters"])


def test_tool_choice_errors_through_the_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model="thinker", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert raised.value.body["param"] == "tool_choice"  # type: ignore[index]
