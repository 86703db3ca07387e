"""OpenAI chat messages → the turns LLaMA-Factory trains on.

The mapping starts from LLaMA-Factory's API server's and serves what real clients send:

- ``developer`` is ``system``, wherever it appears. Every system message, first or not, goes into the one system
  slot the templates have: their texts joined with a blank line (``"\\n\\n"``), in order.
- ``content`` may be a string or a list of text parts (joined as they are, in order) on every role. Any other part
  (``image_url``, ``input_audio``, ``file``…) is refused: 400 with ``code: unsupported_content_type`` and ``param``
  naming the message and part.
- Consecutive messages of the same role are one turn: contents joined with ``"\\n\\n"`` (Open WebUI sends two user
  messages in a row after a failed answer). A run of tool results becomes one observation turn the same way; a run
  of assistant messages with ``tool_calls`` becomes one function turn with all their calls, in order.
- After the merge the turns must alternate user (or tool) with assistant, starting with a user or tool turn.
- An assistant message with ``tool_calls`` becomes a *function* turn whose content is a JSON list of
  ``{"name", "arguments"}`` with ``arguments`` as a JSON object (as in training data); a ``tool`` message becomes an
  *observation* turn.
- A conversation that ends with a plain assistant message is *continued*: the prompt ends with that message's text,
  with no end-of-turn after it and no new assistant header (vLLM's ``continue_final_message``).
- ``name`` has no slot in LLaMA-Factory's templates: refused on user, system and assistant messages (400 naming
  ``messages[i].name``); on a ``tool`` message it is the function's name, already implied by the call, and is not
  rendered (as ``tool_call_id`` is not).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gateway.errors import InvalidRequest

Role = Literal["user", "assistant", "observation", "function"]

_TURN_ROLES = {"user": "user", "tool": "observation", "assistant": "assistant"}
_USER_SIDE = ("user", "tool")
MERGE_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Turn:
    role: Role
    content: str


@dataclass(frozen=True)
class Conversation:
    system: str | None
    turns: tuple[Turn, ...]
    tools: tuple[dict[str, Any], ...]  # function definitions: {"name", "description"?, "parameters"?}

    @property
    def continues_final(self) -> bool:
        """The last turn is an assistant answer to continue (the prompt ends inside it)."""
        return bool(self.turns) and self.turns[-1].role == "assistant"


def message_text(content: Any, index: int) -> str:
    """The text of a message's ``content``: a string, ``None`` (empty) or a list of text parts joined in order."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for position, part in enumerate(content):
            if isinstance(part, Mapping) and part.get("type") == "text":
                texts.append(str(part.get("text") or ""))
                continue
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise InvalidRequest(
                f"messages[{index}].content[{position}] is a {kind!r} part; this model takes text only "
                "(content as a string or a list of text parts)",
                param=f"messages[{index}].content[{position}]",
                code="unsupported_content_type",
            )
        return "".join(texts)
    raise InvalidRequest(f"messages[{index}].content must be a string or a list of parts",
                         param=f"messages[{index}].content")


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The messages with ``developer`` as ``system`` and every ``content`` as a string (non-text parts refused).

    What a model's own Jinja template receives; the slot templates go on to ``to_conversation``."""
    normalized = []
    for index, message in enumerate(messages):
        item = dict(message)
        if item.get("role") == "developer":
            item["role"] = "system"
        if "content" in item:
            item["content"] = message_text(item["content"], index)
        normalized.append(item)
    return normalized


def _function_calls(tool_calls: Sequence[Mapping[str, Any]], index: int) -> list[dict[str, Any]]:
    calls = []
    for call in tool_calls:
        function = call.get("function") or {}
        name = function.get("name")
        if not isinstance(name, str):
            raise InvalidRequest(f"messages[{index}].tool_calls: each call needs function.name",
                                 param=f"messages[{index}].tool_calls")
        arguments: Any = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass  # kept as a string, as LLaMA-Factory would keep a non-JSON argument text
        calls.append({"name": name, "arguments": arguments})
    return calls


def _tool_definition(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = tool.get("function", tool) if tool.get("type", "function") == "function" else tool
    # LLaMA-Factory's FunctionDefinition field order, unset fields left out.
    return {key: function[key] for key in ("name", "description", "parameters") if key in function}


@dataclass
class _Run:
    """Consecutive messages of one role, merged into one turn."""

    role: str
    first_index: int
    texts: list[str]
    calls: list[dict[str, Any]]

    def turn(self) -> Turn:
        if self.calls:
            return Turn("function", json.dumps(self.calls, ensure_ascii=False))
        return Turn(_TURN_ROLES[self.role], MERGE_SEPARATOR.join(self.texts))  # type: ignore[arg-type]


def _runs(messages: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[_Run]]:
    systems: list[str] = []
    runs: list[_Run] = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise InvalidRequest(f"messages[{index}] has an unknown role {role!r}", param=f"messages[{index}].role")
        if message.get("name") is not None and role != "tool":
            raise InvalidRequest(
                f"messages[{index}].name: this model's chat template has no place for participant names; "
                "leave `name` out (or put it in the content)",
                param=f"messages[{index}].name",
                code="unsupported_field",
            )
        text = message_text(message.get("content"), index)
        if role == "system":
            systems.append(text)
            continue
        tool_calls = message.get("tool_calls") if role == "assistant" else None
        if runs and runs[-1].role == role:
            run = runs[-1]
        else:
            run = _Run(role, index, [], [])
            runs.append(run)
        if tool_calls:
            run.calls += _function_calls(tool_calls, index)  # the text beside calls is not trained: not rendered
        else:
            run.texts.append(text)
    return systems, runs


def to_conversation(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
) -> Conversation:
    """Map OpenAI ``messages`` (+ ``tools``) to a conversation; raise ``InvalidRequest`` where training never went."""
    if not messages:
        raise InvalidRequest("messages must contain at least one message", param="messages")
    systems, runs = _runs(messages)
    if not runs:
        raise InvalidRequest("messages must contain a user message besides the system messages", param="messages")
    for position, run in enumerate(runs):
        expected = _USER_SIDE if position % 2 == 0 else ("assistant",)
        if run.role not in expected:
            raise InvalidRequest(
                f"messages[{run.first_index}] has role {run.role!r}; the conversation must alternate user (or tool) "
                "and assistant messages (consecutive messages of one role are merged), starting with a user message",
                param=f"messages[{run.first_index}].role",
            )
    if runs[-1].role == "assistant" and runs[-1].calls:
        raise InvalidRequest(
            "the last message is an assistant tool call: send the tool results (role `tool`) after it",
            param=f"messages[{runs[-1].first_index}]",
        )
    system = MERGE_SEPARATOR.join(text for text in systems if text) or None  # empty: the template's default
    return Conversation(system=system, turns=tuple(run.turn() for run in runs),
                        tools=tuple(_tool_definition(t) for t in tools or ()))
