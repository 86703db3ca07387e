"""Which template a model was trained with. First match wins:

1. an explicit template (config file or command line, per adapter or for the base);
2. ``training_args.yaml`` / ``llamaboard_config.yaml`` in the adapter folder (LLaMA-Factory records ``template:``);
3. the adapter folder's tokenizer chat template;
4. the base model's configured template;
5. the base tokenizer's chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from gateway.templates.chat_template import ChatTemplate, SlotTemplate

RUN_FILES = ("training_args.yaml", "llamaboard_config.yaml")


@dataclass(frozen=True)
class ResolvedTemplate:
    template: ChatTemplate
    source: str  # a short sentence: why this template


class TemplateResolutionError(ValueError):
    pass


def recorded_template(folder: Path) -> tuple[str, str] | None:
    """The ``template:`` LLaMA-Factory recorded for a run folder (or a ``checkpoint-N`` inside it)."""
    for candidate in (folder, folder.parent):
        for file_name in RUN_FILES:
            path = candidate / file_name
            if path.is_file():
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
                name = data.get("template") or data.get("top.template")
                if isinstance(name, str) and name:
                    return name, str(path)
    return None


def resolve_template(
    *,
    explicit: str | None = None,
    adapter_dir: Path | None = None,
    base_template: str | None = None,
    base_dir: Path | None = None,
) -> ResolvedTemplate:
    if explicit:
        return ResolvedTemplate(SlotTemplate.named(explicit), "explicit: set in config or on the command line")
    if adapter_dir is not None:
        recorded = recorded_template(adapter_dir)
        if recorded is not None:
            return ResolvedTemplate(SlotTemplate.named(recorded[0]), f"recorded by LLaMA-Factory in {recorded[1]}")
    if base_template:
        return ResolvedTemplate(SlotTemplate.named(base_template), "the base model's configured template")
    raise TemplateResolutionError(
        f"no chat template found for {adapter_dir or base_dir}: give one with --template NAME"
    )
