"""What the LoRA variants cost on the native engine: DoRA rows, own embedding/head rows (``modules_to_save``), and
what having such an adapter loaded costs a batch that does not use it (it should cost nothing).

The 0.5B-shaped random Qwen2 in bf16 and random rank-8 adapters on q,k,v,o: ``plain``, ``dora`` (same targets, DoRA
magnitudes) and ``own-head`` (q,v plus its own ``embed_tokens`` and ``lm_head``, ``modules_to_save``). Eight requests,
32 prompt tokens, ``max_tokens`` new tokens each (greedy, EOS ignored), best of ``--repeats``:

- plain only:        4 base + 4 plain rows, only ``plain`` loaded;
- plain, all loaded: the same rows with ``dora`` and ``own-head`` loaded too (unused: target ratio >= 0.95);
  (the adapters are unloaded and loaded again between repeats, so every case is measured in every round)
- with DoRA rows:    4 plain + 4 dora rows;
- with own heads:    4 plain + 4 own-head rows.

Prints a table, then ONE JSON line. Run: ``PYTHONPATH=. python -m bench.lora_variants [--layers 8]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.common import backend_for, qwen_05b_shaped, run_batch, write_random_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def write_dora_adapter(folder: Path, model: torch.nn.Module) -> None:
    """A random LoRA on ``TARGETS`` turned into DoRA: magnitudes near the norms of ``W + s·B·A``."""
    write_random_adapter(folder, model, TARGETS, seed=1)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(2)
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        stem = key.removesuffix(".lora_A.weight")
        weight = modules[stem.removeprefix("base_model.model.")].weight.float()
        a, b = tensors[key].float(), tensors[f"{stem}.lora_B.weight"].float()
        norm = torch.linalg.norm(weight + 2 * b @ a, dim=1)
        tensors[f"{stem}.lora_magnitude_vector"] = (norm * (1 + 0.05 * torch.randn(norm.shape, generator=generator))
                                                    ).to(torch.bfloat16)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))


def write_own_head_adapter(folder: Path, model: torch.nn.Module) -> None:
    write_random_adapter(folder, model, ["q_proj", "v_proj"], seed=3)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(4)
    for name, module in (("model.embed_tokens", model.get_input_embeddings()), ("lm_head", model.lm_head)):
        weight = module.weight.float()
        noise = 0.01 * torch.randn(weight.shape, generator=generator)
        tensors[f"base_model.model.{name}.weight"] = (weight + noise).to(torch.bfloat16)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["embed_tokens", "lm_head"]}))


async def runs(model: torch.nn.Module, folders: dict[str, Path], max_tokens: int, repeats: int) -> dict[str, float]:
    cases: dict[str, list[str | None]] = {
        "plain_only": [None, "plain"] * 4,
        "plain_all_loaded": [None, "plain"] * 4,
        "dora_rows": ["plain", "dora"] * 4,
        "own_head_rows": ["plain", "own-head"] * 4,
    }
    best: dict[str, float] = {}
    backend = backend_for(model)
    try:
        await backend.load_adapter("plain", str(folders["plain"]))
        await run_batch(backend, cases["plain_only"], 4)  # warm-up
        for _ in range(repeats):  # interleaved (the CPU may be shared: noise only ever slows a run down)
            for name in ("dora", "own-head"):
                await backend.unload_adapter(name)
            seconds, tokens = await run_batch(backend, cases["plain_only"], max_tokens)
            best["plain_only"] = max(best.get("plain_only", 0.0), tokens / seconds)
            for name in ("dora", "own-head"):
                await backend.load_adapter(name, str(folders[name]))
            for label in ("plain_all_loaded", "dora_rows", "own_head_rows"):
                seconds, tokens = await run_batch(backend, cases[label], max_tokens)
                best[label] = max(best.get(label, 0.0), tokens / seconds)
    finally:
        await backend.aclose()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = qwen_05b_shaped(args.layers)
    with tempfile.TemporaryDirectory(prefix="bench-variants-") as tmp:
        folders = {name: Path(tmp) / name for name in ("plain", "dora", "own-head")}
        write_random_adapter(folders["plain"], model, TARGETS, seed=0)
        write_dora_adapter(folders["dora"], model)
        write_own_head_adapter(folders["own-head"], model)
        rates = asyncio.run(runs(model, folders, args.max_tokens, args.repeats))
    base = rates["plain_only"]
    result = {
        "bench": "lora_variants",
        "model": f"qwen2-0.5b-shaped random bf16, {args.layers} layers",
        "threads": torch.get_num_threads(),
        "requests": 8,
        "max_tokens": args.max_tokens,
        **{f"{label}_tok_s": round(rate, 2) for label, rate in rates.items()},
        "unused_variants_loaded_vs_plain": round(rates["plain_all_loaded"] / base, 3),
        "dora_rows_vs_plain": round(rates["dora_rows"] / base, 3),
        "own_head_rows_vs_plain": round(rates["own_head_rows"] / base, 3),
    }
    for label, rate in rates.items():
        print(f"{label:18s} {rate:8.1f} tok/s  ({rate / base:.3f} of plain only)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
