"""Which linear layers of a model see their input with the batch rows outermost — found once per model, by running it.

``LoraLinear`` adds each row's own delta by viewing the layer's input ``[*lead, in]`` as ``[rows, -1, in]``. That
is right whenever the input's vectors are laid out row-major with the batch row outermost, whatever the other
dims: ``[rows, seq, in]`` (attention and MLP projections), ``[rows * seq, in]`` (qwen2_moe's shared expert and
``shared_expert_gate``, which see the tokens flattened), ``[rows, 1, kv_len, in]`` (DeepSeek-V3 MLA's
``kv_b_proj``, which expands the whole cached latent every step). It is wrong when a layer sees tokens routed or
permuted (a per-expert ``nn.Linear`` of a MoE block is fed the tokens routed to that expert, in routing order), or
rows that are not outermost (``[seq, rows, in]``). An adapter on such a layer must be refused when it is installed,
never found out by a failing (or, worse, wrong) generation.

How it is known: ``row_layout`` runs the model the way the engine does (a prefill through a ``DynamicCache``, then
one decode step) on four rows of three tokens, ``(p, q, q, p)``, with a forward pre-hook on every given layer
recording a random projection of its input vectors. A layer is attributable when at every call its vector count is
a multiple of the four rows and, cut into four blocks, block 0 equals block 3 and block 1 equals block 2 (the rows
holding the same tokens): each row's inputs sit in that row's block. A layer that sees
routed tokens fails this (its vector count depends on the routing, and its blocks do not follow the rows), except by
the chance that every row routes equally many tokens to it; so a layer inside an ``experts`` list (``…experts.N…``,
the per-expert layout of MoE blocks) is refused by its place as well. A layer the probe does not reach is refused
too: nothing shows how its input is laid out.

The probe costs two forward passes of four rows (a prefill of three tokens, a decode step), once per model (the
caller keeps the result); it runs with LoRA off. On a GPU that is milliseconds; on CPU it is about two forward passes
of a short prompt (seconds for a 7B model), paid at the first adapter install.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from transformers import DynamicCache

_ROWS = 4  # (p, q, q, p)
_PROMPT = 3
_PROJECTIONS = 4  # random directions each input vector is recorded along
_EXPERT = re.compile(r"(^|\.)experts\.\d+(\.|$)")


def row_layout(model: torch.nn.Module, layers: Mapping[str, torch.nn.Module]) -> dict[str, str | None]:
    """``path -> None`` for each of ``layers`` (path -> module of ``model``) whose input rows can be attributed,
    else ``path -> why not`` (a phrase). Raises whatever the model's forward raises."""
    vocab = model.get_input_embeddings().num_embeddings  # type: ignore[operator]
    device = next(model.parameters()).device
    # Two different rows (a prompt, and a token for the decode step), each twice.
    p, q = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[: 2 * _PROMPT + 2].view(2, _PROMPT + 1)
    seen = _record(model, layers, torch.stack([p, q, q, p]).to(device))
    return {path: _verdict(path, seen.get(path, [])) for path in layers}


def _verdict(path: str, calls: list[torch.Tensor]) -> str | None:
    if _EXPERT.search(path):
        return "it is one expert of a mixture-of-experts block, fed the tokens routed to it, not the batch's rows"
    if not calls:
        return "a forward pass of the served model does not reach it, so how its input is laid out is unknown"
    for seen in calls:
        if seen.shape[0] % _ROWS:
            return (f"its input holds {seen.shape[0]} vectors for {_ROWS} rows: they are not the rows' tokens "
                    "(routed or regrouped)")
        blocks = seen.view(_ROWS, -1, _PROJECTIONS)
        if not (_close(blocks[0], blocks[3]) and _close(blocks[1], blocks[2])):
            return "its input vectors are not grouped by batch row (tokens routed, permuted or the batch not outermost)"
    return None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Loose on purpose: other rows' vectors differ by about their own size, rounding (bf16) by far less.
    return bool((a - b).norm() <= 1e-2 * (a.norm() + b.norm()) + 1e-6)


def _record(model: torch.nn.Module, layers: Mapping[str, torch.nn.Module],
            ids: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Every call's input of every layer, projected to ``[vectors, _PROJECTIONS]``, for a prefill of all but the last
    token of ``ids`` and a decode step of that token."""
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
        prompt, step = ids[:, :-1], ids[:, -1:]
        mask = torch.ones_like(ids)
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        cache = DynamicCache()
        with torch.inference_mode():
            model(input_ids=prompt, attention_mask=mask[:, :-1], position_ids=positions[:, :-1], cache=cache,
                  use_cache=True, logits_to_keep=1)
            model(input_ids=step, attention_mask=mask, position_ids=positions[:, -1:], cache=cache,
                  use_cache=True, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return seen
