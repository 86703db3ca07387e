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


def _fill(slots: Sequence[Slot], bos: str | None, eos: str | None, **values: str) -> list[Segment]:
    """One formatter's elements. Placeholders are replaced in keyword order, first occurrence only (LLaMA-Factory's
    ``StringFormatter``), so text inside a value is never interpreted as template syntax by us."""
    segments = []
    for slot in slots:
        if isinstance(slot, str):
            for name, value in values.items():
                slot = slot.replace("{{" + name + "}}", value, 1)
            if slot:
                segments.append(Segment("text", slot))
        elif "token" in slot:
            segments.append(Segment("special", slot["token"]))
        else:
            token = bos if slot["special"] == "bos_token" else eos
            if token is not None:
                segments.append(Segment("special", token))
    return segments


def remove_thought(spec: TemplateSpec, content: str) -> str:
    start, end = (re.escape(word) for word in spec.thought_words)
    return re.sub(f"{start}(.*?){end}", "", content, flags=re.DOTALL).lstrip("\n")


def empty_thought(spec: TemplateSpec) -> str:
    if spec.template_class == "reasoning_glm47":
        return spec.thought_words[1]
    return spec.thought_words[0] + spec.thought_words[1]


def _function_text(spec: TemplateSpec, content: str) -> str:
    """LLaMA-Factory's ``FunctionFormatter``: thought text kept in front, the JSON calls written in the tool format."""

    def calls(json_text: str) -> list[FunctionCall]:
        parsed: Any = json.loads(json_text)
        parsed = parsed if isinstance(parsed, list) else [parsed]
        return [FunctionCall(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in parsed]

    fmt = tool_format(spec.tool_format)
    start, end = (re.escape(word) for word in spec.tool_call_words)
    match = re.search(f"{start}(.*?){end}", content, flags=re.DOTALL)
    if match is not None:
        return content.replace(match.group(0), "") + fmt.calls_text(calls(match.group(1)))
    t_start, t_end = (re.escape(word) for word in spec.thought_words)
    thought = re.search(f"{t_start}(.*?){t_end}", content, flags=re.DOTALL)
    if thought is not None:
        return thought.group(0) + fmt.calls_text(calls(content.replace(thought.group(0), "")))
    return fmt.calls_text(calls(content))


def _turn(spec: TemplateSpec, turn: Turn, index: int, bos: str | None, eos: str | None) -> list[Segment]:
    if turn.role == "user":
        return _fill(spec.format_user, bos, eos, content=turn.content, idx=str(index // 2))
    if turn.role == "assistant":
        return _fill(spec.format_assistant, bos, eos, content=turn.content)
    if turn.role == "observation":
        return _fill(spec.format_observation, bos, eos, content=turn.content)
    return _fill(spec.format_function, bos, eos, content=_function_text(spec, turn.content))


def render(
    spec: TemplateSpec,
    conversation: Conversation,
    *,
    enable_thinking: bool | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> Rendering:
    """The generation prompt for ``conversation`` (which ends with a user or observation turn).

    ``bos_token`` / ``eos_token`` are the tokenizer's; ``None`` means the tokenizer has none. With ``replace_eos``
    the eos is the template's first stop word, as LLaMA-Factory sets it during training.
    """
    eos = spec.eos_token(eos_token)
    thinking = spec.enable_thinking if enable_thinking is None else enable_thinking
    turns = list(conversation.turns)
    if spec.reasoning:
        # History answers lose their thoughts (LLaMA-Factory trains with preserve_thinking off).
        turns = [replace(t, content=remove_thought(spec, t.content)) if i % 2 == 1 else t for i, t in enumerate(turns)]

    system = conversation.system or spec.default_system
    tools_json = json.dumps(list(conversation.tools), ensure_ascii=False) if conversation.tools else None
    system_text = system
    if tools_json is not None:
        system_text = system + tool_format(spec.tool_format).tools_text(json.loads(tools_json))

    segments: list[Segment] = []
    for index, turn in enumerate(turns):
        if index == 0:
            segments += _fill(spec.format_prefix, bos_token, eos)
            if spec.template_class == "llama2":
                # The system text is fused into the first user message (and dropped if that is a tool result).
                if turn.role == "user":
                    fused = _fill(spec.format_system[:1], bos_token, eos, content=system_text) if system or tools_json else []
                    content = (fused[0].text if fused else "") + turn.content
                    segments += _fill(spec.format_user, bos_token, eos, content=content)
                else:
                    segments += _turn(spec, turn, index, bos_token, eos)
                continue
            if system or tools_json:
                segments += _fill(spec.format_system, bos_token, eos, content=system_text)
        segments += _turn(spec, turn, index, bos_token, eos)

    if spec.reasoning and not thinking:
        segments.append(Segment("text", empty_thought(spec)))
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
    return tuple(_turn(spec, turn, 1, bos_token, spec.eos_token(eos_token)))
