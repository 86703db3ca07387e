"""A chat template as the rest of the gateway sees it: render a request, and read the output back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from gateway.templates.conversation import to_conversation
from gateway.templates.parsing import OutputParser
from gateway.templates.rendering import Rendering, render
from gateway.templates.spec import TemplateSpec, load_spec
from gateway.templates.tool_formats import tool_format


class ChatTemplate(Protocol):
    name: str
    reasoning: bool

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        enable_thinking: bool | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> Rendering:
        """The generation prompt for OpenAI ``messages`` (+ ``tools``); ``InvalidRequest`` if it cannot be built."""
        ...

    def output_parser(self, *, tools_enabled: bool, enable_thinking: bool | None = None) -> OutputParser:
        """A fresh parser for one generation's output."""
        ...


class SlotTemplate:
    """A LLaMA-Factory template from ``chat_templates/<name>.yaml``."""

    def __init__(self, spec: TemplateSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.reasoning = spec.reasoning

    @classmethod
    def named(cls, name: str) -> SlotTemplate:
        """The shipped template ``name``; ``TemplateNotFound`` for an unknown one."""
        return cls(load_spec(name))

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        enable_thinking: bool | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> Rendering:
        return render(
            self.spec,
            to_conversation(messages, tools),
            enable_thinking=enable_thinking,
            bos_token=bos_token,
            eos_token=eos_token,
        )

    def output_parser(self, *, tools_enabled: bool, enable_thinking: bool | None = None) -> OutputParser:
        """Thoughts are read for reasoning templates (their prompts never leave a thought open); tool calls in the
        template's tool format when tools are on and the template has one."""
        fmt = self.spec.tool_format
        return OutputParser(
            thought_words=self.spec.thought_words if self.spec.reasoning else None,
            tool_format=tool_format(fmt) if tools_enabled and fmt is not None else None,
        )
