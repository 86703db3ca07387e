"""LoRA on fused MoE experts, per row of a batch: every routed token uses its own row's adapter.

What LLaMA-Factory writes (peft 0.21 on transformers 5): transformers 5 stores the routed experts of qwen2_moe,
qwen3_moe, mixtral, glm4_moe, deepseek_v3, ernie4_5_moe … as two 3-D parameters of one ``…mlp.experts`` module,
``gate_up_proj [experts, 2*inter, hidden]`` (gate rows, then up rows) and ``down_proj [experts, hidden, inter]``.
When ``target_modules`` names ``gate_proj/up_proj/down_proj`` (``w1/w2/w3`` for mixtral), peft rewrites the config
(``target_parameters: [down_proj, gate_up_proj]``, ``rank_pattern``/``alpha_pattern`` ``.*\\.gate_up_proj`` = 2r /
2alpha, the fused weight counting as two) and wraps each parameter in a ``ParamWrapper``, nested in the module's
parameter order (the last one outermost), so the file holds::

    …mlp.experts.base_layer.lora_A.weight   [experts*r_gu, hidden]     gate_up_proj (inner wrapper)
    …mlp.experts.base_layer.lora_B.weight   [2*inter, experts*r_gu]
    …mlp.experts.lora_A.weight              [experts*r_d, inter]       down_proj (outer wrapper)
    …mlp.experts.lora_B.weight              [hidden, experts*r_d]

and peft applies, per expert ``e`` (``A.reshape(E, r, in)[e]``, ``B.reshape(out, r, E)[:, :, e]``: the expert index
is the slow one in A and the fast one in B), ``W_e + scaling * B_e @ A_e`` on the whole stack before the experts'
forward — one adapter for the whole batch (its ``adapter_names`` refuses parameter targets). Linear layers of the
same MLPs (shared experts, dense first layers) lose the LoRA: peft moved those names to ``target_parameters``.

Older runs (transformers 4) saved one LoRA per expert, ``…experts.N.gate_proj/up_proj/down_proj`` or mixtral's
``…block_sparse_moe.experts.N.w1/w3/w2``. transformers 5 loads such base checkpoints with its conversion mapping
(``.block_sparse_moe.`` → ``.mlp.``; ``experts.*.{gate,up}`` merged over experts then concatenated, gate first,
into ``gate_up_proj``; ``experts.*.down`` merged into ``down_proj``); ``fold_per_expert`` maps the LoRA the same way:
``A = [A_gate; A_up]``, ``B = diag(B_gate, B_up)`` per expert, an exact rewrite of the two deltas.

How it is served: ``LoraExperts`` *wraps the experts module* (replaces ``mlp.experts`` in its parent, the way
``LoraLinear`` replaces a linear). The parameters cannot carry a per-row LoRA, and the experts' forward has no
seam inside (the LoRA of ``gate_up_proj`` sits before the activation), so when any row of the batch has an adapter
the wrapper computes the experts itself from the module's own weights and gate function (``_apply_gate`` /
``act_fn``); when every row is on the base it calls the module's forward untouched (whichever experts
implementation the config chose), with no extra work. The (token, expert) pairs are sorted by expert, then by
slot: the base weights run as one grouped matmul over experts, the LoRA as one grouped matmul over
``experts x slots`` groups (stacks ``[experts * slots, in, rank]``, slot 0 = no adapter, base pairs left out), so
the cost does not grow with the number of distinct adapters in the batch. ``torch.nn.functional.grouped_mm``
is used on CPU (exact in float32 here, and transformers' own default there); elsewhere, or for shapes it cannot
take, a loop over the non-empty groups does the same sums.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from gateway.errors import AdapterLoadError

if TYPE_CHECKING:
    from backends.lora import RowSlots

FUSED_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")  # the experts modules' parameter order
_PER_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)$")
_GATE_UP_PART = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1}  # place in the fused gate_up_proj: gate, then up
_ALIGN = 4  # float32 elements of 16 bytes: grouped_mm wants strides that are multiples of 16 bytes
_GATHER_LIMIT = 1 << 22  # elements of per-pair gathered LoRA factors (16 MB) above which pairs run grouped

ExpertFactors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # parameter path -> (A [E, r, in], B*s [E, out, r])


def pattern_value(patterns: Mapping[str, Any], key: str, default: Any) -> Any:
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: the first pattern matching the end of ``key``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def take_fused_factors(parts: dict[str, dict[str, torch.Tensor]], config: Mapping[str, Any],
                       folder: str) -> ExpertFactors:
    """Remove peft's ``ParamWrapper`` entries for expert parameters from ``parts`` (stem -> {"A", "B"}).

    Returns ``module.parameter -> (A [E, r, in], B*scaling [E, out, r])`` in float32.
    """
    targets = list(config.get("target_parameters") or [])
    chains: dict[str, dict[int, str]] = {}  # experts module -> {wrapper depth (0 = outermost): stem}
    for stem in parts:
        module, depth = stem, 0
        while module.endswith(".base_layer"):
            module, depth = module.removesuffix(".base_layer"), depth + 1
        # transformers 5 names every fused experts module ``experts``; a stem named otherwise is a linear's LoRA
        if targets and (depth or module.rpartition(".")[2] == "experts"):
            chains.setdefault(module, {})[depth] = stem
    out: ExpertFactors = {}
    for module, stems in chains.items():
        targeted = _targeted(module, targets)
        if sorted(stems) != list(range(len(targeted))):
            raise AdapterLoadError(f"{folder}: {module} has {len(stems)} LoRA wrappers but target_parameters names "
                                   f"{len(targeted)} of its parameters ({', '.join(targeted) or 'none'})")
        for depth, stem in stems.items():
            name = targeted[len(targeted) - 1 - depth]  # peft wraps in parameter order, the last one outermost
            pair = parts.pop(stem)
            out[f"{module}.{name}"] = _per_expert_factors(pair, f"{module}.{name}", config, folder)
    return out


def _targeted(module: str, targets: list[str]) -> list[str]:
    """The parameters of ``module`` that peft's ``target_parameters`` matching wraps, in wrapping order."""
    names = []
    for name in FUSED_PARAMETERS:
        key = f"{module}.{name}"
        if any(key == t or key.endswith(f".{t}") for t in targets):
            names.append(name)
    return names


def _per_expert_factors(pair: dict[str, torch.Tensor], key: str, config: Mapping[str, Any],
                        folder: str) -> tuple[torch.Tensor, torch.Tensor]:
    rank = int(pattern_value(config.get("rank_pattern") or {}, key, config.get("r") or 0))
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, key, config.get("lora_alpha") or rank))
    a, b = pair.get("A"), pair.get("B")
    if a is None or b is None or a.dim() != 2 or b.dim() != 2 or rank < 1 or a.shape[0] % rank \
            or b.shape[1] != a.shape[0]:
        raise AdapterLoadError(f"{folder}: {key} needs a lora_A [experts*r, in] and a lora_B [out, experts*r] "
                               f"with r={rank}")
    experts = a.shape[0] // rank
    scaling = alpha / (rank**0.5 if config.get("use_rslora") else rank)
    a_e = a.float().reshape(experts, rank, a.shape[1])
    b_e = b.float().reshape(b.shape[0], rank, experts).permute(2, 0, 1) * scaling
    return a_e.contiguous(), b_e.contiguous()


def fold_per_expert(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], modules: Mapping[str, torch.nn.Module],
                    folder: str) -> tuple[ExpertFactors, list[str]]:
    """Map transformers-4 per-expert LoRA (``experts.N.gate_proj`` …, 2-D, B already scaled) onto fused experts.

    Only paths the served model lacks and whose fused experts module it has are folded; returns the fused factors
    and the paths used.
    """
    found: dict[str, dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]] = {}
    for path, pair in factors.items():
        match = _PER_EXPERT.match(path)
        if path in modules or match is None:
            continue
        experts = match["experts"].replace(".block_sparse_moe.", ".mlp.")  # transformers 5's renaming (mixtral)
        if not hasattr(_unwrapped(modules.get(experts)), "gate_up_proj"):
            continue
        found.setdefault(experts, {}).setdefault(match["proj"], {})[int(match["index"])] = pair
    out: ExpertFactors = {}
    for experts, projections in found.items():
        module = _unwrapped(modules[experts])
        count, fused_out, _ = module.gate_up_proj.shape
        if max(i for per in projections.values() for i in per) >= count:
            raise AdapterLoadError(f"{folder}: {experts} has {count} experts, the adapter adapts more")
        gate_up = {_GATE_UP_PART[p]: per for p, per in projections.items() if p in _GATE_UP_PART}
        down = [per for p, per in projections.items() if p not in _GATE_UP_PART]
        if gate_up:
            out[f"{experts}.gate_up_proj"] = _stack(gate_up, int(count), int(fused_out) // 2, 2, folder)
        if down:
            out[f"{experts}.down_proj"] = _stack({0: down[0]}, int(count), int(module.down_proj.shape[1]), 1, folder)
    used = [path for path in factors if path not in modules and (m := _PER_EXPERT.match(path)) is not None
            and m["experts"].replace(".block_sparse_moe.", ".mlp.") in found]
    return out, used


def _unwrapped(module: torch.nn.Module | None) -> Any:
    return module.base if isinstance(module, LoraExperts) else module


def _stack(parts: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]], count: int, width: int, blocks: int,
           folder: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert ``A = [A_0; A_1]``, ``B = diag(B_0, B_1)``, part ``k``'s rows at ``k * width`` of the fused output.

    Missing experts and parts stay zero (their delta is zero). A part whose shape is not ``[width, r]`` is left for
    the install check to refuse (the fused shape is then wrong).
    """
    ranks = {k: max(a.shape[0] for a, _ in per.values()) for k, per in parts.items()}
    inputs = {a.shape[1] for per in parts.values() for a, _ in per.values()}
    outputs = {b.shape[0] for per in parts.values() for _, b in per.values()}
    if len(inputs) != 1 or outputs != {width}:
        raise AdapterLoadError(f"{folder}: per-expert LoRA factors do not fit the fused experts: lora_B has "
                               f"{sorted(outputs)} outputs where the model's experts have {width}")
    a = torch.zeros(count, sum(ranks.values()), inputs.pop())
    b = torch.zeros(count, width * blocks, sum(ranks.values()))
    rank_at = 0
    for k in sorted(parts):
        for index, (pa, pb) in parts[k].items():
            a[index, rank_at: rank_at + pa.shape[0]] = pa
            b[index, k * width: (k + 1) * width, rank_at: rank_at + pb.shape[1]] = pb
        rank_at += ranks[k]
    return a, b


def check_experts(path: str, module: torch.nn.Module | None, factors: ExpertFactors, folder: str) -> None:
    """Raise ``AdapterLoadError`` unless ``module`` is fused experts that ``factors`` (its parameters') fit."""
    base = _unwrapped(module)
    if base is None or not isinstance(getattr(base, "down_proj", None), torch.nn.Parameter):
        raise AdapterLoadError(f"{folder}: {path} is not a fused experts module of the served model")
    unsupported = [flag for flag in ("has_bias", "is_transposed", "has_post_expert_norm", "_is_expert_parallel")
                   if getattr(base, flag, False)]
    if unsupported or not getattr(base, "has_gate", True) or not hasattr(base, "_apply_gate"):
        raise AdapterLoadError(f"{folder}: LoRA on the experts of {type(base).__name__} ({path}) is not served by the "
                               f"native backend ({', '.join(unsupported) or 'no fused gate'})")
    for key, (a, b) in factors.items():
        name = key.removeprefix(f"{path}.")
        param = getattr(base, name, None)
        if not isinstance(param, torch.nn.Parameter) or param.dim() != 3:
            raise AdapterLoadError(f"{folder}: {key} is not a 3-D expert parameter of the served model")
        experts, out_features, in_features = param.shape
        if a.shape[0] != experts or a.shape[2] != in_features or b.shape[:2] != (experts, out_features):
            raise AdapterLoadError(
                f"{folder}: {key} is {experts} experts of {out_features}x{in_features} in the served model, the "
                f"adapter's factors are {experts_shape(a)} and {experts_shape(b)} (trained on another model size?)")


def experts_shape(t: torch.Tensor) -> str:
    return "x".join(str(d) for d in t.shape)


class LoraExperts(torch.nn.Module):
    """A fused experts module plus each routed token's own row's LoRA on its parameters (module docstring).

    Stacks per adapted parameter: ``a [experts * slots, in, rank]``, ``b [experts * slots, rank, out]`` (expert
    major, so one expert's slots are adjacent), float32, scaling folded into ``b``.
    """

    def __init__(self, base: torch.nn.Module, slots: RowSlots) -> None:
        super().__init__()
        self.base: Any = base  # a transformers experts class: gate_up_proj, down_proj, _apply_gate
        self.slots = slots  # shared with the model's LoraLinear layers: the slot of every batch row
        self.num_experts = int(_unwrapped(base).down_proj.shape[0])
        self.capacity = 1
        self.stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.active = torch.zeros(1, dtype=torch.bool, device=_unwrapped(base).down_proj.device)  # slots adapting these
        self._any_active = (-1, False)  # (rows version, whether any row's slot is active)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        rows = self.slots.rows
        if rows is not None and self._any_active[0] != self.slots.version:  # once per batch change, not per step
            self._any_active = (self.slots.version, bool(self.active.index_select(0, rows).any()))
        if rows is None or not self._any_active[1]:
            return self.base(hidden_states, top_k_index, top_k_weights)  # no row adapts these experts
        return self._adapted(hidden_states, top_k_index, top_k_weights, rows)

    def _adapted(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 rows: torch.Tensor) -> torch.Tensor:
        tokens, top_k = top_k_index.shape
        if tokens % rows.numel():
            raise RuntimeError(f"{tokens} routed tokens do not split into {rows.numel()} rows")
        pair_slot = rows.repeat_interleave(tokens // rows.numel() * top_k)  # rows are [batch, seq] flattened
        key = top_k_index.reshape(-1) * self.capacity + pair_slot  # expert major, slot minor
        key, order = torch.sort(key)
        token_of = order // top_k
        expert_counts = torch.bincount(key // self.capacity, minlength=self.num_experts)
        adapted = torch.nonzero(self.active.index_select(0, key % self.capacity)).squeeze(1)
        lora = self._lora_for(adapted, key.index_select(0, adapted))
        hidden = x.index_select(0, token_of)
        base = self.base
        gate_up = grouped_linear(hidden, base.gate_up_proj.transpose(1, 2), expert_counts)
        lora(gate_up, hidden, "gate_up_proj")
        hidden = base._apply_gate(gate_up)
        out = grouped_linear(hidden, base.down_proj.transpose(1, 2), expert_counts)
        lora(out, hidden, "down_proj")
        out = out * top_k_weights.reshape(-1).index_select(0, order).unsqueeze(1).to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, out.to(x.dtype))

    def _lora_for(self, adapted: torch.Tensor,
                  groups: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, str], None]:
        """``add(y, x, name)``: ``y[adapted] += x[adapted] @ A[group] @ B[group]`` for parameter ``name``.

        Few pairs (decode): the pairs' factors are gathered and run as two ``bmm`` (the gathered copy is at most
        ``_GATHER_LIMIT`` elements). Many pairs (prefill): one matmul per non-empty (expert, slot) group — CPU
        ``grouped_mm`` visits every group, empty or not, which costs more here.
        """
        counts: list[torch.Tensor] = []

        def add(y: torch.Tensor, x: torch.Tensor, name: str) -> None:
            stack = self.stacks.get(name)
            if stack is None or adapted.numel() == 0:
                return
            a, b = stack
            x = x.index_select(0, adapted).float()
            if adapted.numel() * a.shape[1] * a.shape[2] <= _GATHER_LIMIT:
                h = torch.bmm(x.unsqueeze(1), a.index_select(0, groups))
                delta = torch.bmm(h, b.index_select(0, groups)).squeeze(1)
            else:
                if not counts:
                    counts.append(torch.bincount(groups, minlength=a.shape[0]))
                delta = grouped_linear(grouped_linear(x, a, counts[0], loop=True), b, counts[0], loop=True)
            y.index_add_(0, adapted, delta.to(y.dtype))

        return add

    def reserve(self, slots: int, ranks: Mapping[str, int]) -> None:
        """Grow every stack to ``slots`` slots and at least ``ranks[name]`` (new room is zeros; ranks padded)."""
        names = set(self.stacks) | set(ranks)
        old_slots, slots = self.capacity, max(slots, self.capacity)
        device = self.base.down_proj.device
        for name in names:
            param = getattr(self.base, name)
            _, out_features, in_features = param.shape
            old = self.stacks.get(name)
            old_rank = old[0].shape[2] if old is not None else 0
            rank = max(old_rank, -(-ranks.get(name, 0) // _ALIGN) * _ALIGN)
            if old is not None and slots == old_slots and rank == old_rank:
                continue
            a = torch.zeros((self.num_experts, slots, in_features, rank), dtype=torch.float32, device=device)
            b = torch.zeros((self.num_experts, slots, rank, out_features), dtype=torch.float32, device=device)
            if old is not None:
                a[:, :old_slots, :, :old_rank] = old[0].view(self.num_experts, old_slots, in_features, old_rank)
                b[:, :old_slots, :old_rank] = old[1].view(self.num_experts, old_slots, old_rank, out_features)
            self.stacks[name] = (a.view(-1, in_features, rank), b.view(-1, rank, out_features))
        self.active = torch.cat([self.active, self.active.new_zeros(slots - old_slots)])
        self.capacity = slots

    def write(self, slot: int, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put one adapter's factors (``name -> (A [E, r, in], B [E, out, r])``) in ``slot``; zeros elsewhere."""
        self.active[slot] = bool(factors)
        for name, (a_stack, b_stack) in self.stacks.items():
            a_view = a_stack.view(self.num_experts, self.capacity, *a_stack.shape[1:])
            b_view = b_stack.view(self.num_experts, self.capacity, *b_stack.shape[1:])
            a_view[:, slot].zero_()
            b_view[:, slot].zero_()
            pair = factors.get(name)
            if pair is not None:
                a, b = pair
                a_view[:, slot, :, : a.shape[1]] = a.transpose(1, 2)
                b_view[:, slot, : b.shape[2]] = b.transpose(1, 2)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, loop: bool = False) -> torch.Tensor:
    """``x [S, in]`` sorted by group, ``weight [groups, in, out]``, ``counts [groups]`` -> ``[S, out]``.

    ``loop``: one matmul per non-empty group instead of ``grouped_mm``.
    """
    if x.shape[0] == 0:
        return x.new_zeros((0, weight.shape[2]))
    x = x.to(weight.dtype)
    if not loop and x.device.type == "cpu" and _aligned(x, weight):
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        return torch.nn.functional.grouped_mm(x, weight, offs=offsets)
    out = x.new_empty((x.shape[0], weight.shape[2]))
    start = 0
    for group, count in enumerate(counts.tolist()):
        if count:
            torch.mm(x[start: start + count], weight[group], out=out[start: start + count])
            start += count
    return out


def _aligned(x: torch.Tensor, weight: torch.Tensor) -> bool:
    size = x.element_size()
    return all(s * size % 16 == 0 for s in (*x.stride()[:-1], *weight.stride()) if s != 1) \
        and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
