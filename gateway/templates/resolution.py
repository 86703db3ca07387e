"""Which template a model was trained with. First match wins:

1. an explicit template (config file or command line, per adapter or for the base);
2. ``training_args.yaml`` / ``llamaboard_config.yaml`` in the adapter folder, where LLaMA-Factory records
   ``template:`` (for a ``checkpoint-N`` folder, in the run folder above it);
3. the adapter folder's tokenizer chat template (``chat_template.jinja`` or ``tokenizer_config.json``): when it is
   the Jinja LLaMA-Factory generated from one of its templates (``gateway.templates.lf_jinja``), that template;
   otherwise the Jinja itself;
4. the base model's configured template;
5. the base tokenizer's chat template (recognised the same way: a merged export carries LLaMA-Factory's Jinja).

    resolved = resolve_template(adapter_dir=Path("saves/qwen/lora/train_1"), base_dir=Path("models/Qwen2.5-7B"))
    resolved.template.render(messages), resolved.source  # "recorded by LLaMA-Factory in .../training_args.yaml"
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from gateway.templates.chat_template import ChatTemplate, SlotTemplate
from gateway.templates.jinja_template import JinjaTemplate, find_chat_template
from gateway.templates.lf_jinja import recognise

RUN_FILES = ("training_args.yaml", "llamaboard_config.yaml")
RUN_KEYS = ("template", "top.template")  # training_args.yaml; LLaMA Board's saved form
_CHECKPOINT = re.compile(r"checkpoint-\d+")


@dataclass(frozen=True)
class ResolvedTemplate:
    template: ChatTemplate
    source: str  # which rule matched, and the file: shown by /v1/models and the render endpoint


class TemplateResolutionError(ValueError):
    pass


def recorded_template(folder: Path) -> tuple[str, Path] | None:
    """The ``template:`` LLaMA-Factory recorded for a run folder (or for the run a ``checkpoint-N`` belongs to)."""
    candidates = [folder]
    if _CHECKPOINT.fullmatch(folder.name):
        candidates.append(folder.parent)
    for candidate in candidates:
        for file_name in RUN_FILES:
            path = candidate / file_name
            if not path.is_file():
                continue
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError as exc:
                raise TemplateResolutionError(f"{path} is not valid YAML: {exc}") from exc
            if not isinstance(data, dict):
                continue
            for key in RUN_KEYS:
                name = data.get(key)
                if isinstance(name, str) and name:
                    return name, path
    return None


def _slot_template(name: str, where: str) -> SlotTemplate:
    try:
        return SlotTemplate.named(name)
    except KeyError as exc:  # TemplateNotFound
        raise TemplateResolutionError(f"{where} names a template the gateway does not ship: {exc}") from None


def _tokenizer_template(folder: Path, whose: str) -> ResolvedTemplate | None:
    found = find_chat_template(folder)
    if found is None and _CHECKPOINT.fullmatch(folder.name):
        found = find_chat_template(folder.parent)
    if found is None:
        return None
    recognised = recognise(found.source, found.bos_token, found.eos_token)
    if recognised is None:
        return ResolvedTemplate(JinjaTemplate.from_tokenizer(found), f"{whose} in {found.path}")
    ties = f" (the same Jinja as {', '.join(recognised.ties)})" if recognised.ties else ""
    return ResolvedTemplate(SlotTemplate.named(recognised.name),
                            f"LLaMA-Factory's Jinja for template {recognised.name}{ties}: {whose} in {found.path}")


def resolve_template(
    *,
    explicit: str | None = None,
    adapter_dir: Path | None = None,
    base_template: str | None = None,
    base_dir: Path | None = None,
) -> ResolvedTemplate:
    """The template for a target (an adapter on a base, or the base alone) and why; ``TemplateResolutionError``
    when no rule matches or a rule names a template the gateway does not ship."""
    if explicit:
        template = _slot_template(explicit, "the configuration")
        return ResolvedTemplate(template, "explicit: set in config or on the command line")
    if adapter_dir is not None:
        recorded = recorded_template(adapter_dir)
        if recorded is not None:
            name, path = recorded
            return ResolvedTemplate(_slot_template(name, str(path)), f"recorded by LLaMA-Factory in {path}")
        from_tokenizer = _tokenizer_template(adapter_dir, "the adapter's tokenizer chat template")
        if from_tokenizer is not None:
            return from_tokenizer
    if base_template:
        return ResolvedTemplate(_slot_template(base_template, "the base model's configuration"),
                                "the base model's configured template")  # fmt: skip
    if base_dir is not None:
        from_tokenizer = _tokenizer_template(base_dir, "the base tokenizer's chat template")
        if from_tokenizer is not None:
            return from_tokenizer
    raise TemplateResolutionError(
        f"no chat template found for {adapter_dir or base_dir}: give one with --template NAME "
        "(LLaMA-Factory's template name, as in training)"
    )
