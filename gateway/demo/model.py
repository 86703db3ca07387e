"""The demo base model: a tiny Qwen2 built from random init, saved as a Hugging Face model folder."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from gateway.demo.tokenizer import ENDOFTEXT, IM_END, MODEL_MAX_LENGTH, VOCAB_SIZE


def base_config(*, eos_token_id: int, pad_token_id: int) -> Qwen2Config:
    """The tiny architecture. ``initializer_range=0.2`` (not 0.02): with flat initial logits LoRA training stalls.

    Two heads of 32 (one key/value head) over hidden size 64: vLLM's CPU attention supports head sizes 32, 64, 80,
    ... but not 16, and the real-vLLM tests serve this model."""
    return Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=MODEL_MAX_LENGTH,
        tie_word_embeddings=True,
        initializer_range=0.2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        dtype="float32",
    )


def new_model(config: Qwen2Config, seed: int) -> Qwen2ForCausalLM:
    """A randomly initialised model; the same ``seed`` gives the same weights."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    return model.float()


# The demo's sampling defaults (what a request that sets no temperature gets): Qwen2.5-Instruct's values, which
# the demo's trained answers survive (tests/gateway/test_openwebui.py samples them through the server).
SAMPLING_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}


def generation_config(*, im_end_id: int, endoftext_id: int) -> GenerationConfig:
    """Sampling at ``SAMPLING_DEFAULTS``; generation stops at ``<|im_end|>`` (the chat eos) or ``<|endoftext|>``."""
    return GenerationConfig(
        eos_token_id=[im_end_id, endoftext_id],
        pad_token_id=endoftext_id,
        do_sample=True,
        max_new_tokens=128,
        **SAMPLING_DEFAULTS,
    )


def save_base(model: Qwen2ForCausalLM, directory: Path, *, token_ids: dict[str, int]) -> None:
    """Write ``config.json``, ``generation_config.json`` and ``model.safetensors`` (float32) into ``directory``."""
    model.generation_config = generation_config(im_end_id=token_ids[IM_END], endoftext_id=token_ids[ENDOFTEXT])
    model.save_pretrained(directory, safe_serialization=True)
