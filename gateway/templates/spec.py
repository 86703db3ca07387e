"""Template specs: the declarative files in ``chat_templates/`` loaded into frozen objects.

A spec mirrors one LLaMA-Factory ``register_template(...)`` call. Slots are lists whose items are either a string
(may hold ``{{content}}``), ``{special: bos_token}`` / ``{special: eos_token}`` (the tokenizer's token, one id) or
``{token: "<|x|>"}`` (that token, one id). Missing formatters get LLaMA-Factory's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

import yaml

Slot = str | dict[str, str]
TemplateClass = Literal["plain", "llama2", "reasoning", "reasoning_glm47"]

DEFAULT_THOUGHT_WORDS = ("<think>\n", "\n</think>\n\n")
DEFAULT_TOOL_CALL_WORDS = ("<tool_call>", "</tool_call>")


class TemplateNotFound(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown chat template {self.name!r}; known: {', '.join(template_names())}"


@dataclass(frozen=True)
class TemplateSpec:
    name: str
    format_user: tuple[Slot, ...]
    format_assistant: tuple[Slot, ...]
    format_system: tuple[Slot, ...]
    format_function: tuple[Slot, ...]
    format_observation: tuple[Slot, ...]
    format_prefix: tuple[Slot, ...]
    tool_format: str
    default_system: str
    stop_words: tuple[str, ...]
    thought_words: tuple[str, str]
    tool_call_words: tuple[str, str]
    efficient_eos: bool
    replace_eos: bool
    enable_thinking: bool | None
    template_class: TemplateClass

    @property
    def reasoning(self) -> bool:
        return self.template_class.startswith("reasoning")

    def eos_token(self, tokenizer_eos: str | None) -> str | None:
        """The eos the model was trained to emit: with ``replace_eos`` it is the first stop word."""
        return self.stop_words[0] if self.replace_eos and self.stop_words else tokenizer_eos

    def stop(self, tokenizer_eos: str | None) -> tuple[str, ...]:
        eos = self.eos_token(tokenizer_eos)
        words = set(self.stop_words) | ({eos} if eos else set())
        return tuple(sorted(words))


def _slots(raw: Any, field: str, name: str) -> tuple[Slot, ...]:
    if not isinstance(raw, list):
        raise ValueError(f"template {name}: {field} must be a list of slots")
    for slot in raw:
        if isinstance(slot, dict) and not (set(slot) <= {"special", "token"} and len(slot) == 1):
            raise ValueError(f"template {name}: bad slot {slot!r} in {field}")
    return tuple(raw)


def parse_spec(data: dict[str, Any]) -> TemplateSpec:
    """Build a spec from a template file's mapping, filling LLaMA-Factory's defaults."""
    name = data["name"]
    efficient_eos = bool(data.get("efficient_eos", False))
    default_slots: list[Slot] = ["{{content}}"] if efficient_eos else ["{{content}}", {"special": "eos_token"}]
    user = data.get("format_user", ["{{content}}"])
    assistant = data.get("format_assistant", default_slots)
    return TemplateSpec(
        name=name,
        format_user=_slots(user, "format_user", name),
        format_assistant=_slots(assistant, "format_assistant", name),
        format_system=_slots(data.get("format_system", ["{{content}}"]), "format_system", name),
        format_function=_slots(data.get("format_function", assistant), "format_function", name),
        format_observation=_slots(data.get("format_observation", user), "format_observation", name),
        format_prefix=_slots(data.get("format_prefix", []), "format_prefix", name),
        tool_format=data.get("tool_format", "default"),
        default_system=data.get("default_system", ""),
        stop_words=tuple(data.get("stop_words", ())),
        thought_words=tuple(data.get("thought_words", DEFAULT_THOUGHT_WORDS)),  # type: ignore[arg-type]
        tool_call_words=tuple(data.get("tool_call_words", DEFAULT_TOOL_CALL_WORDS)),  # type: ignore[arg-type]
        efficient_eos=efficient_eos,
        replace_eos=bool(data.get("replace_eos", False)),
        enable_thinking=data.get("enable_thinking", True),
        template_class=data.get("template_class", "plain"),
    )


def _template_dir() -> resources.abc.Traversable:
    return resources.files("chat_templates")


@cache
def template_names() -> tuple[str, ...]:
    return tuple(sorted(p.name[: -len(".yaml")] for p in _template_dir().iterdir() if p.name.endswith(".yaml")))


@cache
def load_spec(name: str) -> TemplateSpec:
    if name not in template_names():
        raise TemplateNotFound(name)
    data = yaml.safe_load(_template_dir().joinpath(f"{name}.yaml").read_text(encoding="utf-8"))
    if data.get("name") != name:
        raise ValueError(f"chat_templates/{name}.yaml declares name {data.get('name')!r}")
    return parse_spec(data)
