"""Many LoRA adapters on one model, applied per row of a batch with two batched matmuls per layer.

peft's ``adapter_names`` path loops over the adapters of a batch in every adapted layer (index, two matmuls,
scatter-add per adapter), so a batch over four adapters costs four times the LoRA work plus hundreds of small ops.
Here every adapted ``nn.Linear`` is wrapped once by ``LoraLinear``, which keeps *all* loaded adapters stacked in
one tensor per factor, slot 0 being "no adapter" (zeros)::

    A: [slots, in_features, rank]      B: [slots, rank, out_features]   (transposed; scaling folded into B; float32)
    y = base(x) + bmm(bmm(x, A[rows]), B[rows])      rows: slot of each batch row

so the cost does not grow with the number of distinct adapters in the batch, and a batch on the base alone skips
the LoRA work entirely. Loading an adapter reads its file and copies it into a free slot (milliseconds); unloading
zeroes the slot. Adapters of different ranks share the stack (smaller ones are zero-padded, which adds exact
zeros). Each row's numbers are its own: ``bmm`` computes rows independently. The LoRA factors are kept and applied
in float32 whatever the model's dtype: on CPU, float32 ``bmm`` at these shapes is about twice as fast as bf16, and
the delta is more exact (it is added to the bf16 base output in place).

``LoraBank`` is not thread-safe: the engine calls ``select``, ``install`` and ``remove`` on its own thread, between
steps. ``read_adapter`` (file reading and checks) may run on any thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file

from backends.lora_experts import (
    ExpertFactors,
    LoraExperts,
    check_experts,
    fold_per_expert,
    pattern_value,
    take_fused_factors,
)
from gateway.errors import AdapterLoadError

_M = TypeVar("_M", bound=torch.nn.Module)
_UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "layer_replication",
                "trainable_token_indices")
_PATTERNS = ("rank_pattern", "alpha_pattern")  # served on expert parameters (backends/lora_experts.py) only


@dataclass(frozen=True)
class AdapterWeights:
    """An adapter read from disk: ``module path -> (A [r, in], B*scaling [out, r])``, in float32.

    ``experts``: LoRA on fused expert parameters, ``parameter path -> (A [E, r, in], B*scaling [E, out, r])``.
    """

    name: str
    path: str
    rank: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    experts: ExpertFactors = field(default_factory=dict)


def read_adapter(name: str, path: str) -> AdapterWeights:
    """Read and check an adapter folder (safetensors, or ``adapter_model.bin`` loaded with ``weights_only``)."""
    folder = Path(path)
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"cannot read {folder}/adapter_config.json: {exc}") from exc
    used = [key for key in _UNSUPPORTED if config.get(key)]
    if used:
        raise AdapterLoadError(f"{folder}: the native backend does not support {', '.join(used)} in LoRA adapters")
    rank = int(config.get("r") or 0)
    alpha = float(config.get("lora_alpha") or rank)
    scaling = alpha / (rank**0.5 if config.get("use_rslora") else rank) if rank else 0.0
    try:
        if (folder / "adapter_model.safetensors").is_file():
            tensors = load_file(str(folder / "adapter_model.safetensors"))
        else:
            tensors = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated files raise many types
        raise AdapterLoadError(f"cannot read the weights in {folder}: {exc}") from exc
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stem, _, tail = key.removeprefix("base_model.model.").rpartition(".lora_")
        factor = tail.split(".", 1)[0]
        if factor not in ("A", "B") or not tail.endswith("weight"):
            raise AdapterLoadError(f"{folder}: unsupported tensor {key} (only LoRA on linear layers is served)")
        parts.setdefault(stem, {})[factor] = tensor
    experts = take_fused_factors(parts, config, str(folder))
    patterned = [stem for stem in parts for key in _PATTERNS if pattern_value(config.get(key) or {}, stem, None)]
    if patterned:
        raise AdapterLoadError(f"{folder}: the native backend does not support rank_pattern/alpha_pattern on "
                               f"linear layers ({patterned[0]})")
    factors = {}
    for module, pair in parts.items():
        if set(pair) != {"A", "B"} or pair["A"].dim() != 2 or pair["A"].shape[0] != pair["B"].shape[1]:
            raise AdapterLoadError(f"{folder}: {module} needs a lora_A [r, in] and a lora_B [out, r]")
        factors[module] = (pair["A"].float(), pair["B"].float() * scaling)
    if not factors and not experts:
        raise AdapterLoadError(f"{folder} holds no LoRA weights")
    return AdapterWeights(name, str(folder), max((a.shape[0] for a, _ in factors.values()), default=0), factors,
                          experts)


class RowSlots:
    """The slot of every row of the current forward pass, shared by all ``LoraLinear`` of one model.

    ``version`` changes whenever the rows or any adapter's weights change: a layer may keep its per-row gathered
    factors from the previous step while it is the same (decode steps of an unchanged batch), if ``keep_gathers``.
    """

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None  # None: every row is on the base
        self.version = 0
        self.keep_gathers = False


class LoraLinear(torch.nn.Module):
    """``base(x)`` plus each row's own LoRA delta (see the module docstring).

    The stacks are stored transposed, ``a: [slots, in, rank]`` and ``b: [slots, rank, out]``, so the per-row
    gathers are contiguous and feed ``bmm`` directly.
    """

    def __init__(self, base: torch.nn.Linear, slots: RowSlots) -> None:
        super().__init__()
        self.base = base
        self.slots = slots
        device = base.weight.device
        self.a = torch.zeros((1, base.in_features, 0), dtype=torch.float32, device=device)
        self.b = torch.zeros((1, 0, base.out_features), dtype=torch.float32, device=device)
        self._gathered: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (version, a[rows], b[rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.slots.rows
        if rows is None or self.a.shape[2] == 0:
            return y
        if self._gathered is not None and self._gathered[0] == self.slots.version:
            _, a, b = self._gathered
        else:
            a = self.a.index_select(0, rows)  # [batch, in, rank]
            b = self.b.index_select(0, rows)  # [batch, rank, out]
            self._gathered = (self.slots.version, a, b) if self.slots.keep_gathers else None
        return y.add_(torch.bmm(torch.bmm(x.float(), a), b))  # y is this call's own fresh output

    @property
    def row_bytes(self) -> int:
        """Bytes of one row's gathered factors."""
        return 4 * (self.a.shape[1] * self.a.shape[2] + self.b.shape[1] * self.b.shape[2])

    def reserve(self, slots: int, rank: int) -> None:
        """Grow the stacks to at least ``slots`` slots and ``rank`` (new room is zeros)."""
        old_slots, old_rank = self.a.shape[0], self.a.shape[2]
        if slots <= old_slots and rank <= old_rank:
            return
        slots, rank = max(slots, old_slots), max(rank, old_rank)
        a = self.a.new_zeros((slots, self.a.shape[1], rank))
        b = self.b.new_zeros((slots, rank, self.b.shape[2]))
        a[:old_slots, :, :old_rank] = self.a
        b[:old_slots, :old_rank] = self.b
        self.a, self.b = a, b

    def write(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Put one adapter's factors (``a [r, in]``, ``b [out, r]``) in ``slot``; zeros when ``None``."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        if a is not None and b is not None:
            self.a[slot, :, : a.shape[0]] = a.t()
            self.b[slot, : b.shape[1]] = b.t()


class LoraBank:
    """The adapters installed on ``model``, each in a slot of every adapted layer.

    ``gather_budget``: most bytes of per-row gathered factors the layers may keep between steps (see ``RowSlots``);
    larger batches gather afresh in every forward pass.
    """

    def __init__(self, model: torch.nn.Module, gather_budget: int = 128 << 20) -> None:
        self.model = model
        self.gather_budget = gather_budget
        self._slots = RowSlots()
        self._last: list[int] | None = None
        self._layers: dict[str, LoraLinear] = {}
        self._experts: dict[str, LoraExperts] = {}  # fused experts module path -> its wrapper
        self._slot_of: dict[str, int] = {}  # adapter name -> slot (>= 1)
        self._capacity = 1

    @property
    def names(self) -> list[str]:
        return list(self._slot_of)

    def select(self, adapters: list[str | None]) -> None:
        """Set the adapter of every row of the next forward pass (``None``: the base)."""
        slots = [0 if a is None else self._slot_of[a] for a in adapters]
        if slots == self._last:
            return
        self._last = slots
        self._slots.version += 1
        if not any(slots):
            self._slots.rows = None
        else:
            device = next(self.model.parameters()).device
            self._slots.rows = torch.tensor(slots, dtype=torch.long, device=device)
            row_bytes = sum(layer.row_bytes for layer in self._layers.values())
            self._slots.keep_gathers = len(slots) * row_bytes <= self.gather_budget

    def install(self, weights: AdapterWeights) -> None:
        """Install (or replace) ``weights.name``. Every module is checked before anything changes."""
        modules = dict(self.model.named_modules())
        folded, per_expert = fold_per_expert(weights.factors, modules, weights.path)
        linears = {path: pair for path, pair in weights.factors.items() if path not in per_expert}
        experts: dict[str, ExpertFactors] = {}
        for key, factors in {**weights.experts, **folded}.items():
            experts.setdefault(key.rpartition(".")[0], {})[key.rpartition(".")[2]] = factors
        for path, named in experts.items():
            check_experts(path, modules.get(path), {f"{path}.{n}": f for n, f in named.items()}, weights.path)
        for path, (a, b) in linears.items():
            layer = self._layers.get(path) or modules.get(path)
            linear = layer.base if isinstance(layer, LoraLinear) else layer
            if not isinstance(linear, torch.nn.Linear):
                raise AdapterLoadError(f"{weights.path}: {path} is not a linear layer of the served model")
            if a.shape[1] != linear.in_features or b.shape[0] != linear.out_features:
                raise AdapterLoadError(f"{weights.path}: {path} is {linear.out_features}x{linear.in_features}, the "
                                       f"adapter's factors are {tuple(a.shape)} and {tuple(b.shape)}")
        for path in linears:
            if path not in self._layers:
                self._wrap(path)
        for path in experts:
            if path not in self._experts:
                self._experts[path] = self._wrap_module(path, lambda base: LoraExperts(base, self._slots))
        slot = self._slot_of.get(weights.name) or self._free_slot()
        for path, layer in self._layers.items():
            layer.reserve(self._capacity, weights.rank)
            pair = linears.get(path)
            layer.write(slot, *(pair if pair is not None else (None, None)))
        for path, wrapper in self._experts.items():
            mine = experts.get(path, {})
            wrapper.reserve(self._capacity, {name: a.shape[1] for name, (a, _) in mine.items()})
            wrapper.write(slot, mine)
        self._slot_of[weights.name] = slot
        self._changed()

    def remove(self, name: str) -> None:
        slot = self._slot_of.pop(name, None)
        if slot is not None:
            for layer in self._layers.values():
                layer.write(slot, None, None)
            for wrapper in self._experts.values():
                wrapper.write(slot, {})
            self._changed()

    def _changed(self) -> None:
        """Weights changed: no layer may reuse factors gathered before."""
        self._last = None
        self._slots.version += 1

    def _free_slot(self) -> int:
        used = set(self._slot_of.values())
        slot = next(s for s in range(1, self._capacity + 1) if s not in used)
        if slot == self._capacity:
            self._capacity = max(slot + 1, self._capacity * 2)
        return slot

    def _wrap(self, path: str) -> None:
        layer = self._wrap_module(path, lambda base: LoraLinear(base, self._slots))
        layer.reserve(self._capacity, 0)
        self._layers[path] = layer

    def _wrap_module(self, path: str, wrap: Callable[[Any], _M]) -> _M:
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        wrapper = wrap(getattr(parent, child))
        setattr(parent, child, wrapper)
        return wrapper
