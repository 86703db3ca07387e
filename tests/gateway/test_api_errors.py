"""Bad input gets an OpenAI error body with the right status, and the server keeps serving."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

OK_MESSAGES = [{"role": "user", "content": "你好，你是谁？"}]


def post(url: str, body: Any, path: str = "/v1/chat/completions") -> httpx.Response:
    if isinstance(body, str):
        return httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    return httpx.post(url + path, json=body, timeout=30)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"model": "pku-assistant", "messages": [', None),  # malformed JSON
        ({"model": "pku-assistant", "messages": "hello"}, "messages"),  # wrong type
        ({"model": "pku-assistant", "messages": OK_MESSAGES, "temperature": "hot"}, "temperature"),
        ({"model": "pku-assistant", "messages": []}, "messages"),
        ({"model": "pku-assistant", "messages": [{"role": "wizard", "content": "x"}]}, None),
        ({"model": "pku-assistant", "messages": OK_MESSAGES, "n": 0}, "n"),
        ({"model": "pku-assistant", "messages": OK_MESSAGES, "max_tokens": -5}, "max_tokens"),
        ({"model": "pku-assistant", "messages": OK_MESSAGES, "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"messages": OK_MESSAGES}, "model"),
        ({"model": "pku-assistant", "messages": [{"role": "assistant", "content": "hi"}]}, None),
    ],
)
def test_bad_requests_get_400(demo_server: str, body: Any, param: str | None) -> None:
    error = assert_error(post(demo_server, body), 400, param)
    assert error["type"] == "invalid_request_error"


def test_unknown_model_is_404(demo_server: str) -> None:
    error = assert_error(post(demo_server, {"model": "no-such-adapter", "messages": OK_MESSAGES}), 404, "model")
    assert error["code"] == "model_not_found"
    assert "no-such-adapter" in error["message"]
    assert_error(post(demo_server, {"model": "nope", "prompt": "x"}, "/v1/completions"), 404, "model")


def test_prompt_longer_than_context_is_400(demo_server: str) -> None:
    long_text = "北京大学" * 3000
    error = assert_error(post(demo_server, {"model": "pku-assistant",
                                            "messages": [{"role": "user", "content": long_text}]}), 400)
    assert "context length" in error["message"]
    assert error["code"] == "context_length_exceeded"


def test_sdk_raises_typed_errors(demo_server: str) -> None:
    client = openai.OpenAI(base_url=f"{demo_server}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=OK_MESSAGES)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="pku-assistant", messages=OK_MESSAGES, n=0)  # type: ignore[arg-type]


def test_server_keeps_serving_after_errors(demo_server: str) -> None:
    for _ in range(3):
        post(demo_server, "{not json")
        post(demo_server, {"model": "x", "messages": OK_MESSAGES})
    assert httpx.get(f"{demo_server}/health", timeout=5).status_code == 200
    answer = post(demo_server, {"model": "pku-assistant", "messages": OK_MESSAGES, "temperature": 0})
    assert answer.status_code == 200 and "北大" in answer.json()["choices"][0]["message"]["content"]


def test_unknown_route_is_an_openai_error(demo_server: str) -> None:
    assert_error(httpx.get(f"{demo_server}/v1/nothing-here", timeout=5), 404)
