"""Which linear layers of a model see their input with the batch rows outermost — found once per model, by running it.

``LoraLinear`` adds each row's own delta by viewing the layer's input ``[*lead, in]`` as ``[rows, -1, in]``. That
is right whenever the input's vectors are laid out row-major with the batch row outermost, whatever the other
dims: ``[rows, seq, in]`` (attention and MLP projections), ``[rows * seq, in]`` (qwen2_moe's shared expert and
``shared_expert_gate``, which see the tokens flattened), ``[rows, 1, kv_len, in]`` (DeepSeek-V3 MLA's
``kv_b_proj``, which expands the whole cached latent every step). It is wrong when a layer sees tokens routed or
permuted (a per-expert ``nn.Linear`` of a MoE block is fed the tokens routed to that expert, in routing order), or
rows that are not outermost (``[seq, rows, in]``). An adapter on such a layer must be refused when it is installed,
never found out by a failing (or, worse, wrong) generation.

How it is known: ``row_layout`` runs the model the way the engine does (a prefill of two rows of three tokens
through a ``DynamicCache``, then one decode step), once with rows ``(p, q)`` and once with ``(q, p)``, with a
forward pre-hook on every given layer recording a random projection of its input vectors. A layer is attributable
when in both runs and every call its vector count is a multiple of the two rows, and each row's block in one run
equals the swapped row's block in the other: each row's inputs sit in that row's block wherever the row is placed.
A layer that sees routed tokens fails this (its vector count depends on the routing; swapping rows does not swap
its blocks), except by the chance that both rows route equally many tokens to it; so a layer inside an ``experts``
list (``…experts.N…``, the per-expert layout of MoE blocks) is refused by its place as well. A layer the probe does
not reach is refused too: nothing shows how its input is laid out.

The probe costs four forward passes of at most two rows of three tokens, once per model (the caller keeps the
result); it runs with LoRA off.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from transformers import DynamicCache

_ROWS = 2
_PROMPT = 3
_PROJECTIONS = 4  # random directions each input vector is recorded along
_EXPERT = re.compile(r"(^|\.)experts\.\d+(\.|$)")


def row_layout(model: torch.nn.Module, layers: Mapping[str, torch.nn.Module]) -> dict[str, str | None]:
    """``path -> None`` for each of ``layers`` (path -> module of ``model``) whose input rows can be attributed,
    else ``path -> why not`` (a phrase). Raises whatever the model's forward raises."""
    vocab = model.get_input_embeddings().num_embeddings  # type: ignore[operator]
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    p, q = torch.randperm(vocab, generator=generator)[: 2 * _PROMPT].view(2, _PROMPT)
    straight = _record(model, layers, torch.stack([p, q]).to(device))
    swapped = _record(model, layers, torch.stack([q, p]).to(device))
    return {path: _verdict(path, straight.get(path, []), swapped.get(path, [])) for path in layers}


def _verdict(path: str, straight: list[torch.Tensor], swapped: list[torch.Tensor]) -> str | None:
    if _EXPERT.search(path):
        return "it is one expert of a mixture-of-experts block, fed the tokens routed to it, not the batch's rows"
    if not straight:
        return "a forward pass of the served model does not reach it, so how its input is laid out is unknown"
    if len(straight) != len(swapped):
        return "it is called a different number of times depending on the batch's content"
    for one, other in zip(straight, swapped, strict=True):
        if one.shape != other.shape or one.shape[0] % _ROWS:
            return (f"its input holds {one.shape[0]} vectors for {_ROWS} rows, a number that depends on the batch's "
                    "content (tokens routed or regrouped)")
        one, other = one.view(_ROWS, -1, _PROJECTIONS), other.view(_ROWS, -1, _PROJECTIONS)
        if not (_close(one[0], other[1]) and _close(one[1], other[0])):
            return "its input vectors are not grouped by batch row (tokens routed, permuted or the batch not outermost)"
    return None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Loose on purpose: other rows' vectors differ by about their own size, rounding (bf16) by far less.
    return bool((a - b).norm() <= 1e-2 * (a.norm() + b.norm()) + 1e-6)


def _record(model: torch.nn.Module, layers: Mapping[str, torch.nn.Module],
            ids: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Every call's input of every layer, projected to ``[vectors, _PROJECTIONS]``, for a prefill and a decode step."""
    seen: dict[str, list[torch.Tensor]] = {}
    directions: dict[int, torch.Tensor] = {}

    def hook_for(path: str):  # type: ignore[no-untyped-def]
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            width = x.shape[-1]
            if width not in directions:
                directions[width] = torch.randn(width, _PROJECTIONS, generator=torch.Generator().manual_seed(width))
            seen.setdefault(path, []).append(x.reshape(-1, width).float() @ directions[width].to(x.device))
        return hook

    handles = [module.register_forward_pre_hook(hook_for(path)) for path, module in layers.items()]
    try:
        mask = torch.ones_like(ids)
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        cache = DynamicCache()
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
            step = out.logits[:, -1:].argmax(-1)
            model(input_ids=step, attention_mask=torch.cat([mask, torch.ones_like(step)], dim=1),
                  position_ids=positions[:, -1:] + 1, past_key_values=cache, use_cache=True, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return seen
