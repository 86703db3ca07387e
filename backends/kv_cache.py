"""Which models the engine's batched key/value cache can carry, decided from the model's config and class.

The engine (``backends.engine``) keeps one left-padded ``DynamicCache`` of full-attention layers for the whole batch
and rebuilds it when rows join, leave or a step is rolled back. That is exact for every layer that caches keys and
values per token:

- full attention;
- sliding-window attention (mistral's ``sliding_window``, gemma2/3's sliding layers): the engine keeps every
  position, and the model's sliding-window mask hides those beyond the window. The mask is built from distances
  between cache columns, which left padding does not change, so each row sees exactly its own window;
- chunked attention (llama4): transformers counts the chunks from each row's first unpadded column.

Anything else is refused when the backend starts, with a sentence naming the architecture: state that is not per
token (Mamba/SSM, linear attention, recurrent layers: falcon_h1, jamba, qwen3_next, …), layers that share another
layer's cache (gemma3n), sparse-attention indexer keys (deepseek_v32), and models that bring their own cache class
(xlnet, rwkv, …).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from transformers import DynamicCache
from transformers.cache_utils import (
    DummyLayer,
    DynamicIndexedLayer,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionCacheLayerMixin,
)

from gateway.errors import BackendUnavailable

_PER_TOKEN_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


def cache_refusal(config: Any, model_class: Any) -> str | None:
    """Why the engine cannot serve ``model_class`` built from ``config`` (one sentence), or ``None`` if it can."""
    name = f"{getattr(config, 'model_type', '?')} ({model_class.__name__})"
    supports_default = getattr(model_class, "_supports_default_dynamic_cache", None)
    if supports_default is not None and not supports_default():
        return f"the native backend cannot serve {name}: the model keeps its own kind of cache, not keys and values"
    if "cache" not in inspect.signature(model_class.forward).parameters:
        return f"the native backend cannot serve {name}: its forward pass takes no `cache` argument"
    text_config = config.get_text_config(decoder=True)
    kinds: dict[str, set[str]] = {}
    for layer in DynamicCache(config=text_config).layers:
        if type(layer) not in _PER_TOKEN_LAYERS:
            kinds.setdefault(_what(layer), set()).add(type(layer).__name__)
    if kinds:
        held = " and ".join(f"{what} ({', '.join(sorted(classes))})" for what, classes in sorted(kinds.items()))
        return (f"the native backend cannot serve {name}: its cache holds {held}, which the engine's batched "
                "key/value cache cannot carry per row; serve it with --backend vllm")
    return None


def _what(layer: object) -> str:
    if isinstance(layer, LinearAttentionCacheLayerMixin):
        return "Mamba/linear-attention state"
    if isinstance(layer, DummyLayer):
        return "layers that reuse another layer's keys and values"
    if isinstance(layer, DynamicIndexedLayer):
        return "sparse-attention indexer keys"
    return "layers of another kind"


def folder_refusal(model_dir: str | Path) -> str | None:
    """``cache_refusal`` for the model a folder holds, from its ``config.json`` alone (no weights are read), so that
    ``gateway serve`` can refuse before it starts. ``None`` when the folder cannot tell (loading it will say why)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if not (Path(model_dir) / "config.json").is_file():
        return None
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (OSError, ValueError, KeyError):  # unreadable or not a causal LM transformers knows
        return None
    if not isinstance(model_class, type):  # several classes for one config: the one loaded is checked at load
        return None
    return cache_refusal(config, model_class)


def check_cache(model: Any) -> None:
    """Raise ``BackendUnavailable`` (the sentence of ``cache_refusal``) if the engine cannot serve ``model``."""
    refusal = cache_refusal(model.config, type(model))
    if refusal is not None:
        raise BackendUnavailable(refusal)


def kv_cache(layers: list[tuple[Any, Any]]) -> DynamicCache:
    """A ``DynamicCache`` of full-attention layers holding ``(keys, values)`` per layer, without copying them.

    Each layer is initialised through ``Cache.update`` with none of the positions (its dtype and device), then holds
    the given tensors: updating with the whole tensors would ``torch.cat`` them onto an empty one, a second copy of
    the batch's whole cache every time rows join or leave."""
    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys[:, :, :0], values[:, :, :0], index)
        layer = cache.layers[index]
        assert isinstance(layer, DynamicLayer)  # a DynamicCache() without a config makes full-attention layers
        layer.keys, layer.values = keys, values
    return cache
