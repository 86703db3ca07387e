"""A model's own Jinja chat template (``tokenizer_config.json`` / ``chat_template.jinja``), rendered as transformers'
``apply_chat_template`` renders it: sandboxed, ``trim_blocks`` / ``lstrip_blocks``, loop controls, a ``tojson`` that
keeps non-ASCII text, ``raise_exception`` and ``strftime_now``; ``add_generation_prompt=True``.

Used when no LLaMA-Factory template is known for a model. The prompt is one text segment (tokenized as a whole,
as transformers does); stop is the tokenizer's eos.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gateway.errors import InvalidRequest
from gateway.templates.conversation import normalize_messages
from gateway.templates.parsing import OutputParser
from gateway.templates.rendering import Rendering, Segment
from gateway.templates.spec import DEFAULT_THOUGHT_WORDS
from gateway.templates.tool_formats import tool_format

TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


def _token_text(value: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string or an AddedToken mapping."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class TokenizerChatTemplate:
    """A chat template found in a tokenizer folder, with the special tokens the folder declares."""

    source: str
    path: Path
    bos_token: str | None
    eos_token: str | None


def tokenizer_tokens(folder: Path) -> tuple[str | None, str | None]:
    """``(bos, eos)`` as the folder's ``tokenizer_config.json`` declares them (``None`` where it does not)."""
    try:
        config = json.loads((folder / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    if not isinstance(config, dict):
        return None, None
    return _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))


def find_chat_template(folder: Path) -> TokenizerChatTemplate | None:
    """The chat template of the tokenizer in ``folder``: ``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template`` (a string, or named templates of which ``default`` is taken). ``None`` when there is none."""
    config_path = folder / TOKENIZER_CONFIG
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            config = {}
    bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    jinja_path = folder / CHAT_TEMPLATE_FILE
    if jinja_path.is_file():
        return TokenizerChatTemplate(jinja_path.read_text(encoding="utf-8"), jinja_path, bos, eos)
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, Mapping)}
        template = named.get("default")
    if isinstance(template, str) and template:
        return TokenizerChatTemplate(template, config_path, bos, eos)
    return None


class JinjaTemplate:
    """A ChatTemplate rendered from Jinja source. The output parser reads ``<think>`` thoughts when the template
    mentions ``<think>``, and qwen-style ``<tool_call>`` calls when it mentions ``<tool_call>``."""

    def __init__(self, name: str, source: str, *, bos_token: str | None = None, eos_token: str | None = None) -> None:
        self.name = name
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.reasoning = "<think>" in source

    @classmethod
    def from_tokenizer(cls, found: TokenizerChatTemplate) -> JinjaTemplate:
        return cls(f"jinja:{found.path}", found.source, bos_token=found.bos_token, eos_token=found.eos_token)

    @cached_property
    def _compiled(self) -> jinja2.Template:
        return _environment().from_string(self.source)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        enable_thinking: bool | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> Rendering:
        """The prompt as transformers renders it; ``InvalidRequest`` when the template raises for this request.

        The template gets the messages with ``developer`` as ``system`` and text parts joined into strings (other
        parts refused). A final plain assistant message is continued, as vLLM's ``continue_final_message`` does:
        rendered without a generation prompt and cut right after that message's text."""
        bos = bos_token if bos_token is not None else self.bos_token
        eos = eos_token if eos_token is not None else self.eos_token
        normalized = normalize_messages(messages)
        last = normalized[-1] if normalized else {}
        partial = last.get("content") or "" if last.get("role") == "assistant" and not last.get("tool_calls") else None
        if partial == "":
            normalized, partial = normalized[:-1], None  # nothing to continue: an ordinary generation prompt
        variables: dict[str, Any] = {
            "messages": normalized,
            "tools": [dict(tool) for tool in tools] if tools else None,
            "add_generation_prompt": partial is None,
            "bos_token": bos or "",
            "eos_token": eos or "",
        }
        if enable_thinking is not None:
            variables["enable_thinking"] = enable_thinking
        try:
            prompt = self._compiled.render(**variables)
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidRequest(f"the model's chat template refused the request: {exc}", param="messages") from exc
        if partial is not None:
            end = prompt.rfind(partial)
            if end < 0:
                raise InvalidRequest("the model's chat template does not render the final assistant message as "
                                     "given, so it cannot be continued", param=f"messages[{len(normalized) - 1}]")
            prompt = prompt[: end + len(partial)]
        return Rendering(segments=(Segment("text", prompt),), stop=(eos,) if eos else ())

    def output_parser(self, *, tools_enabled: bool, enable_thinking: bool | None = None) -> OutputParser:
        thought_words = DEFAULT_THOUGHT_WORDS if self.reasoning else None
        in_thought = False
        if thought_words is not None:
            # Does the generation prompt leave a thought open (as Qwen3 / DeepSeek-R1 style templates may)?
            try:
                probe = self.render([{"role": "user", "content": "x"}], enable_thinking=enable_thinking).prompt
            except InvalidRequest:
                probe = ""
            opened, closed = probe.rfind(thought_words[0].strip()), probe.rfind(thought_words[1].strip())
            in_thought = opened >= 0 and opened > closed
        return OutputParser(
            thought_words=thought_words,
            tool_format=tool_format("qwen") if tools_enabled and "<tool_call>" in self.source else None,
            in_thought=in_thought,
        )
