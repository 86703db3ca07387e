"""The tokens a LLaMA-Factory template adds to the tokenizer, added for the models served with that template only.

LLaMA-Factory's ``Template.fix_special_tokens`` (0.9.5) runs on the base tokenizer both in training and in its
``ChatModel``: with ``replace_eos`` the template's first stop word becomes the eos, a tokenizer without eos gets
``<|endoftext|>``, and the other stop words become additional special tokens. A word the vocabulary lacks is a *new*
token with the next free id (``llama3`` on a Qwen vocabulary: ``<|eot_id|>`` 653, ``<|eom_id|>`` 654). The adapter
was trained with those ids, so its prompts must be encoded with them (one id each, not their text's pieces), its
answers decoded with them (skipped as special tokens) and it must stop on them.

Why we add them as LLaMA-Factory does instead of loading the adapter folder's saved tokenizer: LLaMA-Factory itself
never reads that copy (its ChatModel and export load the base's tokenizer and fix it again), a checkpoint or an
older run may not carry one, and the fix depends on the template alone, so the base served with ``--template llama3``
needs it too. Applying transformers' own ``add_special_tokens`` to a copy of the base tokenizer, in LLaMA-Factory's
order, gives the same ids (the test checks them against the run's saved tokenizer). Targets whose template adds
nothing keep the base tokenizer object itself, so the base and other adapters tokenize exactly as before.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from gateway.templates import ChatTemplate, SlotTemplate, TemplateSpec
from gateway.tokenization import ServedTokenizer

FALLBACK_EOS = "<|endoftext|>"  # what LLaMA-Factory makes the eos of a tokenizer that has none


class TemplateTokensError(ValueError):
    """A template's new tokens do not fit the model (raised when a target is resolved, never at generation)."""


def _special(tokenizer: Any, word: str) -> bool:
    """``word`` is one special token of the vocabulary already (so LLaMA-Factory's fix changes nothing for it)."""
    token_id = tokenizer.convert_tokens_to_ids(word)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        return False
    added = tokenizer.added_tokens_decoder.get(token_id)
    return added is not None and added.content == word and bool(added.special)


def template_words(spec: TemplateSpec, tokenizer: Any) -> tuple[str, ...]:
    """The words ``fix_special_tokens`` makes special tokens for ``spec``: its stop words (the first one as eos with
    ``replace_eos``) and, for a tokenizer without eos and a template that does not replace it, ``<|endoftext|>``."""
    words = list(spec.stop_words)
    if not (spec.replace_eos and spec.stop_words) and tokenizer.eos_token_id is None:
        words.append(FALLBACK_EOS)
    return tuple(dict.fromkeys(words))


def fixed_tokenizer(spec: TemplateSpec, tokenizer: Any) -> Any:
    """A copy of ``tokenizer`` as LLaMA-Factory fixes it for ``spec`` (its steps, in its order)."""
    fixed = copy.deepcopy(tokenizer.hf if isinstance(tokenizer, ServedTokenizer) else tokenizer)
    stop_words = list(spec.stop_words)
    if spec.replace_eos and stop_words:
        if fixed.eos_token != stop_words[0]:
            fixed.add_special_tokens({"eos_token": stop_words[0]})
        stop_words = stop_words[1:]
    if fixed.eos_token_id is None:
        fixed.add_special_tokens({"eos_token": FALLBACK_EOS})
    if stop_words:
        fixed.add_special_tokens({"additional_special_tokens": stop_words}, replace_extra_special_tokens=False)
    return ServedTokenizer(fixed)


def embedding_rows(model_dir: Path | None) -> int | None:
    """``vocab_size`` of the model's ``config.json`` (or its ``text_config``): how many token ids it can embed."""
    path = model_dir / "config.json" if model_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        rows = section.get("vocab_size") if isinstance(section, dict) else None
        if isinstance(rows, int):
            return rows
    return None


class TemplateTokenizers:
    """The tokenizer each target encodes and decodes with: the base's, or the base's fixed for its template (one copy
    per template, made when a target with that template is first resolved)."""

    def __init__(self, base: Any, rows: int | None) -> None:
        """``base``: the served tokenizer; ``rows``: the model's embedding rows (None: unknown, e.g. upstream)."""
        self.base = base
        self._rows = rows
        self._fixed: dict[str, Any] = {}

    def for_template(self, template: ChatTemplate) -> Any:
        """The tokenizer for ``template``; ``TemplateTokensError`` if its new tokens would not fit the model."""
        if not isinstance(template, SlotTemplate):
            return self.base  # a Jinja template's tokens are the tokenizer's own
        spec = template.spec
        if spec.name in self._fixed:
            return self._fixed[spec.name]
        if all(_special(self.base, word) for word in template_words(spec, self.base)):
            tokenizer = self.base
        else:
            tokenizer = fixed_tokenizer(spec, self.base)
            self._check_rows(spec, tokenizer)
        self._fixed[spec.name] = tokenizer
        return tokenizer

    def _check_rows(self, spec: TemplateSpec, tokenizer: Any) -> None:
        if self._rows is None:
            return
        new = {word: tokenizer.convert_tokens_to_ids(word) for word in template_words(spec, tokenizer)}
        outside = {word: i for word, i in new.items() if isinstance(i, int) and i >= self._rows}
        if outside:
            listed = ", ".join(f"{word} (id {i})" for word, i in outside.items())
            raise TemplateTokensError(
                f"template {spec.name} adds {listed} to the tokenizer, as LLaMA-Factory does, but the model embeds "
                f"only {self._rows} token ids: LLaMA-Factory trains such a model with resize_vocab, and the grown "
                "embedding is in the adapter (modules_to_save) or the merged export, not in this base")
