"""Mixed-adapter continuous batching vs a base-only batch vs serving one request after another with set_adapter.

Two cases (``--case dense|moe|both``, default both):

- dense: the 0.5B-shaped random Qwen2 in bf16 and 4 random rank-8 adapters (two on q,k,v,o, two on q,v; ~2 MB /
  ~1 MB);
- moe: a Qwen3-MoE-shaped random model in bf16 (hidden 768, 32 experts, top-4, expert width 384; ``--moe-layers``)
  and 4 random rank-8 adapters on q,k,v,o plus the fused experts, in peft's layout for ``lora_target: all``
  (``target_parameters`` gate_up_proj at rank 16 and down_proj at rank 8), two of them on the experts only.
Eight requests, 32 prompt tokens each, ``max_tokens`` new tokens each (greedy, EOS ignored):

- mixed:      the 8 at once over the 4 adapters (2 each), in one continuous batch of the native engine;
- base batch: the same 8 at once, all on the base, same engine (the adapters stay loaded);
- sequential: one after another through peft with ``set_adapter`` + ``generate`` (the naive way); one request per
  adapter is timed (each runs alone, so the rate is the rate of all 8).

Targets (dense): mixed >= 90 % of the base batch, mixed >= 4x sequential; the MoE case is reported against the
same targets. Rates are best-of-N (the CPU may be shared: noise only ever slows a run down); the median ratio of
back-to-back mixed/base pairs is printed too. Prints a table per case, then ONE JSON line.
Run: ``PYTHONPATH=. python -m bench.mixed_adapters [--case both] [--max-tokens 32] [--layers 24] [--moe-layers 8]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from bench.common import VOCAB, backend_for, prompt, qwen_05b_shaped, run_batch, write_random_adapter

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGETS = {"a0": ATTENTION, "a1": ["q_proj", "v_proj"], "a2": ATTENTION, "a3": ["q_proj", "v_proj"]}
MOE_TARGETS = {"m0": ATTENTION, "m1": [], "m2": ATTENTION, "m3": []}  # every one also adapts the experts


def qwen3_moe_shaped(layers: int) -> Qwen3MoeForCausalLM:
    """Random Qwen3-MoE-like model (30B-A3B's layout, narrower), bf16, eval."""
    config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                            num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=4,
                            moe_intermediate_size=384, intermediate_size=2048, tie_word_embeddings=True,
                            max_position_embeddings=4096)
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM._from_config(config, dtype=torch.bfloat16).eval()


def write_random_moe_adapter(folder: Path, model: Qwen3MoeForCausalLM, attention: list[str], rank: int = 8,
                             seed: int = 0) -> int:
    """A peft-format folder as peft 0.21 writes it for ``gate_proj/up_proj/down_proj`` (+ ``attention``)."""
    path = folder / "adapter_model.safetensors"
    tensors: dict[str, torch.Tensor] = {}
    if attention:
        write_random_adapter(folder, model, attention, rank=rank, seed=seed)  # type: ignore[arg-type]
        tensors = load_file(str(path))
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(100 + seed)
    for index, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        count, fused, hidden = experts.gate_up_proj.shape
        key = f"base_model.model.model.layers.{index}.mlp.experts"
        shapes = {f"{key}.base_layer": (2 * rank, hidden, fused), key: (rank, fused // 2, hidden)}
        for stem, (r, in_features, out_features) in shapes.items():
            a = torch.randn(count * r, in_features, generator=generator) * 0.02
            b = torch.randn(out_features, count * r, generator=generator) * 0.02
            tensors[f"{stem}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{stem}.lora_B.weight"] = b.to(torch.bfloat16)
    save_file(tensors, str(path))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": attention,
              "target_parameters": ["down_proj", "gate_up_proj"], "rank_pattern": {r".*\.gate_up_proj": 2 * rank},
              "alpha_pattern": {r".*\.gate_up_proj": 4 * rank}, "base_model_name_or_path": "qwen3-moe-shaped",
              "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return path.stat().st_size


def sequential_set_adapter(model: torch.nn.Module, folders: dict[str, Path], adapters: list[str],
                           max_tokens: int) -> tuple[float, int]:
    from peft import PeftModel

    names = list(folders)
    peft_model = PeftModel.from_pretrained(model, str(folders[names[0]]), adapter_name=names[0],
                                           autocast_adapter_dtype=False)
    for name in names[1:]:
        peft_model.load_adapter(str(folders[name]), adapter_name=name, autocast_adapter_dtype=False)
    peft_model.eval()
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for index, name in enumerate(adapters):
            peft_model.set_adapter(name)
            ids = torch.tensor([prompt(index)])
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                      min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
            tokens += out.shape[1] - ids.shape[1]
    return time.perf_counter() - start, tokens


async def engine_runs(model: torch.nn.Module, folders: dict[str, Path], mixed: list[str | None], max_tokens: int,
                      repeats: int) -> dict[str, list[float]]:
    backend = backend_for(model)
    try:
        for name, folder in folders.items():
            await backend.load_adapter(name, str(folder))
        await run_batch(backend, mixed, 4)  # warm-up
        runs: dict[str, list[float]] = {"mixed": [], "base": []}
        order: list[tuple[str, list[str | None]]] = [("mixed", mixed), ("base", [None] * len(mixed))]
        for repeat in range(repeats):  # interleaved, alternating who goes first; best of (noise only slows down)
            for label, adapters in order if repeat % 2 == 0 else order[::-1]:
                seconds, tokens = await run_batch(backend, adapters, max_tokens)
                runs[label].append(round(tokens / seconds, 2))
        return runs
    finally:
        await backend.aclose()


def run_case(case: str, args: argparse.Namespace) -> dict[str, object]:
    layers = args.layers if case == "dense" else args.moe_layers
    targets = TARGETS if case == "dense" else MOE_TARGETS

    def build() -> torch.nn.Module:
        return qwen_05b_shaped(layers) if case == "dense" else qwen3_moe_shaped(layers)

    torch.manual_seed(0)
    model = build()
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        folders = {name: Path(tmp) / name for name in targets}
        write = write_random_adapter if case == "dense" else write_random_moe_adapter
        sizes = {name: write(folders[name], model, targets[name], seed=i)  # type: ignore[operator]
                 for i, name in enumerate(folders)}
        mixed: list[str | None] = [name for name in targets for _ in range(2)]
        runs = asyncio.run(engine_runs(model, folders, mixed, args.max_tokens, args.repeats))
        rates = {label: max(values) for label, values in runs.items()}
        # One request per adapter is enough for a rate (each runs alone) and keeps the slow baseline short.
        del model  # a fresh copy for peft (the engine wrapped this one's layers; copy.deepcopy runs ~30x slower)
        seconds, tokens = sequential_set_adapter(build(), folders, list(targets), args.max_tokens)
    sequential = tokens / seconds
    shape = (f"qwen2-0.5b-shaped random bf16, {layers} layers" if case == "dense" else
             f"qwen3-moe-shaped random bf16 (hidden 768, 32 experts top-4, width 384), {layers} layers")
    result: dict[str, object] = {
        "model": shape,
        "requests": len(mixed),
        "adapter_bytes": sizes,
        "mixed_tok_s": round(rates["mixed"], 2),
        "base_batch_tok_s": round(rates["base"], 2),
        "sequential_tok_s": round(sequential, 2),
        "mixed_vs_base": round(rates["mixed"] / rates["base"], 3),
        "mixed_vs_base_paired_median": round(statistics.median(
            m / b for m, b in zip(runs["mixed"], runs["base"], strict=True)), 3),
        "mixed_vs_sequential": round(rates["mixed"] / sequential, 2),
        "runs_tok_s": runs,
    }
    print(f"[{case}] {shape}")
    print(f"mixed batch (8 over 4 adapters): {result['mixed_tok_s']:8.1f} tok/s")
    print(f"base-only batch (8):             {result['base_batch_tok_s']:8.1f} tok/s")
    print(f"sequential with set_adapter:     {result['sequential_tok_s']:8.1f} tok/s")
    print(f"mixed / base  = {result['mixed_vs_base']:.3f} best-of, {result['mixed_vs_base_paired_median']:.3f} median "
          "of back-to-back pairs   (target >= 0.90)")
    print(f"mixed / seq   = {result['mixed_vs_sequential']:.2f}x  (target >= 4x)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["dense", "moe", "both"], default="both")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--moe-layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    cases = ["dense", "moe"] if args.case == "both" else [args.case]
    result: dict[str, object] = {"bench": "mixed_adapters", "threads": torch.get_num_threads(),
                                 "max_tokens": args.max_tokens}
    for case in cases:
        result[case] = run_case(case, args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
