"""Which architectures the engine's batched key/value cache carries, decided from transformers' own config and
model classes (default configs of transformers 5.24, no weights)."""

from __future__ import annotations

import pytest
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from backends.kv_cache import cache_refusal
from tests.backends.tiny_models import ARCHITECTURES

REFUSED = {  # model type -> what the sentence must name
    "falcon_h1": "Mamba/linear-attention state", "jamba": "Mamba/linear-attention state",
    "qwen3_next": "Mamba/linear-attention state", "mamba": "Mamba/linear-attention state",
    "gemma3n_text": "reuse another layer's keys and values", "deepseek_v32": "indexer keys",
"xlnet": "its own kind of cache", "rwkv": "its own kind of cache",
}
SERVED = ["llama4_text", "gemma3_text", "gemma4_text", "gpt_oss", "cohere2", "qwen2", "mixtral"]


def _refusal(model_type: str) -> str | None:
    config = CONFIG_MAPPING[model_type]()
    return cache_refusal(config, MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])


@pytest.mark.parametrize("model_type", list(REFUSED))
def test_models_without_a_per_token_kv_cache_are_refused_with_a_sentence(model_type: str) -> None:
    refusal = _refusal(model_type)
    assert refusal is not None and refusal.startswith(f"the native backend cannot serve {model_type} (")
    assert REFUSED[model_type] in refusal


@pytest.mark.parametrize("model_type", SERVED)
def test_full_and_sliding_attention_models_are_served(model_type: str) -> None:
    assert _refusal(model_type) is None


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_the_tiny_table_is_refused_only_where_expected(name: str) -> None:
    config = ARCHITECTURES[name].config()
    refusal = cache_refusal(config, MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])
    assert (refusal is not None) == (name == "falcon_h1"), refusal
