"""Templates end to end: each adapter's own template, reasoning_content, tool_calls, and the render endpoint."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from transformers import AutoTokenizer

WEATHER_TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询城市的天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名称"}},
                       "required": ["city"]},
    },
}]
ASK_WEATHER = [{"role": "user", "content": "北京天气怎么样？"}]


@pytest.fixture(scope="module")
def client(demo_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{demo_server}/v1", api_key="unused", max_retries=0)


def test_two_templates_in_one_server(client: openai.OpenAI) -> None:
    """pku-assistant was trained with `qwen`, thinker with `qwen3`: each gets its own prompt and answers right."""
    pku = client.chat.completions.create(model="pku-assistant", temperature=0,
                                         messages=[{"role": "user", "content": "你好，你是谁？"}])
    thinker = client.chat.completions.create(model="thinker", temperature=0,
                                             messages=[{"role": "user", "content": "你好，你是谁？"}])
    assert "北大人工智能助手" in (pku.choices[0].message.content or "")
    message = thinker.choices[0].message
    assert "思考者" in (message.content or "")
    reasoning = message.model_extra.get("reasoning_content") if message.model_extra else None
    assert reasoning and "<think>" not in reasoning and "思考" not in (message.content or "")[:1]
    assert "<think>" not in (message.content or "") and "</think>" not in (message.content or "")


def test_thinking_off_per_request(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="thinker", temperature=0,
                                            messages=[{"role": "user", "content": "你好，你是谁？"}],
                                            extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    message = answer.choices[0].message
    assert "思考者" in (message.content or "")
    assert not (message.model_extra or {}).get("reasoning_content")


def test_reasoning_streams(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="thinker", temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": "你好，你是谁？"}]))
    reasoning = [c.choices[0].delta.model_extra.get("reasoning_content") for c in chunks
                 if c.choices and c.choices[0].delta.model_extra]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([r for r in reasoning if r]) >= 2  # arrives in pieces, not at the end
    assert "思考者" in content and "<think>" not in content


def test_tool_calls(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="thinker", temperature=0, messages=ASK_WEATHER,
                                            tools=WEATHER_TOOLS)  # type: ignore[arg-type]
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "北京"}
    assert not choice.message.content


def test_tool_calls_stream(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="thinker", temperature=0, messages=ASK_WEATHER,
                                                 tools=WEATHER_TOOLS, stream=True))  # type: ignore[arg-type]
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function is not None and calls[0].function.name == "get_weather"
    arguments = "".join(tc.function.arguments or "" for tc in calls if tc.function)
    assert json.loads(arguments) == {"city": "北京"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert "<tool_call>" not in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_tool_choice_none_suppresses_calls(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="thinker", temperature=0, messages=ASK_WEATHER,
                                            tools=WEATHER_TOOLS, tool_choice="none")  # type: ignore[arg-type]
    assert answer.choices[0].finish_reason == "stop"
    assert not answer.choices[0].message.tool_calls


def test_tool_result_cycle(client: openai.OpenAI) -> None:
    messages = [
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_0", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "北京"}'},
        }]},
        {"role": "tool", "tool_call_id": "call_0", "content": "晴，25°C"},
    ]
    answer = client.chat.completions.create(model="thinker", temperature=0, messages=messages,  # type: ignore[arg-type]
                                            tools=WEATHER_TOOLS)  # type: ignore[arg-type]
    assert "25°C" in (answer.choices[0].message.content or "")
    assert answer.choices[0].finish_reason == "stop"


def test_render_endpoint_tokenizes_segment_by_segment(demo_server: str, demo_models: object) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_models.base_dir)  # type: ignore[attr-defined]
    body = {"model": "thinker", "messages": [{"role": "user", "content": "你好，你是谁？"}],
            "chat_template_kwargs": {"enable_thinking": False}}
    rendered = httpx.post(f"{demo_server}/v1/chat/render", json=body, timeout=30).json()
    # LLaMA-Factory's elements for qwen3 with thinking off, written out by hand; each is tokenized on its own.
    segments = ["<|im_start|>user\n你好，你是谁？<|im_end|>\n<|im_start|>assistant\n", "<think>\n\n</think>\n\n"]
    assert rendered["prompt"] == "".join(segments)
    expected = [i for s in segments for i in tokenizer.encode(s, add_special_tokens=False)]
    assert rendered["token_ids"] == expected
    assert rendered["template"] == "qwen3" and "training_args.yaml" in rendered["template_source"]
    assert rendered["stop"] == ["<|im_end|>"]
    pku = httpx.post(f"{demo_server}/v1/chat/render", json={**body, "model": "pku-assistant"}, timeout=30).json()
    assert pku["template"] == "qwen" and pku["prompt"].startswith("<|im_start|>system\nYou are Qwen")
