"""Shared pieces of the benchmarks: the 0.5B-shaped random Qwen2, random rank-8 adapters, timed requests."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from backends.base import GenerationRequest, SamplingParams
from backends.torch_native import TorchBackend

VOCAB = 32000


def qwen_05b_shaped(layers: int = 24) -> Qwen2ForCausalLM:
    """Random Qwen2 with Qwen2.5-0.5B's shapes (hidden 896, 14 heads, 2 kv heads), vocab 32000, bf16, eval."""
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=4096)
    torch.manual_seed(0)
    return Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16).eval()


def write_random_adapter(folder: Path, model: Qwen2ForCausalLM, targets: list[str], rank: int = 8,
                         seed: int = 0) -> int:
    """A peft-format LoRA folder with random weights for ``targets`` in every layer; returns its size in bytes."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            key = f"base_model.model.{name}"
            a = torch.randn(rank, module.in_features, generator=generator) * 0.02
            b = torch.randn(module.out_features, rank, generator=generator) * 0.02
            tensors[f"{key}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = b.to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets,
              "base_model_name_or_path": "qwen-0.5b-shaped", "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return (folder / "adapter_model.safetensors").stat().st_size


def backend_for(model: torch.nn.Module, max_batch_size: int = 16) -> TorchBackend:
    return TorchBackend(model, device=torch.device("cpu"), eos_token_ids=frozenset(), pad_token_id=0,
                        max_model_len=4096, max_batch_size=max_batch_size, max_queue=256)


def prompt(index: int, length: int = 32) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(1000 + index)
    return tuple(torch.randint(10, VOCAB, (length,), generator=generator).tolist())


def request(index: int, adapter: str | None, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(request_id=f"bench-{index}", prompt_token_ids=prompt(index), prompt_text="",
                             adapter=adapter, sampling=SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                      ignore_eos=True))


async def run_batch(backend: TorchBackend, adapters: list[str | None], max_tokens: int) -> tuple[float, int]:
    """All requests at once; returns (seconds, tokens generated)."""

    async def one(index: int, adapter: str | None) -> int:
        return sum([len(d.token_ids) async for d in backend.generate(request(index, adapter, max_tokens))])

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i, a) for i, a in enumerate(adapters)))
    return time.perf_counter() - start, sum(counts)


async def time_to_first_token(backend: TorchBackend, index: int, adapter: str | None = None) -> float:
    start = time.perf_counter()
    stream = backend.generate(request(index, adapter, 1))
    await anext(stream)
    elapsed = time.perf_counter() - start
    await stream.aclose()  # type: ignore[attr-defined]
    return elapsed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
