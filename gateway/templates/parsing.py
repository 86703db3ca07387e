"""Reading a model's output back: thoughts into ``reasoning_content``, tool-call text into ``tool_calls``.

Parsers are incremental: ``feed`` takes each new piece of text as it is generated and returns what can be shown
now; ``finish`` flushes the rest. Text that might still turn into a marker is held back until it is decided, so
feeding a text in any pieces gives the same result, joined, as feeding it whole.

    parser = OutputParser(thought_words=("<think>\\n", "\\n</think>\\n\\n"))
    parser.feed("<think>\\nhm\\n</thi")   # ParsedDelta(reasoning_content="hm")
    parser.feed("nk>\\n\\nHi")            # ParsedDelta(content="Hi")
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from gateway.templates.tool_formats import FunctionCall, ToolFormat
from gateway.templates.tool_formats.base import partial_marker_at


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True)
class ParsedDelta:
    content: str = ""
    reasoning_content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning_content or self.tool_calls)


def new_tool_call(call: FunctionCall) -> ToolCall:
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=call.name, arguments=call.arguments)


@dataclass(frozen=True)
class _Word:
    """A thought word split around its marker: ``"\\n</think>\\n\\n"`` → lead ``"\\n"``, ``"</think>"``, tail."""

    lead: str
    marker: str
    tail: str

    @classmethod
    def of(cls, word: str) -> _Word:
        marker = word.strip()
        start = word.index(marker) if marker else len(word)
        return cls(word[:start], marker, word[start + len(marker) :])


@dataclass
class _Tools:
    """Content under tool parsing: shown up to where a call may start, the rest held until ``finish``."""

    fmt: ToolFormat
    text: str = ""
    shown: int = 0

    def feed(self, content: str) -> str:
        self.text += content
        start = max(self.fmt.call_start(self.text), self.shown)
        shown, self.shown = self.text[self.shown : start], start
        return shown

    def finish(self) -> ParsedDelta:
        held = self.text[self.shown :]
        calls = self.fmt.extract(held) if held else None
        if not calls:
            return ParsedDelta(content=held)
        return ParsedDelta(tool_calls=tuple(new_tool_call(call) for call in calls))


@dataclass
class OutputParser:
    """Splits output into reasoning (inside the thought words) and content; reads tool calls when tools are on.

    A thought is recognised at the start of the output (after whitespace), or from the first character when the
    prompt already opened it (``in_thought=True``). The thought words' own newlines are not part of the reasoning,
    and newlines right after the thought are dropped. With a tool format, content is shown until a call may start;
    at ``finish`` the held text becomes ``tool_calls`` if it holds calls, else content.
    """

    thought_words: tuple[str, str] | None = None
    tool_format: ToolFormat | None = None
    in_thought: bool = False
    _state: str = field(init=False)
    _pending: str = field(init=False, default="")
    _tools: _Tools | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.thought_words is None:
            self._state = "content"
        else:
            self._open, self._close = _Word.of(self.thought_words[0]), _Word.of(self.thought_words[1])
            self._state = "reasoning" if self.in_thought else "start"
        self._tools = _Tools(self.tool_format) if self.tool_format is not None else None

    def feed(self, text: str) -> ParsedDelta:
        """What ``text`` (the next piece of output) lets us show now."""
        self._pending += text
        reasoning: list[str] = []
        content: list[str] = []
        while self._pending:
            step = getattr(self, f"_step_{self._state}")()
            if step is None:
                break
            kind, shown = step
            (reasoning if kind == "reasoning" else content).append(shown)
        return self._delta("".join(reasoning), "".join(content))

    def finish(self) -> ParsedDelta:
        """Everything still held, once the output is complete."""
        rest, self._pending = self._pending, ""
        reasoning, content = "", ""
        if self._state == "reasoning":
            reasoning = rest  # an unfinished thought
        elif self._state in ("start", "content"):
            content = rest
        # else: part of the opening word's newline, or newlines after the thought: dropped
        delta = self._delta(reasoning, content)
        if self._tools is None:
            return delta
        final = self._tools.finish()
        return ParsedDelta(delta.content + final.content, delta.reasoning_content, final.tool_calls)

    def _delta(self, reasoning: str, content: str) -> ParsedDelta:
        if self._tools is not None and content:
            content = self._tools.feed(content)
        return ParsedDelta(content=content, reasoning_content=reasoning)

    # Each step consumes from ``_pending`` and returns ``(kind, text shown)``, or ``None`` to wait for more.

    def _step_start(self) -> tuple[str, str] | None:
        stripped = self._pending.lstrip()
        if not stripped:
            return None
        if stripped.startswith(self._open.marker):
            self._pending = stripped[len(self._open.marker) :]
            self._state = "open_tail"
            return "reasoning", ""
        if self._open.marker.startswith(stripped):
            return None  # may still open a thought
        self._state = "content"
        return "content", ""

    def _step_open_tail(self) -> tuple[str, str] | None:
        tail = self._open.tail
        if tail and tail.startswith(self._pending) and len(self._pending) < len(tail):
            return None
        if tail and self._pending.startswith(tail):
            self._pending = self._pending[len(tail) :]
        self._state = "reasoning"
        return "reasoning", ""

    def _step_reasoning(self) -> tuple[str, str] | None:
        close = self._close
        end = self._pending.find(close.marker)
        if end >= 0:
            inner = self._pending[:end]
            if close.lead and inner.endswith(close.lead):
                inner = inner[: -len(close.lead)]
            self._pending = self._pending[end + len(close.marker) :]
            self._state = "after_thought"
            return "reasoning", inner
        keep = min(
            partial_marker_at(self._pending, close.lead + close.marker), partial_marker_at(self._pending, close.marker)
        )
        shown, self._pending = self._pending[:keep], self._pending[keep:]
        return ("reasoning", shown) if shown else None

    def _step_after_thought(self) -> tuple[str, str] | None:
        self._pending = self._pending.lstrip("\n")
        if not self._pending:
            return None
        self._state = "content"
        return "content", ""

    def _step_content(self) -> tuple[str, str] | None:
        shown, self._pending = self._pending, ""
        return "content", shown
