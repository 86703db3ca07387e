"""Render a conversation with a template spec exactly as LLaMA-Factory encodes it for generation.

LLaMA-Factory builds a list of *elements* per message and tokenizes each element on its own
(``add_special_tokens=False``); special elements are single token ids. We keep that list as ``Segment``s, so the
prompt text and the prompt token ids both come out exactly as in training.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from gateway.errors import InvalidRequest
from gateway.templates.conversation import Conversation, Turn
from gateway.templates.spec import Slot, TemplateSpec
from gateway.templates.tool_formats import FunctionCall, tool_format


@dataclass(frozen=True)
class Segment:
    kind: Literal["text", "special"]
    text: str


@dataclass(frozen=True)
class Rendering:
    segments: tuple[Segment, ...]
    stop: tuple[str, ...]

    @property
    def prompt(self) -> str:
        return "".join(segment.text for segment in self.segments)


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def convert_tokens_to_ids(self, tokens: str) -> int: ...


def encode_segments(tokenizer: Tokenizer, segments: Sequence[Segment]) -> list[int]:
    """Token ids of a rendering, segment by segment, as LLaMA-Factory tokenizes training data."""
    ids: list[int] = []
    for segment in segments:
        if segment.kind == "special":
            ids.append(tokenizer.convert_tokens_to_ids(segment.text))
        else:
            ids.extend(tokenizer.encode(segment.text, add_special_tokens=False))
    return ids

Element = Slot  # a formatter's output item: a filled string, or a special / token slot


def _apply(slots: Sequence[Slot], **values: str) -> list[Element]:
    """One formatter's elements. Placeholders are replaced in keyword order, first occurrence only (LLaMA-Factory's
    ``StringFormatter``): a value's own ``{{...}}`` text is never evaluated, though a later placeholder name that
    appears inside an earlier value is replaced there, as in training."""
    elements: list[Element] = []
    for slot in slots:
        if isinstance(slot, str):
            for name, value in values.items():
                slot = slot.replace("{{" + name + "}}", value, 1)
        elements.append(slot)
    return elements


def _segments(elements: Sequence[Element], bos: str | None, eos: str | None) -> list[Segment]:
    """Elements as LLaMA-Factory tokenizes them: empty strings dropped, a missing bos/eos leaves nothing."""
    segments = []
    for element in elements:
        if isinstance(element, str):
            if element:
                segments.append(Segment("text", element))
        elif "token" in element:
            segments.append(Segment("special", element["token"]))
        else:
            token = {"bos_token": bos, "eos_token": eos}.get(element["special"])
            if token is not None:
                segments.append(Segment("special", token))
    return segments


def _pattern(words: tuple[str, str]) -> re.Pattern[str]:
    return re.compile(f"{re.escape(words[0])}(.*?){re.escape(words[1])}", re.DOTALL)


def remove_thought(spec: TemplateSpec, content: str) -> str:
    """``content`` without its thought blocks (and the newlines after them), as history turns are trained."""
    return _pattern(spec.thought_words).sub("", content).lstrip("\n")


def empty_thought(spec: TemplateSpec) -> str:
    """The empty thought block a reasoning template puts after the prompt when thinking is off."""
    if spec.template_class == "reasoning_glm47":
        return spec.thought_words[1]
    return spec.thought_words[0] + spec.thought_words[1]


def _calls(json_text: str) -> list[FunctionCall]:
    try:
        parsed: Any = json.loads(json_text)
    except json.JSONDecodeError:
        raise InvalidRequest("an assistant tool call is not valid JSON", param="messages") from None
    parsed = parsed if isinstance(parsed, list) else [parsed]
    return [FunctionCall(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in parsed]


def function_text(spec: TemplateSpec, content: str, *, with_words: bool = True) -> str:
    """LLaMA-Factory's ``FunctionFormatter`` content: the JSON calls of a function turn written in the template's
    tool format. Text around calls wrapped in tool-call words, or a leading thought, is kept in front of them."""
    fmt = tool_format(spec.function_tool_format)
    if not with_words:
        return fmt.calls_text(_calls(content))
    match = _pattern(spec.tool_call_words).search(content)
    if match is not None:
        return content.replace(match.group(0), "") + fmt.calls_text(_calls(match.group(1)))
    thought = _pattern(spec.thought_words).search(content)
    if thought is not None:
        return thought.group(0) + fmt.calls_text(_calls(content.replace(thought.group(0), "")))
    return fmt.calls_text(_calls(content))


def _tools_text(spec: TemplateSpec, tools: Sequence[dict[str, Any]]) -> str:
    tools_json = json.dumps(list(tools), ensure_ascii=False)
    if spec.tools_slots is not None:
        first = _apply(spec.tools_slots, content=tools_json)[0]
        return first if isinstance(first, str) else ""
    assert spec.tool_format is not None
    return tool_format(spec.tool_format).tools_text(json.loads(tools_json))


def _turn_elements(spec: TemplateSpec, turn: Turn, index: int, fused_system: str | None) -> list[Element]:
    llama2 = spec.template_class == "llama2"
    if turn.role == "user":
        if llama2:
            return _apply(spec.format_user, content=(fused_system or "") + turn.content)
        return _apply(spec.format_user, content=turn.content, idx=str(index // 2))
    if turn.role == "assistant":
        return _apply(spec.format_assistant, content=turn.content)
    if turn.role == "observation":
        return _apply(spec.format_observation, content=turn.content)
    return _apply(spec.format_function, content=function_text(spec, turn.content, with_words=not llama2))


def render(
    spec: TemplateSpec,
    conversation: Conversation,
    *,
    enable_thinking: bool | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> Rendering:
    """The generation prompt for ``conversation``: after a final user or observation turn, the assistant prefix; after
    a final assistant turn (``conversation.continues_final``), that answer's text with nothing after it.

    ``bos_token`` / ``eos_token`` are the tokenizer's; ``None`` means the tokenizer has none (LLaMA-Factory then
    adds ``<|endoftext|>`` as eos). With ``replace_eos`` the eos is the template's first stop word.
    ``enable_thinking=None`` takes the template's default; it matters only for reasoning templates.
    """
    eos = spec.eos_token(eos_token)
    thinking = spec.enable_thinking if enable_thinking is None else enable_thinking
    turns = list(conversation.turns)
    partial = turns.pop().content if conversation.continues_final else None
    if spec.reasoning:
        # History answers lose their thoughts (LLaMA-Factory's default preserve_thinking=False).
        turns = [replace(t, content=remove_thought(spec, t.content)) if i % 2 == 1 else t for i, t in enumerate(turns)]

    system = conversation.system or spec.default_system
    elements: list[Element] = []
    for index, turn in enumerate(turns):
        fused_system = None
        if index == 0:
            elements += _apply(spec.format_prefix)
            if system or conversation.tools:
                tools_text = _tools_text(spec, conversation.tools) if conversation.tools else ""
                system_elements = _apply(spec.format_system, content=system + tools_text)
                if spec.template_class == "llama2":
                    # Fused into the first user message; dropped when the conversation opens with a tool result.
                    first = system_elements[0]
                    fused_system = first if isinstance(first, str) else ""
                else:
                    elements += system_elements
        elements += _turn_elements(spec, turn, index, fused_system)

    segments = _segments(elements, bos_token, eos)
    opens, closes = (word.strip() for word in spec.thought_words)
    if spec.reasoning and not thinking and opens and closes:
        segments.append(Segment("text", empty_thought(spec)))
    if partial:
        segments.append(Segment("text", partial))  # continued as it stands: no end-of-turn, no new header
    return Rendering(segments=tuple(segments), stop=spec.stop(eos_token))


def render_response(
    spec: TemplateSpec, turn: Turn, *, bos_token: str | None = None, eos_token: str | None = None
) -> tuple[Segment, ...]:
    """The elements of an answer as LLaMA-Factory trains on it: the assistant formatter applied to an
    ``assistant`` turn, or the function formatter to a ``function`` turn (content: JSON list of calls).

    Together with ``render`` for the prompt this gives a training pair. Reasoning templates' thought handling (the
    empty think block LLaMA-Factory puts in front of a thought-less answer when thinking is on) is the caller's.
    """
    if turn.role not in ("assistant", "function"):
        raise ValueError(f"an answer is an assistant or function turn, not {turn.role!r}")
    return tuple(_segments(_turn_elements(spec, turn, 1, None), bos_token, spec.eos_token(eos_token)))
