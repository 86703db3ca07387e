"""OpenAI chat messages → the turns LLaMA-Factory trains on.

The mapping is LLaMA-Factory's API server's: a leading system (or developer) message becomes the system prompt;
the rest must alternate user/tool with assistant; an assistant message with ``tool_calls`` becomes a *function*
turn whose content is a JSON list of ``{"name", "arguments"}`` with ``arguments`` as a JSON object (as in training
data); a ``tool`` message becomes an *observation* turn. Content given as parts keeps its text parts, concatenated
(a system message keeps only its first part, as LLaMA-Factory's server does).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gateway.errors import InvalidRequest

Role = Literal["user", "assistant", "observation", "function"]

_TURN_ROLES = {"user": "user", "tool": "observation", "assistant": "assistant", "function": "function"}


@dataclass(frozen=True)
class Turn:
    role: Role
    content: str


@dataclass(frozen=True)
class Conversation:
    system: str | None
    turns: tuple[Turn, ...]
    tools: tuple[dict[str, Any], ...]  # function definitions: {"name", "description"?, "parameters"?}


def _text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                texts.append(str(part.get("text", "")))
            else:
                raise InvalidRequest(
                    f"messages[{index}].content: only text parts are supported, got {kind!r}",
                    param=f"messages[{index}].content",
                )
        return "".join(texts)
    raise InvalidRequest(f"messages[{index}].content must be a string or a list of parts", param="messages")


def _function_content(tool_calls: Sequence[Mapping[str, Any]], index: int) -> str:
    calls = []
    for call in tool_calls:
        function = call.get("function") or {}
        name = function.get("name")
        if not isinstance(name, str):
            raise InvalidRequest(f"messages[{index}].tool_calls: each call needs function.name", param="messages")
        arguments: Any = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass  # kept as a string, as LLaMA-Factory would keep a non-JSON argument text
        calls.append({"name": name, "arguments": arguments})
    return json.dumps(calls, ensure_ascii=False)


def _tool_definition(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = tool.get("function", tool) if tool.get("type", "function") == "function" else tool
    # LLaMA-Factory's FunctionDefinition field order, unset fields left out.
    return {key: function[key] for key in ("name", "description", "parameters") if key in function}


def to_conversation(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
) -> Conversation:
    """Map OpenAI ``messages`` (+ ``tools``) to a conversation; raise ``InvalidRequest`` where training never went."""
    if not messages:
        raise InvalidRequest("messages must contain at least one message", param="messages")
    system: str | None = None
    rest = list(enumerate(messages))
    if messages[0].get("role") in ("system", "developer"):
        content = messages[0].get("content")
        # LLaMA-Factory's API server keeps only the first part of a system message given as parts.
        system = _text(content[:1] if isinstance(content, list) else content, 0)
        rest = rest[1:]
    if not rest:
        raise InvalidRequest("messages must contain a user message after the system message", param="messages")

    turns: list[Turn] = []
    for position, (index, message) in enumerate(rest):
        role = message.get("role")
        expected = ("user", "tool") if position % 2 == 0 else ("assistant", "function")
        if role not in expected:
            raise InvalidRequest(
                f"messages[{index}] has role {role!r}; the conversation must alternate user (or tool) and "
                "assistant messages, after an optional first system message, and end with a user or tool message",
                param=f"messages[{index}].role",
            )
        tool_calls = message.get("tool_calls")
        if role == "assistant" and tool_calls:
            turns.append(Turn("function", _function_content(tool_calls, index)))
        else:
            turns.append(Turn(_TURN_ROLES[role], _text(message.get("content"), index)))  # type: ignore[arg-type]
    if len(turns) % 2 == 0:
        raise InvalidRequest("the last message must be a user or tool message", param="messages")
    return Conversation(system=system, turns=tuple(turns), tools=tuple(_tool_definition(t) for t in tools or ()))
