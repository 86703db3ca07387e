"""Recognising a ``chat_template.jinja`` (or an export's Ollama ``Modelfile``) that LLaMA-Factory generated from one
of its own templates.

``llamafactory-cli train`` saves its "fixed" tokenizer with the run; for templates that replace the model's Jinja
(``replace_jinja_template``, or a base without one) that tokenizer's chat template is a Jinja translation LLaMA-Factory
wrote from its template's slots. The translation loses meaning: an empty system message counts as a real one (the
template itself puts its default system there), and stop words, ``efficient_eos`` and tool formats are not in it.
So when such a Jinja is recognised, the gateway renders with that LLaMA-Factory template instead.

Recognition does not keep a table of LLaMA-Factory's files: it writes the Jinja each of our shipped templates
(``chat_templates/*.yaml``) would be translated to — the same rule LLaMA-Factory 0.9.5 applies in
``Template._get_jinja_template`` (``Llama2Template`` folds the system into the first user turn), with the folder
tokenizer's bos/eos — and compares. Several templates translate to the same Jinja (``chatml``, ``qwen3``, ``yi`` …);
then the folder's eos narrows them (a ``replace_eos`` template's eos is its first stop word), and what is left is
reported as a tie. A ``Modelfile`` (``llamafactory-cli export``) is recognised the same way from its ``TEMPLATE``
(``Template._get_ollama_template``), and its ``SYSTEM`` and ``PARAMETER stop`` lines must be the template's default
system and stop tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from gateway.templates.spec import Slot, TemplateSpec, load_spec, template_names


class NotTranslatable(ValueError):
    """LLaMA-Factory cannot translate this template (a ``token`` slot): it never writes a Jinja for it."""


def _quote(text: str) -> str:
    return "'" + text.replace("'", "\\'") + "'"


def _slots_to_jinja(slots: Sequence[Slot], bos: str | None, eos: str | None, placeholder: str = "content") -> str:
    items: list[str] = []
    for slot in slots:
        if isinstance(slot, str):
            before, found, after = slot.partition("{{content}}")
            if before:
                items.append(_quote(before))
            if found:
                items.append(placeholder)
                if after:
                    items.append(_quote(after))
        elif "token" in slot:
            raise NotTranslatable(slot["token"])
        elif slot.get("special") == "bos_token" and bos is not None:
            items.append(_quote(bos))
        elif slot.get("special") == "eos_token" and eos is not None:
            items.append(_quote(eos))
    return " + ".join(items)


def generated_jinja(spec: TemplateSpec, bos: str | None, eos: str | None) -> str:
    """The Jinja LLaMA-Factory writes for ``spec`` with a tokenizer whose tokens are ``bos``/``eos``;
    ``NotTranslatable`` when it writes none."""
    prefix = _slots_to_jinja(spec.format_prefix, bos, eos)
    system = _slots_to_jinja(spec.format_system, bos, eos, placeholder="system_message")
    user = _slots_to_jinja(spec.format_user, bos, eos)
    assistant = _slots_to_jinja(spec.format_assistant, bos, eos)
    out = "{{ " + prefix + " }}" if prefix else ""
    if spec.default_system:
        out += "{% set system_message = " + _quote(spec.default_system) + " %}"
    out += ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
            "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% endif %}")
    if spec.template_class == "llama2":
        out += ("{% for message in loop_messages %}{% if loop.index0 == 0 and system_message is defined %}"
                "{% set content = " + system + " + message['content'] %}"
                "{% else %}{% set content = message['content'] %}{% endif %}")
    else:
        out += ("{% if system_message is defined %}{{ " + system + " }}{% endif %}"
                "{% for message in loop_messages %}{% set content = message['content'] %}")
    out += ("{% if message['role'] == 'user' %}{{ " + user + " }}"
            "{% elif message['role'] == 'assistant' %}{{ " + assistant + " }}{% endif %}{% endfor %}")
    return out


@dataclass(frozen=True)
class Recognised:
    name: str  # the LLaMA-Factory template chosen
    ties: tuple[str, ...]  # other templates LLaMA-Factory translates to the same Jinja, equally consistent


@cache
def _translations(bos: str | None, eos: str | None) -> dict[str, tuple[str, ...]]:
    """Jinja text -> the shipped templates translated to it, for one pair of tokens."""
    found: dict[str, list[str]] = {}
    for name in template_names():
        try:
            found.setdefault(generated_jinja(load_spec(name), bos, eos), []).append(name)
        except NotTranslatable:
            continue
    return {text: tuple(names) for text, names in found.items()}


def recognise(source: str, bos: str | None, eos: str | None) -> Recognised | None:
    """The LLaMA-Factory template whose generated Jinja ``source`` is (``bos``/``eos``: the folder tokenizer's),
    or ``None`` when it is not one."""
    names = _translations(bos, eos).get(source.strip())
    if not names:
        return None
    return _ranked(names, eos)


def _ranked(names: Sequence[str], eos: str | None) -> Recognised:
    """The saved tokenizer is LLaMA-Factory's fixed one: a replace_eos template made its first stop word the eos
    (confirmed); a template without replace_eos kept the base's (possible); one whose eos would differ is out."""
    specs = [load_spec(n) for n in names]
    confirmed = [s.name for s in specs if s.replace_eos and s.stop_words and s.stop_words[0] == eos]
    possible = [s.name for s in specs if not (s.replace_eos and s.stop_words)]
    ranked = confirmed or possible or list(names)
    return Recognised(ranked[0], tuple(ranked[1:]))


def _slots_to_ollama(slots: Sequence[Slot], bos: str | None, eos: str | None, placeholder: str) -> str:
    items: list[str] = []
    for slot in slots:
        if isinstance(slot, str):
            items.append(slot.replace("{{content}}", "{{ " + placeholder + " }}", 1))
        elif "token" in slot:
            raise NotTranslatable(slot["token"])
        elif slot.get("special") == "bos_token" and bos is not None:
            items.append(bos)
        elif slot.get("special") == "eos_token" and eos is not None:
            items.append(eos)
    return "".join(items)


def generated_ollama(spec: TemplateSpec, bos: str | None, eos: str | None) -> str:
    """The Modelfile ``TEMPLATE`` LLaMA-Factory writes for ``spec``; ``NotTranslatable`` when it writes none."""
    prefix = _slots_to_ollama(spec.format_prefix, bos, eos, "content")
    system = _slots_to_ollama(spec.format_system, bos, eos, ".System")
    user = _slots_to_ollama(spec.format_user, bos, eos, ".Content")
    assistant = _slots_to_ollama(spec.format_assistant, bos, eos, ".Content")
    return (f"{prefix}{{{{ if .System }}}}{system}{{{{ end }}}}{{{{ range .Messages }}}}"
            f'{{{{ if eq .Role "user" }}}}{user}{{{{ else if eq .Role "assistant" }}}}{assistant}'
            "{{ end }}{{ end }}")


_TRIPLE = r'"""(.*?)"""'


def recognise_modelfile(text: str, bos: str | None, eos: str | None) -> Recognised | None:
    """The LLaMA-Factory template an exported ``Modelfile`` was written from, or ``None``."""
    template = re.search(r"^TEMPLATE " + _TRIPLE, text, re.MULTILINE | re.DOTALL)
    if template is None:
        return None
    system = re.search(r"^SYSTEM " + _TRIPLE, text, re.MULTILINE | re.DOTALL)
    stops = set(re.findall(r'^PARAMETER stop "(.*)"$', text, re.MULTILINE))
    names = []
    for name in template_names():
        spec = load_spec(name)
        try:
            if generated_ollama(spec, bos, eos) != template.group(1):
                continue
        except NotTranslatable:
            continue
        if spec.default_system == (system.group(1) if system else "") and stops == {eos, *spec.stop_words}:
            names.append(name)
    return _ranked(names, eos) if names else None
