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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from backends.lora_layout import row_layout
from backends.lora_names import model_renamer
from gateway.errors import AdapterLoadError

_UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern",
                "layer_replication", "trainable_token_indices")


@dataclass(frozen=True)
class AdapterWeights:
    """An adapter read from disk: ``module path -> (A [r, in], B*scaling [out, r])``, in float32."""

    name: str
    path: str
    rank: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]


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
    factors = {}
    for module, pair in parts.items():
        if set(pair) != {"A", "B"} or pair["A"].dim() != 2 or pair["A"].shape[0] != pair["B"].shape[1]:
            raise AdapterLoadError(f"{folder}: {module} needs a lora_A [r, in] and a lora_B [out, r]")
        factors[module] = (pair["A"].float(), pair["B"].float() * scaling)
    if not factors:
        raise AdapterLoadError(f"{folder} holds no LoRA weights")
    return AdapterWeights(name, str(folder), max(a.shape[0] for a, _ in factors.values()), factors)


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
        # An input grouped by row, row outermost ([rows, seq, in], [rows*seq, in], [rows, 1, kv, in]), is a
        # [rows, -1, in] view: no copy, and not even a view on the common 3-D path. ``LoraBank.install`` refuses
        # layers whose input is not so grouped (``backends.lora_layout``).
        rows_first = x if x.dim() == 3 and x.shape[0] == rows.shape[0] else x.reshape(rows.shape[0], -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(rows_first.float(), a), b)
        return y.add_(delta.view(y.shape))  # y is this call's own fresh output

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
        self._slot_of: dict[str, int] = {}  # adapter name -> slot (>= 1)
        self._capacity = 1
        self._layout: dict[str, str | None] | None = None  # see _row_layout

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
            device = next(iter(self._layers.values())).a.device
            self._slots.rows = torch.tensor(slots, dtype=torch.long, device=device)
            row_bytes = sum(layer.row_bytes for layer in self._layers.values())
            self._slots.keep_gathers = len(slots) * row_bytes <= self.gather_budget

    def install(self, weights: AdapterWeights) -> None:
        """Install (or replace) ``weights.name``. Every module is checked before anything changes.

        Module names the served model does not have are renamed as transformers renames checkpoint weights on load
        (``backends.lora_names``: EXAONE's ``transformer.h.N.attn.attention.q_proj`` is ``model.layers.N.self_attn
        .q_proj``). A linear layer whose input is not grouped by batch row (``backends.lora_layout``; the model is
        probed once, at the first install) is refused, naming the layer and why.
        """
        rename = model_renamer(self.model)
        named = {rename(path): path for path in weights.factors}  # served name -> the adapter's
        if len(named) != len(weights.factors):
            raise AdapterLoadError(f"{weights.path}: two of its modules name the same layer of the served model")
        factors = {path: weights.factors[original] for path, original in named.items()}
        modules = dict(self.model.named_modules())
        for path, original in named.items():
            layer = self._layers.get(path) or modules.get(path)
            shown = path if path == original else f"{original} (the served model's {path})"
            _check_target(weights.path, type(self.model).__name__, shown,
                          layer.base if isinstance(layer, LoraLinear) else layer, *factors[path])
        layout = self._row_layout(weights.path)
        for path in factors:
            if layout.get(path):
                raise AdapterLoadError(f"{weights.path}: the served model's {path} cannot take a LoRA per request: "
                                       f"{layout[path]}")
        for path in factors:
            if path not in self._layers:
                self._wrap(path)
        slot = self._slot_of.get(weights.name) or self._free_slot()
        for path, layer in self._layers.items():
            layer.reserve(self._capacity, weights.rank)
            pair = factors.get(path)
            layer.write(slot, *(pair if pair is not None else (None, None)))
        self._slot_of[weights.name] = slot
        self._changed()

    def remove(self, name: str) -> None:
        slot = self._slot_of.pop(name, None)
        if slot is not None:
            for layer in self._layers.values():
                layer.write(slot, None, None)
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

    def _row_layout(self, adapter_path: str) -> dict[str, str | None]:
        """Every linear layer's ``lora_layout`` verdict, probed at the first call (with LoRA off) and kept."""
        if self._layout is None:
            wrapped = {f"{path}.base" for path in self._layers}
            layers = {path: module for path, module in self.model.named_modules()
                      if isinstance(module, (torch.nn.Linear, LoraLinear)) and path not in wrapped}
            rows, self._slots.rows = self._slots.rows, None
            try:
                self._layout = row_layout(self.model, layers)
            except Exception as exc:  # whatever the model raises: then it could not generate either
                raise AdapterLoadError(f"{adapter_path}: cannot check how the served model's layers see the batch: "
                                       f"a probe forward pass failed ({type(exc).__name__}: {exc})") from exc
            finally:
                self._slots.rows = rows
        return self._layout

    def _wrap(self, path: str) -> None:
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        layer = LoraLinear(getattr(parent, child), self._slots)
        layer.reserve(self._capacity, 0)
        setattr(parent, child, layer)
        self._layers[path] = layer


def _check_target(adapter_path: str, model_class: str, shown: str, linear: torch.nn.Module | None, a: torch.Tensor,
                  b: torch.Tensor) -> None:
    """Refuse, saying what the served model has at the module ``shown`` and what the adapter wants there."""
    wants = f"the adapter has a LoRA for {shown} from {a.shape[1]} to {b.shape[0]} features (rank {a.shape[0]})"
    if linear is None:
        raise AdapterLoadError(f"{adapter_path}: {wants}, but the served model ({model_class}) has no such module")
    if not isinstance(linear, torch.nn.Linear):
        raise AdapterLoadError(f"{adapter_path}: {wants}, but the served model has a "
                               f"{type(linear).__name__} there, not an nn.Linear; the native backend adapts linear "
                               "layers only")
    if a.shape[1] != linear.in_features or b.shape[0] != linear.out_features:
        raise AdapterLoadError(f"{adapter_path}: {wants}, but the served model has an nn.Linear from "
                               f"{linear.in_features} to {linear.out_features} features there (trained on another "
                               "model size?)")
