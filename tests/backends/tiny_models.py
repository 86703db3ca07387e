"""Tiny random models of every architecture the native backend is tested on, built in memory in about a second.

``ARCHITECTURES`` is a plain table: one ``TinyModel`` per name, holding the config to build (transformers' own
config class, so the model class is whatever ``AutoModelForCausalLM`` picks for it, as when a user serves a folder)
and the LoRA ``targets`` an adapter test should put on it. ``build(name)`` returns the model, float32, in eval mode,
with weights drawn from a fixed seed (the same model every call).

Sizes: vocab 256, hidden 64, 2 layers, 4 heads (2 key/value heads), 4 experts (2 per token) where there are experts.
``initializer_range=0.2``: with the default 0.02 the logits are nearly flat and greedy choices hang on rounding.

Targets: dense architectures get LLaMA-Factory's ``lora_target: all`` (the last name of every ``nn.Linear`` except
the output head, as its ``find_all_linear_modules`` collects them); MoE architectures get attention and the MLP names
too, which peft 0.21 turns into LoRA on the fused expert weights (``target_parameters``), and DeepSeek every MLA
projection (``kv_b_proj`` sees a 4-D input).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from transformers import AutoModelForCausalLM, PretrainedConfig

VOCAB = 256
SLIDING_WINDOW = 8  # smaller than every test prompt plus its answer, so the window changes the numbers
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=512, pad_token_id=0,
               bos_token_id=1, eos_token_id=VOCAB - 1)
_MOE = dict(moe_intermediate_size=32, num_experts_per_tok=2)
# One sliding and one full layer. Untied: with gemma's embedding scale a tied head mostly repeats the input token.
_GEMMA = dict(head_dim=16, tie_word_embeddings=False, sliding_window=SLIDING_WINDOW,
              layer_types=["sliding_attention", "full_attention"])


@dataclass(frozen=True)
class TinyModel:
    """One architecture: ``config()`` builds its transformers config; ``targets`` are the adapter's LoRA targets."""

    config_class: str  # a config class of transformers, e.g. "Qwen2Config"
    options: dict[str, object]
    targets: tuple[str, ...]

    def config(self) -> PretrainedConfig:
        config_class: Callable[..., PretrainedConfig] = getattr(transformers, self.config_class)
        return config_class(**{**_COMMON, **self.options})


ARCHITECTURES: dict[str, TinyModel] = {
    "llama": TinyModel("LlamaConfig", {}, ATTENTION + MLP),
    "qwen2": TinyModel("Qwen2Config", {"tie_word_embeddings": True}, ATTENTION + MLP),
    "qwen3": TinyModel("Qwen3Config", {"head_dim": 16}, ATTENTION + MLP),
    "mistral": TinyModel("MistralConfig", {"sliding_window": None}, ATTENTION + MLP),
    "mistral_sliding": TinyModel("MistralConfig", {"sliding_window": SLIDING_WINDOW}, ATTENTION + MLP),
    "gemma2": TinyModel("Gemma2Config", _GEMMA, ATTENTION + MLP),
    "gemma3": TinyModel("Gemma3TextConfig", _GEMMA, ATTENTION + MLP),
    "phi3": TinyModel("Phi3Config", {}, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "glm4": TinyModel("Glm4Config", {"head_dim": 16}, ATTENTION + ("gate_up_proj", "down_proj")),
    "granite": TinyModel("GraniteConfig", {}, ATTENTION + MLP),
    "olmo2": TinyModel("Olmo2Config", {}, ATTENTION + MLP),
    "cohere": TinyModel("CohereConfig", {}, ATTENTION + MLP),
    "exaone": TinyModel("ExaoneConfig", {}, ATTENTION + MLP),  # EXAONE 3: transformers 5 builds it as Llama
    "deepseek_v3": TinyModel("DeepseekV3Config", {
        **_MOE, "n_routed_experts": 4, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
        "first_k_dense_replace": 1, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8, "v_head_dim": 16, "num_key_value_heads": 4},
        ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj") + MLP),
    "qwen3_moe": TinyModel("Qwen3MoeConfig", {**_MOE, "num_experts": 4, "head_dim": 16}, ATTENTION + MLP),
    "mixtral": TinyModel("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2},
                         ATTENTION + ("w1", "w2", "w3")),
    "glm4_moe": TinyModel("Glm4MoeConfig", {**_MOE, "n_routed_experts": 4, "n_shared_experts": 1, "n_group": 1,
                                            "topk_group": 1, "first_k_dense_replace": 1, "head_dim": 16},
                          ATTENTION + MLP),
    "ernie4_5_moe": TinyModel("Ernie4_5_MoeConfig", {"moe_intermediate_size": 32, "moe_k": 2, "moe_num_experts": 4,
                                                     "moe_num_shared_experts": 1, "moe_layer_start_index": 1},
                              ATTENTION + MLP),
    "llama4": TinyModel("Llama4TextConfig", {  # chunked attention layers (a chunk smaller than the prompts)
        "head_dim": 16, "intermediate_size_mlp": 128, "num_local_experts": 2, "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 1, "attention_chunk_size": SLIDING_WINDOW, "no_rope_layers": [1, 0]},
        ATTENTION + MLP),  # peft puts the MLP names on the shared expert only
    "qwen2_moe": TinyModel("Qwen2MoeConfig", {**_MOE, "num_experts": 4, "shared_expert_intermediate_size": 64},
                           ATTENTION + MLP + ("shared_expert_gate",)),
    "falcon_h1": TinyModel("FalconH1Config", {
        "head_dim": 16, "mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1,
        "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 1, "mamba_chunk_size": 16}, ATTENTION + MLP),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """The tiny ``name`` model with weights from ``seed``: float32, eval mode, on the CPU."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(ARCHITECTURES[name].config(), dtype=torch.float32)
    return model.eval()


def all_linear_targets(model: torch.nn.Module) -> tuple[str, ...]:
    """LLaMA-Factory's ``lora_target: all`` (0.9.5's ``find_all_linear_modules``): the last name of every module
    whose class name says ``Linear`` (not ``Embedding``) outside the output head — llama4's ``Llama4Router``, an
    ``nn.Linear`` subclass, is left out by that rule."""
    names = {path.rsplit(".", 1)[-1] for path, module in model.named_modules()
             if "Linear" in type(module).__name__ and "Embedding" not in type(module).__name__
             and "lm_head" not in path}
    return tuple(sorted(names))
