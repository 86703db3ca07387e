"""The per-slot factor stacks every batched LoRA layer keeps (``LoraLinear``, ``RowEmbedding``)."""

from __future__ import annotations

import torch


def grown(a: torch.Tensor, b: torch.Tensor, slots: int, rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``a [slots, in, rank]`` and ``b [slots, rank, out]`` grown to at least ``slots`` slots and ``rank`` (the new
    room is zeros, which add nothing), or ``None`` when they are that big already."""
    old_slots, old_rank = a.shape[0], a.shape[2]
    if slots <= old_slots and rank <= old_rank:
        return None
    slots, rank = max(slots, old_slots), max(rank, old_rank)
    new_a = a.new_zeros((slots, a.shape[1], rank))
    new_b = b.new_zeros((slots, rank, b.shape[2]))
    new_a[:old_slots, :, :old_rank] = a
    new_b[:old_slots, :old_rank] = b
    return new_a, new_b
