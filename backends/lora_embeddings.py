"""Per-row input embeddings and output heads: ``modules_to_save`` (LLaMA-Factory's ``additional_target``, e.g.
``embed_tokens`` and ``lm_head`` after ``resize_vocab`` or new special tokens) and LoRA on the embedding.

peft gives an adapter with ``modules_to_save`` its own copy of the module; here each such adapter's slot holds its
own weight **in the model's dtype** (a 7B's ``lm_head`` is about 1 GB in bf16 per adapter: that is what such an
adapter costs), and only the rows of that slot use it: ``RowEmbedding`` looks their tokens up in it, ``RowHead``
computes their logits with it; every other row goes through the base module. Tied embeddings stay as peft has them:
a saved ``embed_tokens`` changes the input only, a saved ``lm_head`` the output only (peft saves both when both were
trained). An adapter whose saved embedding or head has a different number of rows than the base (a vocabulary
resized beyond the base's) is refused: its rows would need logits of another width than the batch's.

``trainable_token_indices`` (peft's trainable tokens) gives some token ids new rows: a row of that adapter looks
those ids up in them, and its logits for those ids come from them when the head is tied to the embedding (peft ties
them unless told otherwise) or has rows of its own; nothing else is copied.

LoRA on an embedding (``lora_embedding_A [r, vocab]``, ``lora_embedding_B [dim, r]``) is stacked per slot like a
``LoraLinear``'s factors: ``y = embed(ids) + bmm(A[slot of row][ids], B[slot of row]·s)``, in float32. When peft
saved the embedding's ``base_layer.weight`` with it and that differs from the served base's, it is used like a
``modules_to_save`` weight (peft loads it into the base layer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.func import functional_call

from backends.lora_stacks import grown
from gateway.errors import AdapterLoadError

if TYPE_CHECKING:
    from backends.lora import AdapterWeights, RowSlots


def _rows_of(slots: list[int], slot: int, device: torch.device) -> torch.Tensor | None:
    picked = [row for row, s in enumerate(slots) if s == slot]
    return torch.tensor(picked, dtype=torch.long, device=device) if picked else None


class RowEmbedding(torch.nn.Module):
    """The model's input embedding with per-slot own weights and per-slot LoRA factors (module docstring)."""

    def __init__(self, base: torch.nn.Embedding, slots: RowSlots) -> None:
        super().__init__()
        self.base = base
        self.slots = slots
        self.own: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (row of each id or -1, rows)
        device = base.weight.device
        self.a = torch.zeros((1, base.num_embeddings, 0), dtype=torch.float32, device=device)
        self.b = torch.zeros((1, 0, base.embedding_dim), dtype=torch.float32, device=device)

    @property
    def weight(self) -> torch.Tensor:  # what callers of ``get_input_embeddings().weight`` read: the base's
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)
        rows = self.slots.rows
        if rows is None:
            return y
        for slot, weight in self.own.items():
            picked = _rows_of(self.slots.slots, slot, ids.device)
            if picked is not None:  # the module's own forward (scaled embeddings scale), with the slot's weight
                y[picked] = functional_call(self.base, {"weight": weight}, (ids[picked],))
        scale = _embed_scale(self.base)
        for slot, (where, rows_of_ids) in self.tokens.items():
            picked = _rows_of(self.slots.slots, slot, ids.device)
            if picked is not None:  # the new rows where those ids are (peft: F.embedding, then the module's scale)
                position = where[ids[picked]]
                new = torch.nn.functional.embedding(position.clamp(min=0), rows_of_ids)
                new = new if scale is None else new * scale.to(new.dtype)
                y[picked] = torch.where((position >= 0).unsqueeze(-1), new, y[picked])
        if self.a.shape[2]:
            looked_up = self.a[rows.view(-1, *([1] * (ids.dim() - 1))), ids]  # [batch, seq, rank]
            delta = torch.bmm(looked_up.view(rows.shape[0], -1, self.a.shape[2]), self.b.index_select(0, rows))
            delta = delta if scale is None else delta * scale.to(delta.dtype)
            y = y + delta.view(y.shape).to(y.dtype)
        return y

    def reserve(self, slots: int, rank: int) -> None:
        stacks = grown(self.a, self.b, slots, rank)
        if stacks is not None:
            self.a, self.b = stacks

    def write(self, slot: int, weight: torch.Tensor | None, factors: tuple[torch.Tensor, torch.Tensor] | None,
              tokens: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.own.pop(slot, None)
        self.tokens.pop(slot, None)
        if tokens is not None:
            ids, rows = tokens
            where = torch.full((self.base.num_embeddings,), -1, dtype=torch.long, device=self.base.weight.device)
            where[ids.to(where.device)] = torch.arange(len(ids), device=where.device)
            self.tokens[slot] = (where, rows.to(self.base.weight.device, self.base.weight.dtype))
        if weight is not None:
            self.own[slot] = weight.to(self.base.weight.dtype).to(self.base.weight.device)
        self.a[slot].zero_()
        self.b[slot].zero_()
        if factors is not None:
            a, b = factors
            self.a[slot, :, : a.shape[0]] = a.t()
            self.b[slot, : b.shape[1]] = b.t()


class RowHead(torch.nn.Module):
    """The model's output head (``nn.Linear``, or a ``LoraLinear`` around it) with per-slot own weights."""

    def __init__(self, base: torch.nn.Module, slots: RowSlots) -> None:
        super().__init__()
        self.base = base
        self.slots = slots
        self.own: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.tokens: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (token ids, their rows)

    @property
    def weight(self) -> torch.Tensor:  # what callers of ``get_output_embeddings().weight`` read (its shape)
        return self.linear.weight

    @property
    def linear(self) -> torch.nn.Linear:
        inner = getattr(self.base, "base", self.base)
        assert isinstance(inner, torch.nn.Linear)
        return inner

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        slots = self.slots.slots
        if self.slots.rows is None:
            return self.base(hidden)
        out = self._logits(hidden, slots)
        for slot in {s for s in slots if s in self.tokens}:  # peft: F.linear with those rows swapped in, no bias
            picked = _rows_of(slots, slot, hidden.device)
            ids, rows = self.tokens[slot]
            part = out[picked]
            part[..., ids] = torch.nn.functional.linear(hidden[picked], rows)
            out[picked] = part
        return out

    def _logits(self, hidden: torch.Tensor, slots: list[int]) -> torch.Tensor:
        owned = {s for s in slots if s in self.own}
        if not owned:
            return self.base(hidden)
        weight = self.linear.weight
        out = hidden.new_empty((*hidden.shape[:-1], weight.shape[0]), dtype=weight.dtype)
        others = [row for row, s in enumerate(slots) if s not in owned]
        if others:  # through the base (and its LoRA rows)
            index = torch.tensor(others, dtype=torch.long, device=hidden.device)
            if self.base is self.linear:
                out[index] = self.base(hidden.index_select(0, index))
            else:
                out[index] = self._base_rows(hidden, index, [slots[r] for r in others])
        for slot in owned:
            picked = _rows_of(slots, slot, hidden.device)
            own_weight, own_bias = self.own[slot]
            out[picked] = torch.nn.functional.linear(hidden[picked], own_weight, own_bias)
        return out

    def _base_rows(self, hidden: torch.Tensor, index: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """``base(hidden[index])`` (a ``LoraLinear``) with the row slots narrowed to those rows for the call."""
        saved = self.slots.rows, self.slots.slots, self.slots.version
        self.slots.rows, self.slots.slots = saved[0].index_select(0, index), slots  # type: ignore[union-attr]
        self.slots.version += 1  # a LoraLinear must not reuse the full batch's gathers
        try:
            return self.base(hidden.index_select(0, index))
        finally:
            self.slots.rows, self.slots.slots = saved[0], saved[1]
            self.slots.version += 1

    def write(self, slot: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
              tokens: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.own.pop(slot, None)
        self.tokens.pop(slot, None)
        if tokens is not None:
            device, dtype = self.linear.weight.device, self.linear.weight.dtype
            self.tokens[slot] = (tokens[0].to(device), tokens[1].to(device, dtype))
        if weight is not None:
            base = self.linear.weight
            self.own[slot] = (weight.to(base.dtype).to(base.device),
                              None if bias is None else bias.to(base.dtype).to(base.device))


def check_tokens(weights: AdapterWeights, model: torch.nn.Module) -> None:
    """Refuse (``AdapterLoadError``) an adapter's own weights or embedding LoRA that the served model cannot take."""
    input_path, output_path = embedding_paths(model)
    for path, tensors in weights.modules.items():
        if path not in (input_path, output_path):
            raise AdapterLoadError(f"{weights.path}: modules_to_save {path}: only the input embedding and the output "
                                   "head can be served per row")
        reference = _weight_of(model, path)
        weight = tensors.get("weight")
        if weight is None or set(tensors) - {"weight", "bias"}:
            raise AdapterLoadError(f"{weights.path}: modules_to_save {path} holds {sorted(tensors)}, not a weight")
        if tuple(weight.shape) != tuple(reference.shape):
            raise AdapterLoadError(
                f"{weights.path}: {path} is {tuple(weight.shape)} in the adapter but {tuple(reference.shape)} in the "
                "served base (a vocabulary resized in training); serve a merged export of the adapter, or a base "
                "whose embeddings were resized the same way")
        if path in weights.factors and not _same(weight, reference):
            raise AdapterLoadError(f"{weights.path}: the adapter's saved base weight of {path} differs from the "
                                   "served base's (LoRA on it needs that base)")
    for path, (ids, rows) in weights.token_rows.items():
        if path not in (input_path, output_path):
            raise AdapterLoadError(f"{weights.path}: trainable_token_indices on {path}: only the input embedding and "
                                   "the output head are served")
        reference = _weight_of(model, path)
        if rows.shape[1] != reference.shape[1] or int(ids.max()) >= reference.shape[0] or int(ids.min()) < 0:
            raise AdapterLoadError(f"{weights.path}: trainable tokens of {path} do not fit its "
                                   f"{tuple(reference.shape)}")
        if path == output_path and getattr(_plain(model.get_submodule(path)), "bias", None) is not None:
            raise AdapterLoadError(f"{weights.path}: trainable tokens on a head with a bias are not served")
    for path, (a, b) in weights.embedding_factors.items():
        if path != input_path:
            raise AdapterLoadError(f"{weights.path}: {path} has embedding LoRA but is not the model's input embedding")
        reference = _weight_of(model, path)
        if a.shape[1] != reference.shape[0] or b.shape[0] != reference.shape[1]:
            raise AdapterLoadError(f"{weights.path}: {path} is {tuple(reference.shape)}, the adapter's embedding "
                                   f"factors are {tuple(a.shape)} and {tuple(b.shape)}")


def _embed_scale(embedding: torch.nn.Module) -> torch.Tensor | None:
    """The scale a scaled embedding (Gemma's) applies in its forward, as peft's ``_get_embed_scale`` finds it."""
    scale = getattr(embedding, "embed_scale", None)
    if isinstance(scale, int | float):
        return torch.tensor(scale, device=embedding.weight.device, dtype=embedding.weight.dtype)  # type: ignore[arg-type]
    return scale if isinstance(scale, torch.Tensor) and scale.numel() == 1 else None


def _same(saved: torch.Tensor, served: torch.Tensor) -> bool:
    return tuple(saved.shape) == tuple(served.shape) and torch.equal(saved.to(served.device, served.dtype), served)


def embedding_paths(model: torch.nn.Module) -> tuple[str | None, str | None]:
    """The module paths of the input embedding and of the output head (``None`` where the model has none)."""
    found: list[str | None] = []
    for target in (model.get_input_embeddings(), model.get_output_embeddings()):  # type: ignore[operator]
        found.append(next((path for path, module in model.named_modules() if module is target), None)
                     if target is not None else None)
    return found[0], found[1]


def _weight_of(model: torch.nn.Module, path: str) -> torch.Tensor:
    weight = _plain(model.get_submodule(path)).weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _plain(module: torch.nn.Module) -> torch.nn.Module:
    """The module a ``RowEmbedding`` / ``RowHead`` / ``LoraLinear`` wraps, else the module itself."""
    while isinstance(module, RowEmbedding | RowHead) or type(module).__name__ == "LoraLinear":
        module = module.base  # type: ignore[assignment]
    return module


class TokenModules:
    """The ``RowEmbedding`` / ``RowHead`` wrappers of one model, created when an adapter first needs them."""

    def __init__(self, model: torch.nn.Module, slots: RowSlots) -> None:
        self.model = model
        self.slots = slots
        self.embedding: RowEmbedding | None = None
        self.head: RowHead | None = None

    def install(self, slot: int, weights: AdapterWeights, capacity: int) -> None:
        """Write ``weights``' embedding and head parts into ``slot`` (checked before by ``check_tokens``)."""
        input_path, output_path = embedding_paths(self.model)
        own_input = weights.modules.get(input_path or "", {}).get("weight")
        if own_input is not None and _same(own_input, self._weight(input_path)):
            own_input = None  # the embedding's base_layer saved as the base has it: nothing of its own
        factors = weights.embedding_factors.get(input_path or "")
        tokens = weights.token_rows.get(input_path or "")
        if self.embedding is None and input_path is not None and (own_input, factors, tokens) != (None, None, None):
            self.embedding = self._wrap(input_path, RowEmbedding)  # type: ignore[assignment]
        if self.embedding is not None:
            self.embedding.reserve(capacity, 0 if factors is None else factors[0].shape[0])
            self.embedding.write(slot, own_input, factors, tokens)
        head_tokens = weights.token_rows.get(output_path or "")
        if head_tokens is None and tokens is not None and output_path is not None and input_path is not None \
                and self._weight(output_path) is self._weight(input_path):
            head_tokens = tokens  # a head tied to the embedding shares its trainable tokens (as peft ties them)
        head = weights.modules.get(output_path or "", {})
        if "weight" in head and "bias" not in head and _same(head["weight"], self._weight(output_path)):
            head = {}  # a saved base_layer (LoRA on the head) or an untrained copy: the base's own
        if self.head is None and (head or head_tokens is not None) and output_path is not None:
            self.head = self._wrap(output_path, RowHead)  # type: ignore[assignment]
        if self.head is not None:
            self.head.write(slot, head.get("weight"), head.get("bias"), head_tokens)

    def clear(self, slot: int) -> None:
        if self.embedding is not None:
            self.embedding.write(slot, None, None)
        if self.head is not None:
            self.head.write(slot, None, None)

    def _weight(self, path: str | None) -> torch.Tensor:
        return _weight_of(self.model, path or "")

    def _wrap(self, path: str, kind: type[RowEmbedding] | type[RowHead]) -> torch.nn.Module:
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        wrapper = kind(getattr(parent, child), self.slots)  # type: ignore[arg-type]
        setattr(parent, child, wrapper)
        return wrapper
