"""Which template a model was trained with. First match wins:

1. an explicit template (config file or command line, per adapter or for the base);
2. the ``template:`` of the training YAML given for the adapter (``--adapter-config NAME=FILE``);
   else of ``training_args.yaml`` / ``llamaboard_config.yaml`` in the adapter folder, where LLaMA Board records it
   (for a ``checkpoint-N`` folder, in the run folder above it); else of another ``*.yaml`` in the run folder, or of
   a ``*.yaml`` beside the run folder whose ``output_dir`` is that run (``llamafactory-cli train`` writes no YAML
   into the run: the user's config lives wherever they kept it);
3. the adapter folder's tokenizer chat template (``chat_template.jinja`` or ``tokenizer_config.json``): when it is
   the Jinja LLaMA-Factory generated from one of its templates (``gateway.templates.lf_jinja``), that template;
   otherwise the Jinja itself;
4. the base model's configured template;
5. the ``Modelfile`` of a merged export (``llamafactory-cli export``) in the base folder, when it is the one
   LLaMA-Factory wrote for one of its templates;
6. the base tokenizer's chat template (recognised the same way: a merged export carries LLaMA-Factory's Jinja).

    resolved = resolve_template(adapter_dir=Path("saves/qwen/lora/train_1"), base_dir=Path("models/Qwen2.5-7B"))
    resolved.template.render(messages), resolved.source  # "recorded by LLaMA-Factory in .../training_args.yaml"
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from gateway.templates.chat_template import ChatTemplate, SlotTemplate
from gateway.templates.jinja_template import JinjaTemplate, find_chat_template, tokenizer_tokens
from gateway.templates.lf_jinja import recognise, recognise_modelfile

RUN_FILES = ("training_args.yaml", "llamaboard_config.yaml")
MODELFILE = "Modelfile"
RUN_KEYS = ("template", "top.template")  # training_args.yaml; LLaMA Board's saved form
_CHECKPOINT = re.compile(r"checkpoint-\d+")


@dataclass(frozen=True)
class ResolvedTemplate:
    template: ChatTemplate
    source: str  # which rule matched, and the file: shown by /v1/models and the render endpoint


class TemplateResolutionError(ValueError):
    pass


def _yaml_template(path: Path, run: Path | None = None) -> str | None:
    """``template:`` of the YAML file ``path``; with ``run``, only if its ``output_dir`` names that run folder."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TemplateResolutionError(f"{path} is not valid YAML: {exc}") from exc
    except OSError as exc:
        raise TemplateResolutionError(f"cannot read {path}: {exc.strerror}") from exc
    if not isinstance(data, dict):
        return None
    if run is not None:
        output_dir = data.get("output_dir")
        if not isinstance(output_dir, str) or Path(output_dir).name != run.name:
            return None
    for key in RUN_KEYS:
        name = data.get(key)
        if isinstance(name, str) and name:
            return name
    return None


def recorded_template(folder: Path) -> tuple[str, Path] | None:
    """The ``template:`` recorded for a run folder (or for the run a ``checkpoint-N`` belongs to): LLaMA Board's
    files, another YAML in the run folder, or a YAML beside it whose ``output_dir`` is the run."""
    run = folder.parent if _CHECKPOINT.fullmatch(folder.name) else folder
    candidates = [folder] if run is folder else [folder, run]
    for candidate in candidates:
        for file_name in RUN_FILES:
            path = candidate / file_name
            if path.is_file() and (name := _yaml_template(path)) is not None:
                return name, path
    for path in sorted(run.glob("*.yaml")):
        if path.name not in RUN_FILES and (name := _yaml_template(path)) is not None:
            return name, path
    for path in sorted(run.parent.glob("*.yaml")):
        if (name := _yaml_template(path, run)) is not None:
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


def _modelfile_template(folder: Path) -> ResolvedTemplate | None:
    path = folder / MODELFILE
    if not path.is_file():
        return None
    bos, eos = tokenizer_tokens(folder)
    try:
        recognised = recognise_modelfile(path.read_text(encoding="utf-8"), bos, eos)
    except (OSError, UnicodeDecodeError):
        return None
    if recognised is None:
        return None
    ties = f" (or {', '.join(recognised.ties)}: the same file)" if recognised.ties else ""
    return ResolvedTemplate(SlotTemplate.named(recognised.name),
                            f"LLaMA-Factory's Modelfile for template {recognised.name}{ties} in {path}")


def resolve_template(
    *,
    explicit: str | None = None,
    adapter_dir: Path | None = None,
    base_template: str | None = None,
    base_dir: Path | None = None,
    training_config: Path | None = None,
) -> ResolvedTemplate:
    """The template for a target (an adapter on a base, or the base alone) and why; ``TemplateResolutionError``
    when no rule matches or a rule names a template the gateway does not ship."""
    if explicit:
        template = _slot_template(explicit, "the configuration")
        return ResolvedTemplate(template, "explicit: set in config or on the command line")
    if training_config is not None:
        name = _yaml_template(training_config)
        if name is None:
            raise TemplateResolutionError(f"{training_config} (--adapter-config) has no `template:`")
        return ResolvedTemplate(_slot_template(name, str(training_config)),
                                f"the training config {training_config} (--adapter-config)")
    if adapter_dir is not None:
        recorded = recorded_template(adapter_dir)
        if recorded is not None:
            name, path = recorded
            why = f"recorded by LLaMA-Factory in {path}" if path.name in RUN_FILES else f"the training config {path}"
            return ResolvedTemplate(_slot_template(name, str(path)), why)
        from_tokenizer = _tokenizer_template(adapter_dir, "the adapter's tokenizer chat template")
        if from_tokenizer is not None:
            return from_tokenizer
    if base_template:
        return ResolvedTemplate(_slot_template(base_template, "the base model's configuration"),
                                "the base model's configured template")  # fmt: skip
    if base_dir is not None:
        from_modelfile = _modelfile_template(base_dir)
        if from_modelfile is not None:
            return from_modelfile
        from_tokenizer = _tokenizer_template(base_dir, "the base tokenizer's chat template")
        if from_tokenizer is not None:
            return from_tokenizer
    raise TemplateResolutionError(
        f"no chat template found for {adapter_dir or base_dir}: give one with --template NAME "
        "(LLaMA-Factory's template name, as in training)"
    )
