"""Template specs: the declarative files in ``chat_templates/`` loaded into frozen objects.

A spec mirrors one LLaMA-Factory ``register_template(...)`` call, with the same field names. Slots are lists whose
items are a string (may hold ``{{content}}``), ``{special: bos_token}`` / ``{special: eos_token}`` (the tokenizer's
token, one id, left out when the tokenizer has none; any other ``special`` name yields nothing, as LLaMA-Factory
ignores it: ``phi_small``'s prefix) or ``{token: "<|x|>"}`` (that token, one id).

``format_function`` is a slot list (tool format ``default``) or ``{slots: [...], tool_format: NAME}``;
``format_tools`` is ``{tool_format: NAME}`` or ``{slots: [...]}`` (the tools JSON put into the slots as is).
Fields a file leaves out take ``register_template``'s defaults.
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
_FIELDS = frozenset({
    "name", "format_user", "format_assistant", "format_system", "format_function", "format_observation",
    "format_tools", "format_prefix", "default_system", "stop_words", "thought_words", "tool_call_words",
    "efficient_eos", "replace_eos", "enable_thinking", "template_class",
})  # fmt: skip


class TemplateNotFound(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown chat template {self.name!r}; known: {', '.join(template_names())}"


@dataclass(frozen=True)
class TemplateSpec:
    """One LLaMA-Factory template, defaults filled in.

    ``tool_format`` names the format that describes tools in the system text and reads calls back from output
    (``None`` when ``format_tools`` is a slot list, as in ``phi4_mini``); ``function_tool_format`` writes history
    calls; ``tools_slots`` is set only for slot-style ``format_tools``.
    """

    name: str
    format_user: tuple[Slot, ...]
    format_assistant: tuple[Slot, ...]
    format_system: tuple[Slot, ...]
    format_function: tuple[Slot, ...]
    function_tool_format: str
    format_observation: tuple[Slot, ...]
    tool_format: str | None
    tools_slots: tuple[Slot, ...] | None
    format_prefix: tuple[Slot, ...]
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
        """The eos the model was trained to emit: with ``replace_eos`` the first stop word; for a tokenizer without
        one, ``<|endoftext|>`` (LLaMA-Factory adds it)."""
        if self.replace_eos and self.stop_words:
            return self.stop_words[0]
        return tokenizer_eos if tokenizer_eos is not None else "<|endoftext|>"

    def stop(self, tokenizer_eos: str | None) -> tuple[str, ...]:
        """Stop strings, sorted: the eos (after ``replace_eos``) and the stop words."""
        eos = self.eos_token(tokenizer_eos)
        words = set(self.stop_words) | ({eos} if eos else set())
        return tuple(sorted(words))


def _slots(raw: Any, field: str, name: str) -> tuple[Slot, ...]:
    if not isinstance(raw, list):
        raise ValueError(f"template {name}: {field} must be a list of slots")
    for slot in raw:
        if isinstance(slot, dict):
            key = next(iter(slot), None)
            if len(slot) != 1 or key not in ("special", "token"):
                raise ValueError(f"template {name}: bad slot {slot!r} in {field}")
        elif not isinstance(slot, str):
            raise ValueError(f"template {name}: bad slot {slot!r} in {field}")
    return tuple(raw)


def _formatter(raw: Any, field: str, name: str) -> tuple[tuple[Slot, ...] | None, str | None]:
    """``(slots, tool_format)`` of a formatter given as a slot list or a mapping."""
    if isinstance(raw, dict):
        unknown = set(raw) - {"slots", "tool_format"}
        if unknown:
            raise ValueError(f"template {name}: unknown keys {sorted(unknown)} in {field}")
        slots = _slots(raw["slots"], field, name) if "slots" in raw else None
        return slots, raw.get("tool_format")
    return _slots(raw, field, name), None


def parse_spec(data: dict[str, Any]) -> TemplateSpec:
    """Build a spec from a template file's mapping, filling ``register_template``'s defaults."""
    name = data["name"]
    unknown = set(data) - _FIELDS
    if unknown:
        raise ValueError(f"template {name}: unknown fields {sorted(unknown)}")
    efficient_eos = bool(data.get("efficient_eos", False))
    default_slots: list[Slot] = ["{{content}}"] if efficient_eos else ["{{content}}", {"special": "eos_token"}]
    user = _slots(data.get("format_user", ["{{content}}"]), "format_user", name)
    assistant = _slots(data.get("format_assistant", default_slots), "format_assistant", name)
    function_slots, function_format = _formatter(data.get("format_function", list(assistant)), "format_function", name)
    tools_slots, tools_format = _formatter(data.get("format_tools", {}), "format_tools", name)
    template_class = data.get("template_class", "plain")
    if template_class not in ("plain", "llama2", "reasoning", "reasoning_glm47"):
        raise ValueError(f"template {name}: unknown template_class {template_class!r}")
    return TemplateSpec(
        name=name,
        format_user=user,
        format_assistant=assistant,
        format_system=_slots(data.get("format_system", ["{{content}}"]), "format_system", name),
        format_function=function_slots or assistant,
        function_tool_format=function_format or "default",
        format_observation=_slots(data.get("format_observation", list(user)), "format_observation", name),
        tool_format=None if tools_slots is not None else (tools_format or "default"),
        tools_slots=tools_slots,
        format_prefix=_slots(data.get("format_prefix", []), "format_prefix", name),
        default_system=data.get("default_system", ""),
        stop_words=tuple(data.get("stop_words", ())),
        thought_words=tuple(data.get("thought_words", DEFAULT_THOUGHT_WORDS)),  # type: ignore[arg-type]
        tool_call_words=tuple(data.get("tool_call_words", DEFAULT_TOOL_CALL_WORDS)),  # type: ignore[arg-type]
        efficient_eos=efficient_eos,
        replace_eos=bool(data.get("replace_eos", False)),
        enable_thinking=data.get("enable_thinking", True),
        template_class=template_class,
    )


def _template_dir() -> resources.abc.Traversable:
    return resources.files("chat_templates")


@cache
def template_names() -> tuple[str, ...]:
    """Every template name shipped in ``chat_templates/``, sorted."""
    return tuple(sorted(p.name[: -len(".yaml")] for p in _template_dir().iterdir() if p.name.endswith(".yaml")))


@cache
def load_spec(name: str) -> TemplateSpec:
    """The spec of ``chat_templates/<name>.yaml``; ``TemplateNotFound`` for an unknown name."""
    if name not in template_names():
        raise TemplateNotFound(name)
    data = yaml.safe_load(_template_dir().joinpath(f"{name}.yaml").read_text(encoding="utf-8"))
    if data.get("name") != name:
        raise ValueError(f"chat_templates/{name}.yaml declares name {data.get('name')!r}")
    return parse_spec(data)
