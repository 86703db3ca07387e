"""Mixed-adapter continuous batching vs a base-only batch vs serving one request after another with set_adapter.

The 0.5B-shaped random Qwen2 in bf16 and 4 random rank-8 adapters (two on q,k,v,o, two on q,v; ~2 MB / ~1 MB).
Eight requests, 32 prompt tokens each, ``max_tokens`` new tokens each (greedy, EOS ignored):

- mixed:      the 8 at once over the 4 adapters (2 each), in one continuous batch of the native engine;
- base batch: the same 8 at once, all on the base, same engine (the adapters stay loaded);
- sequential: one after another through peft with ``set_adapter`` + ``generate`` (the naive way); one request per
  adapter is timed (each runs alone, so the rate is the rate of all 8).

Targets: mixed >= 90 % of the base batch, mixed >= 4x sequential. Rates are best-of-N (the CPU may be shared: noise
only ever slows a run down); the median ratio of back-to-back mixed/base pairs is printed too. Prints a table, then
ONE JSON line.
Run: ``PYTHONPATH=. python -m bench.mixed_adapters [--max-tokens 32] [--layers 24]``.
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

from bench.common import backend_for, prompt, qwen_05b_shaped, run_batch, write_random_adapter

TARGETS = {"a0": ["q_proj", "k_proj", "v_proj", "o_proj"], "a1": ["q_proj", "v_proj"],
           "a2": ["q_proj", "k_proj", "v_proj", "o_proj"], "a3": ["q_proj", "v_proj"]}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = qwen_05b_shaped(args.layers)
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        folders = {name: Path(tmp) / name for name in TARGETS}
        sizes = {name: write_random_adapter(folders[name], model, TARGETS[name], seed=i)
                 for i, (name, folder) in enumerate(folders.items())}
        mixed: list[str | None] = [name for name in TARGETS for _ in range(2)]
        runs = asyncio.run(engine_runs(model, folders, mixed, args.max_tokens, args.repeats))
        rates = {label: max(values) for label, values in runs.items()}
        # One request per adapter is enough for a rate (each runs alone) and keeps the slow baseline short.
        del model  # a fresh copy for peft (the engine wrapped this one's layers; copy.deepcopy runs ~30x slower)
        seconds, tokens = sequential_set_adapter(qwen_05b_shaped(args.layers), folders, list(TARGETS),
                                                 args.max_tokens)
    sequential = tokens / seconds
    result = {
        "bench": "mixed_adapters",
        "model": f"qwen2-0.5b-shaped random bf16, {args.layers} layers",
        "threads": torch.get_num_threads(),
        "requests": len(mixed),
        "max_tokens": args.max_tokens,
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
    print(f"mixed batch (8 over 4 adapters): {result['mixed_tok_s']:8.1f} tok/s")
    print(f"base-only batch (8):             {result['base_batch_tok_s']:8.1f} tok/s")
    print(f"sequential with set_adapter:     {result['sequential_tok_s']:8.1f} tok/s")
    print(f"mixed / base  = {result['mixed_vs_base']:.3f} best-of, {result['mixed_vs_base_paired_median']:.3f} median "
          "of back-to-back pairs   (target >= 0.90)")
    print(f"mixed / seq   = {result['mixed_vs_sequential']:.2f}x  (target >= 4x)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
