"""Sort the tensors of a peft LoRA checkpoint by what they are (peft 0.21's ``save_pretrained`` key names)::

    base_model.model.<module>.lora_A.weight / lora_B.weight / lora_B.bias     LoRA on a linear layer (+ lora_bias)
    base_model.model.<module>.lora_magnitude_vector                           DoRA magnitude
    base_model.model.<module>.lora_embedding_A / lora_embedding_B              LoRA on an embedding
    base_model.model.<module>.base_layer.weight                                an embedding's saved base weight
    base_model.model.<module>.token_adapter.trainable_tokens_delta             trainable_token_indices rows
    base_model.model.<module>.weight / .bias                                   modules_to_save (whole module)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from gateway.errors import AdapterLoadError

_LINEAR = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_B.bias": "B.bias"}
_EMBEDDING = {"lora_embedding_A": "A", "lora_embedding_B": "B"}
_MAGNITUDE = ("lora_magnitude_vector", "lora_magnitude_vector.weight")


@dataclass
class CheckpointParts:
    linear: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    embedding: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    token_rows: dict[str, torch.Tensor] = field(default_factory=dict)


def sort_tensors(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], folder: str) -> CheckpointParts:
    """Group ``tensors`` by module and kind; refuse (``AdapterLoadError``) any tensor that is none of the above."""
    parts = CheckpointParts()
    to_save = [str(name) for name in config.get("modules_to_save") or []]
    saved_bases: set[str] = set()
    for key, tensor in tensors.items():
        name = key.removeprefix("base_model.model.")
        stem, kind = _split(name)
        if kind in _LINEAR:
            parts.linear.setdefault(stem, {})[_LINEAR[kind]] = tensor
        elif kind in _EMBEDDING:
            parts.embedding.setdefault(stem, {})[_EMBEDDING[kind]] = tensor
        elif kind in _MAGNITUDE:
            parts.magnitudes[stem] = tensor
        elif kind == "token_adapter.trainable_tokens_delta":
            parts.token_rows[stem] = tensor
        elif kind == "base_layer.weight":  # peft saves it with LoRA on an (input or output) embedding
            parts.modules.setdefault(stem, {})["weight"] = tensor
            saved_bases.add(stem)
        else:
            module, _, leaf = name.rpartition(".")
            # With ensure_weight_tying peft also saves the tied head's copy, under the head's name.
            saved = any(module.endswith(target) for target in to_save) or bool(config.get("ensure_weight_tying"))
            if leaf not in ("weight", "bias") or not saved:
                raise AdapterLoadError(f"{folder}: unsupported tensor {key} (only LoRA, DoRA and modules_to_save "
                                       "weights are served)")
            parts.modules.setdefault(module, {})[leaf] = tensor
    for module in parts.modules:
        if module in parts.linear and module not in saved_bases:
            raise AdapterLoadError(f"{folder}: {module} has both LoRA factors and a saved weight")
    return parts


def _split(name: str) -> tuple[str, str]:
    """``(module path, kind)``: the kind is what follows the module path (``lora_A.weight`` ...), else ``""``."""
    for marker in (".lora_", ".base_layer.", ".token_adapter."):
        stem, found, tail = name.rpartition(marker)
        if found:
            return stem, found[1:] + tail
    return name, ""
