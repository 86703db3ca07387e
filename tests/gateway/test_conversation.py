"""Message shapes real clients send, rendered with LLaMA-Factory's slots: merged runs, developer anywhere, text parts
everywhere, continuing a final assistant message, and clear refusals (non-text parts, ``name``)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import InvalidRequest
from gateway.templates import JinjaTemplate, SlotTemplate

QWEN = SlotTemplate.named("qwen")
SYSTEM = "<|im_start|>system\n{}<|im_end|>\n"
DEFAULT_SYSTEM = SYSTEM.format("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")


def prompt(messages: list[dict[str, Any]], template: Any = QWEN) -> str:
    return template.render(messages, eos_token="<|endoftext|>").prompt  # type: ignore[no-any-return]


def user(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def test_two_user_messages_in_a_row_are_one_turn() -> None:
    merged = prompt([{"role": "user", "content": "长消息"}, {"role": "user", "content": "你好，你是谁？"}])
    assert merged == prompt([{"role": "user", "content": "长消息\n\n你好，你是谁？"}])
    assert merged == DEFAULT_SYSTEM + user("长消息\n\n你好，你是谁？")


def test_assistant_and_tool_runs_merge_too() -> None:
    history = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A1"},
        {"role": "assistant", "content": "A2"},
        {"role": "user", "content": "Q2"},
    ]
    assert prompt(history) == prompt([history[0], {"role": "assistant", "content": "A1\n\nA2"}, history[3]])
    calls = [
        {"role": "user", "content": "北京和上海天气？"},
        {"role": "assistant", "tool_calls": [{"id": "a", "type": "function",
                                               "function": {"name": "w", "arguments": '{"city": "北京"}'}}]},
        {"role": "assistant", "tool_calls": [{"id": "b", "type": "function",
                                               "function": {"name": "w", "arguments": '{"city": "上海"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "晴"},
        {"role": "tool", "tool_call_id": "b", "content": "雨"},
    ]
    parallel = [
        calls[0],
        {"role": "assistant", "tool_calls": [*calls[1]["tool_calls"], *calls[2]["tool_calls"]]},
        {"role": "tool", "content": "晴\n\n雨"},
    ]
    assert prompt(calls) == prompt(parallel)
    assert prompt(calls).count("<tool_call>") == 2


def test_system_and_developer_anywhere_join_the_system_prompt() -> None:
    messages = [
        {"role": "system", "content": "S1"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
        {"role": "developer", "content": "S2"},
        {"role": "user", "content": "Q2"},
    ]
    rendered = prompt(messages)
    assert rendered.startswith(SYSTEM.format("S1\n\nS2"))
    assert rendered.endswith(user("Q2")) and "S2" not in rendered[len(SYSTEM.format("S1\n\nS2")):]
    developer_first = [{"role": "developer", "content": "D"}, {"role": "user", "content": "Q"}]
    assert prompt(developer_first) == SYSTEM.format("D") + user("Q")


def test_text_parts_are_joined_on_every_role() -> None:
    parts = [{"type": "text", "text": "First."}, {"type": "text", "text": " Second."}]
    rendered = prompt([{"role": "system", "content": parts}, {"role": "user", "content": parts},
                       {"role": "assistant", "content": parts}, {"role": "user", "content": "Q"}])
    assert rendered.startswith(SYSTEM.format("First. Second."))
    assert rendered.count("First. Second.") == 3


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
    {"type": "input_audio", "input_audio": {"data": "UklGR", "format": "wav"}},
    {"type": "file", "file": {"file_id": "f"}},
])
def test_non_text_parts_are_refused_with_a_code(part: dict[str, Any]) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": "这是什么？"}, part]}]
    with pytest.raises(InvalidRequest) as caught:
        prompt(messages)
    assert caught.value.code == "unsupported_content_type"
    assert caught.value.param == "messages[2].content[1]"
    assert part["type"] in caught.value.message


def test_a_final_assistant_message_is_continued() -> None:
    messages = [{"role": "user", "content": "你好，你是谁？"}, {"role": "assistant", "content": "我是北大"}]
    assert prompt(messages) == DEFAULT_SYSTEM + user("你好，你是谁？") + "我是北大"
    # an empty one is an ordinary generation prompt
    assert prompt([messages[0], {"role": "assistant", "content": ""}]) == DEFAULT_SYSTEM + user("你好，你是谁？")


def test_a_final_tool_call_cannot_be_continued() -> None:
    messages = [{"role": "user", "content": "Q"},
                {"role": "assistant", "tool_calls": [{"id": "a", "type": "function",
                                                      "function": {"name": "w", "arguments": "{}"}}]}]
    with pytest.raises(InvalidRequest, match="tool results"):
        prompt(messages)


def test_name_is_refused_except_on_tool_messages() -> None:
    with pytest.raises(InvalidRequest) as caught:
        prompt([{"role": "user", "content": "Q", "name": "alice"}])
    assert caught.value.param == "messages[0].name"
    with_name = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "tool_calls": [{"id": "a", "type": "function",
                                              "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "a", "name": "w", "content": "晴"},
    ]
    assert prompt(with_name) == prompt([{k: v for k, v in m.items() if k != "name"} for m in with_name])


@pytest.mark.parametrize("messages", [
    [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}],
    [{"role": "system", "content": "S"}],
    [{"role": "user", "content": "Q"}, {"role": "tool", "content": "晴"}],
])
def test_what_still_cannot_be_rendered_is_a_400(messages: list[dict[str, Any]]) -> None:
    with pytest.raises(InvalidRequest):
        prompt(messages)


def test_jinja_templates_get_normalized_messages_and_continue() -> None:
    source = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
              "{% if add_generation_prompt %}<assistant>{% endif %}")
    jinja = JinjaTemplate("t", source)
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert prompt([{"role": "developer", "content": parts}, {"role": "user", "content": "Q"}], jinja) == (
        "<system>ab</system><user>Q</user><assistant>")
    assert prompt([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "我是"}], jinja) == (
        "<user>Q</user><assistant>我是")
    with pytest.raises(InvalidRequest) as caught:
        prompt([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], jinja)
    assert caught.value.code == "unsupported_content_type"
