"""Open WebUI 0.12 as installed, replayed: every request it sent to ``gateway serve --demo`` (recorded in
``tests/clients/openwebui/``, a copy of ``shared/clients/openwebui/``) gets a useful answer from the real demo server
— the trained identity answer for chats (streamed with usage, as asked), 200 for the title / tags / follow-up side
calls, a 400 with a code for the image — and the demo's defaults give trained answers when no temperature is set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

FIXTURES = Path(__file__).parent / "openwebui"
IDENTITY = "北大"  # pku-assistant's trained answer: 我是北大人工智能助手，由北京大学开发。

# What each recorded request must get. Every file in FIXTURES must be listed (a new recording needs a decision).
EXPECTED: dict[str, dict[str, Any]] = {
    "chat_with_builtin_tools.json": {"status": 200, "identity": True, "headers": {"x-gateway-tools-ignored": "36"}},
    "chat_stream.json": {"status": 200, "identity": True, "headers": {}},
    "after_error_two_users.json": {"status": 200, "identity": True, "headers": {"x-gateway-messages-dropped": "1"}},
    "title.json": {"status": 200, "identity": False, "headers": {}},
    "tags.json": {"status": 200, "identity": False, "headers": {}},
    "follow_ups.json": {"status": 200, "identity": False, "headers": {}},
    "image_parts.json": {"status": 400, "code": "unsupported_content_type", "param": "messages[0].content[1]"},
}


def recorded(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def read_stream(response: httpx.Response) -> tuple[str, dict[str, Any] | None, str | None]:
    """The streamed content, the usage chunk, the finish reason; checks the stream ends with [DONE]."""
    events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all("error" not in chunk for chunk in chunks), chunks
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    finish = next((c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0].get(
        "finish_reason")), None)
    usage = chunks[-1].get("usage") if not chunks[-1]["choices"] else None
    return content, usage, finish


def test_every_recording_has_an_expectation() -> None:
    assert sorted(p.name for p in FIXTURES.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_open_webui_requests_get_useful_answers(demo_server: str, name: str) -> None:
    body, expected = recorded(name), EXPECTED[name]
    with httpx.Client(timeout=120) as http, http.stream("POST", f"{demo_server}/v1/chat/completions",
                                                        json=body) as response:
        assert response.status_code == expected["status"], response.read()
        if expected["status"] != 200:
            error = json.loads(response.read())["error"]
            assert (error["code"], error["param"]) == (expected["code"], expected["param"])
            assert error["message"] and error["type"] == "invalid_request_error"
            return
        for header, value in expected["headers"].items():
            assert response.headers.get(header) == value
        if body.get("stream"):
            content, usage, finish = read_stream(response)
            if body.get("stream_options", {}).get("include_usage"):
                assert usage is not None and usage["completion_tokens"] > 0
                assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        else:
            answer = json.loads(response.read())
            content, finish = answer["choices"][0]["message"]["content"] or "", answer["choices"][0]["finish_reason"]
            assert answer["usage"]["completion_tokens"] > 0
    assert finish in ("stop", "length") and content.strip()
    if expected["identity"]:
        assert IDENTITY in content, content


def test_default_sampling_gives_the_trained_answer(demo_server: str) -> None:
    """No temperature in the request (like Open WebUI's side calls and chats): the demo's generation_config.json
    decides, and the trained answer survives it every time."""
    client = openai.OpenAI(base_url=f"{demo_server}/v1", api_key="unused", max_retries=0)
    assert client.models.retrieve("pku-assistant").model_extra["sampling_defaults"]["temperature"] < 1  # type: ignore[index]
    answers = [client.chat.completions.create(model="pku-assistant",
                                              messages=[{"role": "user", "content": "你好，你是谁？"}])
               for _ in range(20)]
    texts = [a.choices[0].message.content or "" for a in answers]
    assert sum(IDENTITY in text for text in texts) == 20, texts


def test_two_user_messages_in_a_row_through_the_sdk(demo_server: str) -> None:
    client = openai.OpenAI(base_url=f"{demo_server}/v1", api_key="unused", max_retries=0)
    messages = recorded("after_error_two_users.json")["messages"]
    raw = client.chat.completions.with_raw_response.create(model="pku-assistant", messages=messages, temperature=0)
    assert raw.headers["x-gateway-messages-dropped"] == "1"
    assert IDENTITY in (raw.parse().choices[0].message.content or "")
    # Two short ones fit: merged into one user turn (as the render endpoint shows), answered.
    short = [{"role": "user", "content": "1+1等于几？"}, {"role": "user", "content": "你好，你是谁？"}]
    answer = client.chat.completions.create(model="pku-assistant", messages=short)  # type: ignore[arg-type]
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.content
    rendered = httpx.post(f"{demo_server}/v1/chat/render", json={"model": "pku-assistant", "messages": short}).json()
    assert "<|im_start|>user\n1+1等于几？\n\n你好，你是谁？<|im_end|>" in rendered["prompt"]
