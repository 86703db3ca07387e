"""What an ``adapter_config.json`` (peft 0.21's ``LoraConfig``, as LLaMA-Factory writes it) means for the native
backend: which options it serves, which it refuses (and why), and each module's scaling.

Served: ``use_rslora`` (scaling ``alpha / sqrt(r)``), ``rank_pattern`` / ``alpha_pattern`` (matched exactly as
peft's ``get_pattern_key`` does), ``use_dora``, ``lora_bias``, ``modules_to_save`` (input embedding and output head
only; checked at install), ``trainable_token_indices`` (new rows for some tokens of the embedding and of a tied or
named head), LoRA on embeddings, ``fan_in_fan_out`` (peft ignores it on ``nn.Linear``, the only layer
we adapt), and every initialisation that leaves the base weights as they were (``True``, ``False``, ``gaussian``,
``eva``, ``orthogonal``, ``mica``, and PiSSA / CorDA / OLoRA adapters *converted* to plain LoRA, which peft saves
with ``init_lora_weights: true``). Options that only steer training (dropout, ``layers_to_transform``,
``exclude_modules``, ``velora_config``, ``runtime_config``, ``ensure_weight_tying``) change nothing at inference.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from gateway.errors import AdapterLoadError

# Options whose inference math we do not reproduce, with the reason the refusal gives.
_REFUSED = {
    "layer_replication": "it builds a model with repeated layers that the served base does not have",
    "alora_invocation_tokens": "activated LoRA (aLoRA) applies the adapter only after its invocation tokens",
    "use_qalora": "QA-LoRA pools inputs for a GPTQ-quantised base",
    "arrow_config": "Arrow routes between several adapters per token",
    "use_bdlora": "block-diagonal BD-LoRA factors are not served",
    "kasa_config": "KaSA truncates the base weight's singular values and adds a diagonal between A and B",
    "monteclora_config": "MonteCLoRA samples its factors",
    "megatron_config": "its layers are Megatron tensor-parallel layers",
}  # target_parameters (fused MoE experts) is the expert LoRA's to serve or refuse, at install
# Initialisations that rewrite the base weights (the adapter only works on that residual base) unless converted.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def check_config(config: Mapping[str, Any], folder: str) -> None:
    """Raise ``AdapterLoadError`` naming every option of ``config`` the native backend cannot serve, and why."""
    problems = []
    peft_type = str(config.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        problems.append(f"peft_type {peft_type} (only LoRA adapters are served)")
    for option, why in _REFUSED.items():
        if config.get(option):
            problems.append(f"{option} ({why})")
    bias = config.get("bias") or "none"
    if bias != "none":
        problems.append(f"bias={bias!r} (it trains the base model's biases, which are not served per row)")
    if config.get("use_dora") and config.get("lora_bias"):
        problems.append("use_dora with lora_bias (peft's DoRA norm would include the bias)")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        problems.append(f"init_lora_weights={init!r} (this initialisation rewrites the base weights, so the adapter "
                        "only works on that modified base; convert it to plain LoRA when saving — LLaMA-Factory's "
                        "pissa_convert, peft's path_initial_model_for_weight_conversion — or export a merged model)")
    if problems:
        raise AdapterLoadError(f"{folder}: the native backend does not serve " + "; ".join(problems))


def token_indices(config: Mapping[str, Any], module: str, folder: str) -> list[int]:
    """The token ids ``trainable_token_indices`` gives ``module`` (a list: the input embedding's; a dict: by name)."""
    indices = config.get("trainable_token_indices")
    if isinstance(indices, dict):
        indices = next((v for k, v in indices.items() if module == k or module.endswith(f".{k}")), None)
    if not isinstance(indices, list) or not all(isinstance(i, int) for i in indices):
        raise AdapterLoadError(f"{folder}: trainable_token_indices gives {module} no list of token ids")
    return indices


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's ``get_pattern_key``: the first key that matches the end of ``module`` as a regex, else the default."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def module_scaling(config: Mapping[str, Any], module: str, rank: int, folder: str) -> float:
    """The scaling peft gives ``module`` (a path like ``model.layers.0.self_attn.q_proj``) of rank ``rank``.

    ``rank`` is the saved factor's; it must be the rank the config gives the module (``rank_pattern`` or ``r``).
    """
    r = int(_pattern_value(config.get("rank_pattern") or {}, module, config.get("r") or rank))
    if r != rank:
        raise AdapterLoadError(f"{folder}: {module} has rank {rank} in the weights but {r} in adapter_config.json")
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha") or r))
    return alpha / (r**0.5 if config.get("use_rslora") else r)
