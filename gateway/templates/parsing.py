"""Reading a model's output back: thoughts into ``reasoning_content``, tool-call text into ``tool_calls``.

Parsers are incremental: ``feed`` takes each new piece of text as it is generated and returns what can be shown now;
``finish`` flushes the rest. Text that might still turn into a marker is held back until it is decided.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from gateway.templates.tool_formats import FunctionCall, ToolFormat


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ParsedDelta:
    content: str = ""
    reasoning_content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning_content or self.tool_calls)


def new_tool_call(call: FunctionCall) -> ToolCall:
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=call.name, arguments=call.arguments)


def _held_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class OutputParser:
    """Splits output into reasoning (inside the thought words) and content; collects tool calls when tools are on.

    Reasoning is recognised only at the start of the output, where reasoning templates put it. With tools enabled
    the content is held until the end, then read with the template's tool format; if it holds calls they become
    ``tool_calls`` and any text before them stays content.
    """

    def __init__(
        self,
        *,
        thought_words: tuple[str, str] | None = None,
        tool_format: ToolFormat | None = None,
    ) -> None:
        self._thought = (thought_words[0].strip(), thought_words[1].strip()) if thought_words else None
        self._tools = tool_format
        self._state = "start" if self._thought else "content"
        self._pending = ""
        self._content = ""  # all content so far (kept for tool extraction)

    def feed(self, text: str) -> ParsedDelta:
        self._pending += text
        reasoning, content = "", ""
        while self._pending:
            if self._state == "start":
                assert self._thought is not None
                stripped = self._pending.lstrip()
                if not stripped:
                    break
                if stripped.startswith(self._thought[0]):
                    self._pending = stripped[len(self._thought[0]) :].lstrip("\n")
                    self._state = "reasoning"
                    continue
                if self._thought[0].startswith(stripped):
                    break  # could still be the start of a thought
                self._state = "content"
            elif self._state == "reasoning":
                assert self._thought is not None
                end = self._pending.find(self._thought[1])
                if end >= 0:
                    reasoning += self._pending[:end].rstrip("\n")
                    self._pending = self._pending[end + len(self._thought[1]) :].lstrip("\n")
                    self._state = "content"
                    continue
                held = _held_suffix(self._pending.rstrip("\n"), self._thought[1])
                trailing_newlines = len(self._pending) - len(self._pending.rstrip("\n"))
                keep = held + trailing_newlines
                reasoning += self._pending[: len(self._pending) - keep]
                self._pending = self._pending[len(self._pending) - keep :]
                break
            else:
                content += self._pending
                self._pending = ""
        self._content += content
        if self._tools is not None:
            return ParsedDelta(reasoning_content=reasoning)
        return ParsedDelta(content=content, reasoning_content=reasoning)

    def finish(self) -> ParsedDelta:
        reasoning = ""
        if self._state == "reasoning":
            reasoning, self._pending = self._pending, ""
        else:
            self._content += self._pending
            flushed = self._pending
            self._pending = ""
            if self._tools is None:
                return ParsedDelta(content=flushed)
        if self._tools is None:
            return ParsedDelta(reasoning_content=reasoning)
        calls = self._tools.extract(self._content)
        if not calls:
            return ParsedDelta(content=self._content, reasoning_content=reasoning)
        return ParsedDelta(reasoning_content=reasoning, tool_calls=tuple(new_tool_call(c) for c in calls))
