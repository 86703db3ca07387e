"""The tool-format contract and the pieces formats share."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class FunctionCall:
    name: str
    arguments: str  # JSON text


class ToolFormat(Protocol):
    def tools_text(self, tools: Sequence[dict[str, Any]]) -> str:
        """The text appended to the system prompt for these function definitions."""
        ...

    def calls_text(self, calls: Sequence[FunctionCall]) -> str:
        """An assistant turn that makes these calls, as the model was trained to write it."""
        ...

    def extract(self, text: str) -> list[FunctionCall] | None:
        """The calls in a model's output, or ``None`` when it holds none (then it is plain content)."""
        ...

    def call_start(self, text: str) -> int:
        """Where a call may begin in ``text`` (the output so far): text before it is content whatever comes next.

        ``len(text)`` when no call can start in it. The value never decreases as ``text`` grows.
        """
        ...


def function_of(tool: dict[str, Any]) -> dict[str, Any]:
    """The function definition inside an OpenAI ``{"type": "function", "function": ...}`` wrapper."""
    return tool.get("function", "") if tool.get("type") == "function" else tool


def wrapped(tool: dict[str, Any]) -> dict[str, Any]:
    """A function definition in the OpenAI ``{"type": "function", "function": ...}`` wrapper."""
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(value, ensure_ascii=False, **kwargs)


def arguments_of(call: FunctionCall) -> Any:
    return json.loads(call.arguments)


def value_text(value: Any) -> str:
    """A parameter value as markup formats write it: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else dumps(value)


def partial_marker_at(text: str, marker: str) -> int:
    """Where the longest suffix of ``text`` that is a proper prefix of ``marker`` starts (``len(text)`` if none)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return len(text) - size
    return len(text)


class MarkerStart:
    """``call_start`` for formats whose calls open with a marker that may appear anywhere in the output."""

    markers: tuple[str, ...] = ()

    def call_start(self, text: str) -> int:
        found = [index for index in (text.find(marker) for marker in self.markers) if index >= 0]
        if found:
            return min(found)
        return min(partial_marker_at(text, marker) for marker in self.markers)


class WholeOutputStart:
    """``call_start`` for formats whose calls are the whole output (a JSON value): hold from the start if it may be."""

    openers: tuple[str, ...] = ("{", "[")

    def call_start(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped:
            return 0
        if any(stripped.startswith(o) or o.startswith(stripped) for o in self.openers):
            return 0
        return len(text)
