"""Adapter module names onto the served model's, the way transformers renames checkpoint weights when it loads them.

Some architectures are loaded by transformers 5 under names their checkpoints do not use. EXAONE 3
(``model_type: exaone``) is loaded as ``LlamaForCausalLM``: the checkpoint's ``transformer.h.3.attn.attention.q_proj``
is the model's ``model.layers.3.self_attn.q_proj``, ``mlp.c_fc_0`` its ``mlp.gate_proj``. Adapters trained before
transformers 5 (LLaMA-Factory on EXAONE's own modelling code) carry the checkpoint names; adapters trained with
transformers 5 carry the model's. Both are served: a name the model does not have is renamed with the
``WeightRenaming`` rules transformers registers for the model (``transformers.conversion_mapping``), applied exactly
as its loader applies them (``rename_source_key``). No table is kept here.

Only renamings are used. A ``WeightConverter`` (weights merged, split or stacked on load, e.g. per-expert MoE
weights fused into one tensor) changes shapes, so a LoRA on the old weight is not a LoRA on the new one under
another name; such names are left as they are (and refused or converted by whoever handles them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, rename_source_key


def model_renamer(model: torch.nn.Module) -> Callable[[str], str]:
    """``module path in a checkpoint -> module path in model`` (unchanged where no renaming applies).

    A path the model already has is never renamed.
    """
    known = {name for name, _ in model.named_modules()}
    try:
        transforms = get_model_conversion_mapping(model)  # type: ignore[arg-type]
    except Exception:  # not a transformers model (a test's plain module): nothing to rename
        transforms = []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]

    def rename(path: str) -> str:
        return path if path in known or not renamings else rename_module(path, renamings)

    return rename


def checkpoint_renamings(model_type: str | None) -> list[WeightRenaming]:
    """The renamings transformers applies to checkpoints of ``model_type`` when it loads them (may be empty)."""
    transforms = get_checkpoint_conversion_mapping(model_type) if model_type else None
    return [t for t in transforms or () if isinstance(t, WeightRenaming)]


def rename_module(path: str, renamings: list[WeightRenaming]) -> str:
    """``path`` renamed as transformers renames the weight ``f"{path}.weight"``."""
    # Rules are written against weight keys (``\\.mlp\\.c_fc_0\\.``): match on one, then drop the leaf again.
    renamed, _ = rename_source_key(f"{path}.weight", renamings, [])
    return renamed.removesuffix(".weight")
