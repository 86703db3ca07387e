"""The tokens LLaMA-Factory adds for a template (gateway.template_tokens), against the demo base's tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from gateway.demo import DemoModels
from gateway.template_tokens import TemplateTokenizers, TemplateTokensError
from gateway.templates import JinjaTemplate, SlotTemplate
from gateway.templates.jinja_template import find_chat_template
from gateway.tokenization import ServedTokenizer

LLAMA3_RUN = Path(__file__).parents[1] / "data" / "lf_runs" / "llama3"


def _base(demo_models: DemoModels) -> ServedTokenizer:
    return ServedTokenizer(AutoTokenizer.from_pretrained(demo_models.base_dir))


def test_templates_whose_words_the_vocabulary_has_keep_the_base_tokenizer_itself(demo_models: DemoModels) -> None:
    base = _base(demo_models)
    tokenizers = TemplateTokenizers(base, rows=len(base))
    for name in ("qwen", "default", "alpaca", "chatml"):
        assert tokenizers.for_template(SlotTemplate.named(name)) is base
    found = find_chat_template(demo_models.base_dir)
    assert found is not None
    assert tokenizers.for_template(JinjaTemplate.from_tokenizer(found)) is base


def test_llama3_gets_the_ids_llamafactory_saved_and_the_base_is_untouched(demo_models: DemoModels) -> None:
    base = _base(demo_models)
    before = len(base)
    fixed = TemplateTokenizers(base, rows=1024).for_template(SlotTemplate.named("llama3"))
    saved = AutoTokenizer.from_pretrained(LLAMA3_RUN)
    text = "<|im_start|>a<|eot_id|>b<|eom_id|><|im_end|>"
    assert fixed.encode(text, add_special_tokens=False) == saved.encode(text, add_special_tokens=False)
    assert (fixed.eos_token, len(fixed), len(base)) == ("<|eot_id|>", before + 2, before)
    assert fixed.decode(fixed.encode(text, add_special_tokens=False), skip_special_tokens=True) == "ab"
    assert base.convert_tokens_to_ids("<|eot_id|>") is None


def test_new_tokens_past_the_models_embedding_rows_are_refused_with_the_ids(demo_models: DemoModels) -> None:
    base = _base(demo_models)
    tokenizers = TemplateTokenizers(base, rows=len(base) + 1)  # room for <|eot_id|>, not for <|eom_id|>
    with pytest.raises(TemplateTokensError, match=r"llama3 adds <\|eom_id\|> \(id 654\).*embeds only 654"):
        tokenizers.for_template(SlotTemplate.named("llama3"))
