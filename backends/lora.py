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

The variants of peft's ``LoraConfig`` are read by ``backends.lora_config`` / ``lora_files`` (rsLoRA, rank and
alpha patterns, and the refusals, with reasons), served per row by ``backends.lora_dora`` (DoRA, ``lora_bias``: a
per-slot output term, skipped by batches that do not use it) and ``backends.lora_embeddings`` (``modules_to_save`` on
the embedding / head, trainable tokens, LoRA on embeddings).

``LoraBank`` is not thread-safe: the engine calls ``select``, ``install`` and ``remove`` on its own thread, between
steps. ``read_adapter`` (file reading and checks) may run on any thread.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file

from backends.lora_config import check_config, module_scaling, token_indices
from backends.lora_dora import OutputTerms, dora_factor
from backends.lora_embeddings import RowHead, TokenModules, check_tokens
from backends.lora_experts import ExpertFactors, LoraExperts, check_experts, fold_per_expert, take_fused_factors
from backends.lora_files import sort_tensors
from backends.lora_layout import row_layout
from backends.lora_names import model_renamer
from backends.lora_stacks import grown
from gateway.errors import AdapterLoadError

_T = TypeVar("_T")
_M = TypeVar("_M", bound=torch.nn.Module)


@dataclass(frozen=True)
class AdapterWeights:
    """An adapter read from disk: ``module path -> (A [r, in], B*scaling [out, r])``, in float32.

    Optional parts (see ``backends.lora_config``): ``magnitudes`` (DoRA's ``m [out]`` per module), ``biases``
    (``lora_bias``: scaling times LoRA-B's bias ``[out]``), ``modules`` (``modules_to_save``, or an embedding's saved
    ``base_layer``: module path -> its own ``weight`` / ``bias``) and ``embedding_factors`` (LoRA on an embedding:
    ``(A [r, vocab], B*scaling [dim, r])``) and ``token_rows`` (``trainable_token_indices``: module path ->
    ``(token ids [k], their rows [k, dim])``).
    ``experts``: LoRA on fused expert parameters, ``parameter path -> (A [E, r, in], B*scaling [E, out, r])``
    (``backends.lora_experts``).
    """

    name: str
    path: str
    rank: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    embedding_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    token_rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    experts: ExpertFactors = field(default_factory=dict)


def read_adapter(name: str, path: str) -> AdapterWeights:
    """Read and check an adapter folder (safetensors, or ``adapter_model.bin`` loaded with ``weights_only``)."""
    folder = Path(path)
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"cannot read {folder}/adapter_config.json: {exc}") from exc
    check_config(config, str(folder))
    try:
        if (folder / "adapter_model.safetensors").is_file():
            tensors = load_file(str(folder / "adapter_model.safetensors"))
        else:
            tensors = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated files raise many types
        raise AdapterLoadError(f"cannot read the weights in {folder}: {exc}") from exc
    parts = sort_tensors(tensors, config, str(folder))
    experts = take_fused_factors(parts.linear, config, str(folder))  # LoRA on fused MoE expert parameters
    factors, embedding_factors, biases = {}, {}, {}
    for module, pair in parts.linear.items():
        if set(pair) - {"A", "B", "B.bias"} or {"A", "B"} - set(pair) or pair["A"].dim() != 2 \
                or pair["A"].shape[0] != pair["B"].shape[1]:
            raise AdapterLoadError(f"{folder}: {module} needs a lora_A [r, in] and a lora_B [out, r]")
        scaling = module_scaling(config, module, pair["A"].shape[0], str(folder))
        factors[module] = (pair["A"].float(), pair["B"].float() * scaling)
        if "B.bias" in pair:
            biases[module] = pair["B.bias"].float() * scaling
    for module, pair in parts.embedding.items():
        if set(pair) != {"A", "B"} or pair["A"].dim() != 2 or pair["A"].shape[0] != pair["B"].shape[1]:
            raise AdapterLoadError(f"{folder}: {module} needs a lora_embedding_A [r, vocab] and a lora_embedding_B")
        scaling = module_scaling(config, module, pair["A"].shape[0], str(folder))
        embedding_factors[module] = (pair["A"].float(), pair["B"].float() * scaling)
    if set(parts.magnitudes) & set(embedding_factors):
        raise AdapterLoadError(f"{folder}: use_dora on an embedding ({', '.join(sorted(embedding_factors))}) is not "
                               "served (DoRA is served on linear layers)")
    if config.get("use_dora"):
        missing = sorted(set(factors) - set(parts.magnitudes))
        if missing or set(parts.magnitudes) - set(factors):
            raise AdapterLoadError(f"{folder}: use_dora needs a lora_magnitude_vector for every LoRA linear layer and "
                                   f"no other ({', '.join(missing or sorted(set(parts.magnitudes) - set(factors)))})")
    elif parts.magnitudes:
        raise AdapterLoadError(f"{folder}: lora_magnitude_vector weights but use_dora is not set")
    token_rows = {}
    for module, rows in parts.token_rows.items():
        ids = token_indices(config, module, str(folder))
        if rows.dim() != 2 or rows.shape[0] != len(ids):
            raise AdapterLoadError(f"{folder}: {module} has {tuple(rows.shape)} trainable token rows for {len(ids)} "
                                   "ids")
        token_rows[module] = (torch.tensor(ids, dtype=torch.long), rows)
    if not (factors or embedding_factors or parts.modules or token_rows or experts):
        raise AdapterLoadError(f"{folder} holds no LoRA weights")
    rank = max((a.shape[0] for a, _ in factors.values()), default=0)
    return AdapterWeights(name, str(folder), rank, factors, {k: v.float() for k, v in parts.magnitudes.items()},
                          biases, parts.modules, embedding_factors, token_rows, experts)


class RowSlots:
    """The slot of every row of the current forward pass, shared by all ``LoraLinear`` of one model.

    ``version`` changes whenever the rows or any adapter's weights change: a layer may keep its per-row gathered
    factors from the previous step while it is the same (decode steps of an unchanged batch), if ``keep_gathers``.
    """

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None  # None: every row is on the base
        self.slots: list[int] = []  # the same, as a list (which slots a batch uses, without a device sync)
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
        self.terms = OutputTerms(base.out_features, device)  # DoRA / lora_bias slots (backends.lora_dora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.slots.rows
        if rows is None or (self.a.shape[2] == 0 and not self.terms.active):
            return y
        if self._gathered is not None and self._gathered[0] == self.slots.version:
            _, a, b = self._gathered
        else:
            a = self.a.index_select(0, rows)  # [batch, in, rank]
            b = self.b.index_select(0, rows)  # [batch, rank, out]
            self._gathered = (self.slots.version, a, b) if self.slots.keep_gathers else None
        # An input grouped by row, row outermost ([rows, seq, in], [rows*seq, in], [rows, 1, kv, in]), is a
        # [rows, -1, in] view: no copy, and not even a view on the common 3-D path. ``LoraBank.install`` refuses
        # layers whose input is not so grouped (``backends.lora_layout``). The output is viewed the same way.
        if x.dim() == 3 and x.shape[0] == rows.shape[0]:
            x_rows, y_rows = x, y
        else:
            x_rows = x.reshape(rows.shape[0], -1, x.shape[-1])
            y_rows = y.view(rows.shape[0], -1, y.shape[-1])
        if self.terms.active:
            self.terms.apply(y_rows, rows, self.slots.slots, self.base.bias)  # in place
        y_rows.add_(torch.bmm(torch.bmm(x_rows.float(), a), b))  # y is this call's own fresh output
        return y

    @property
    def row_bytes(self) -> int:
        """Bytes of one row's gathered factors."""
        return 4 * (self.a.shape[1] * self.a.shape[2] + self.b.shape[1] * self.b.shape[2])

    def reserve(self, slots: int, rank: int) -> None:
        """Grow the stacks to at least ``slots`` slots and ``rank`` (new room is zeros)."""
        stacks = grown(self.a, self.b, slots, rank)
        if stacks is not None:
            self.a, self.b = stacks
        self.terms.reserve(slots)

    def write(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Put one adapter's factors (``a [r, in]``, ``b [out, r]``) in ``slot``; zeros when ``None``."""
        self.terms.write(slot, None, None)
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
        self._tokens = TokenModules(model, self._slots)
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
        self._slots.slots = slots
        if not any(slots):
            self._slots.rows = None
        else:
            device = next(self.model.parameters()).device
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
        weights, named = _renamed(weights, model_renamer(self.model))
        modules = dict(self.model.named_modules())
        folded, per_expert = fold_per_expert(weights.factors, modules, weights.path)
        linears = {path: pair for path, pair in weights.factors.items() if path not in per_expert}
        if set(per_expert) & (set(weights.magnitudes) | set(weights.biases)):
            raise AdapterLoadError(f"{weights.path}: DoRA or lora_bias on per-expert layers is not served")
        experts: dict[str, ExpertFactors] = {}
        for key, factors in {**weights.experts, **folded}.items():
            experts.setdefault(key.rpartition(".")[0], {})[key.rpartition(".")[2]] = factors
        for path, named_factors in experts.items():
            check_experts(path, modules.get(path), {f"{path}.{n}": f for n, f in named_factors.items()}, weights.path)
        for path in linears:
            original = named[path]
            layer = self._layers.get(path) or modules.get(path)
            linear = layer.base if isinstance(layer, LoraLinear | RowHead) else layer
            shown = path if path == original else f"{original} (the served model's {path})"
            _check_target(weights.path, type(self.model).__name__, shown, linear, *weights.factors[path])
            assert isinstance(linear, torch.nn.Linear)  # _check_target refused anything else
            for extra in (weights.magnitudes.get(path), weights.biases.get(path)):
                if extra is not None and tuple(extra.shape) != (linear.out_features,):
                    raise AdapterLoadError(f"{weights.path}: {shown} has {linear.out_features} outputs, the "
                                           f"adapter's DoRA magnitude / LoRA bias has shape {tuple(extra.shape)}")
        check_tokens(weights, self.model)
        layout = self._row_layout(weights.path)
        for path in linears:
            if layout.get(path):
                raise AdapterLoadError(f"{weights.path}: the served model's {path} cannot take a LoRA per request: "
                                       f"{layout[path]}")
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
            if pair is None:
                layer.write(slot, None, None)
                continue
            a, b = pair
            magnitude = weights.magnitudes.get(path)
            factor = None if magnitude is None else dora_factor(layer.base.weight, a, b, magnitude)
            layer.write(slot, a, b if factor is None else b * factor.unsqueeze(1))
            layer.terms.write(slot, None if factor is None else factor - 1, weights.biases.get(path))
        self._tokens.install(slot, weights, self._capacity)
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
            self._tokens.clear(slot)
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
        layer = self._wrap_module(path, lambda base: LoraLinear(base, self._slots))
        layer.reserve(self._capacity, 0)
        self._layers[path] = layer

    def _wrap_module(self, path: str, wrap: Callable[[Any], _M]) -> _M:
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        if isinstance(getattr(parent, child), RowHead):  # an output head with per-row own weights: LoRA goes inside
            parent, child = getattr(parent, child), "base"
        wrapper = wrap(getattr(parent, child))
        setattr(parent, child, wrapper)
        return wrapper


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
    if type(linear).forward is not torch.nn.Linear.forward:  # e.g. llama4's router returns (scores, logits)
        raise AdapterLoadError(f"{adapter_path}: {wants}, but the served model has a {type(linear).__name__} there, "
                               "an nn.Linear with a forward of its own; the native backend adapts plain linear layers "
                               "only")
    if a.shape[1] != linear.in_features or b.shape[0] != linear.out_features:
        raise AdapterLoadError(f"{adapter_path}: {wants}, but the served model has an nn.Linear from "
                               f"{linear.in_features} to {linear.out_features} features there (trained on another "
                               "model size?)")


def _renamed(weights: AdapterWeights, rename: Callable[[str], str]) -> tuple[AdapterWeights, dict[str, str]]:
    """``weights`` with every module path renamed onto the served model's (``backends.lora_names``), and
    ``served path -> the adapter's`` for the LoRA factors (refusals name both)."""

    def paths(table: dict[str, _T]) -> dict[str, _T]:
        out = {rename(path): value for path, value in table.items()}
        if len(out) != len(table):
            raise AdapterLoadError(f"{weights.path}: two of its modules name the same layer of the served model")
        return out

    renamed = dataclasses.replace(
        weights, factors=paths(weights.factors), magnitudes=paths(weights.magnitudes), biases=paths(weights.biases),
        modules=paths(weights.modules), embedding_factors=paths(weights.embedding_factors),
        token_rows=paths(weights.token_rows), experts=paths(weights.experts))
    return renamed, {rename(path): path for path in weights.factors}
