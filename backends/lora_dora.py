"""Per-slot output terms of a ``LoraLinear``: DoRA's magnitude rescaling and LoRA-B biases (``lora_bias``).

DoRA (peft 0.21, ``DoraLinearLayer``), in eval mode (dropout is the identity), for base weight ``W``, bias ``c``,
scaling ``s`` and magnitude ``m``::

    g = m / ||W + s·B·A||          (L2 norm of each output feature's row; a constant, "detached")
    y = W·x + c + (g - 1)·(W·x) + g·s·B·A·x

The factor ``g`` is folded into the slot's stacked ``B`` at install, so a DoRA row's LoRA delta is computed by the
same two ``bmm`` as any row; what is left is one per-slot output scale, ``(g - 1) * (base(x) - c)``. A plain LoRA
with ``lora_bias`` adds ``s·b`` (its scaled LoRA-B bias) per output feature. Both live in per-slot tables here;
slots without them hold zeros, and a batch whose rows use none of them skips this work entirely.
"""

from __future__ import annotations

import torch


def dora_factor(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """``g = m / ||W + B·A||`` per output feature, in float32 on ``a``'s device (``b`` carries the scaling).

    Computed where the weight is (a GPU's weights are not copied to the host)."""
    device = weight.device
    norm = torch.linalg.norm(weight.float() + b.to(device) @ a.to(device), dim=1)
    return (magnitude.to(device).float() / norm).to(a.device)


class OutputTerms:
    """``scale: [slots, out]`` (``g - 1`` of DoRA slots) and ``shift: [slots, out]`` (``s·b`` of lora_bias slots).

    ``scaled`` and ``shifted`` are the slots that have a term: the only ones whose rows pay for it.
    """

    def __init__(self, out_features: int, device: torch.device) -> None:
        self.scale = torch.zeros((1, out_features), dtype=torch.float32, device=device)
        self.shift = torch.zeros((1, out_features), dtype=torch.float32, device=device)
        self.scaled: set[int] = set()
        self.shifted: set[int] = set()

    def reserve(self, slots: int) -> None:
        if slots <= self.scale.shape[0]:
            return
        grow = slots - self.scale.shape[0]
        self.scale = torch.cat([self.scale, self.scale.new_zeros((grow, self.scale.shape[1]))])
        self.shift = torch.cat([self.shift, self.shift.new_zeros((grow, self.shift.shape[1]))])

    def write(self, slot: int, scale: torch.Tensor | None, shift: torch.Tensor | None) -> None:
        """Set ``slot``'s terms (``None``: none)."""
        for table, owners, value in ((self.scale, self.scaled, scale), (self.shift, self.shifted, shift)):
            table[slot].zero_()
            owners.discard(slot)
            if value is not None:
                table[slot] = value
                owners.add(slot)

    def apply(self, y: torch.Tensor, rows: torch.Tensor, slots: list[int], bias: torch.Tensor | None) -> torch.Tensor:
        """``y`` (the base layer's output, rows first) plus the rows' terms, in place."""
        used = set(slots)
        shape = (rows.shape[0], *([1] * (y.dim() - 2)), y.shape[-1])
        if not self.scaled.isdisjoint(used):
            base = y.float() if bias is None else y.float() - bias.float()
            y.add_((self.scale.index_select(0, rows).view(shape) * base).to(y.dtype))
        if not self.shifted.isdisjoint(used):
            y.add_(self.shift.index_select(0, rows).view(shape).to(y.dtype))
        return y

    @property
    def active(self) -> bool:
        return bool(self.scaled or self.shifted)
