"""Token choice per decode step: the batched ``SamplingBatch`` against a plain argmax and a per-row Python loop.

    python -m bench.sampling [--batch 8] [--vocab 151936] [--steps 200]

Measures only the choice (logits in, token ids out), the part sampling adds to a step:
* all-greedy rows: ``SamplingBatch.choose`` must cost what ``argmax(...).tolist()`` costs (its fast path);
* all-sampled rows (temperature, top-p, top-k): vectorised over the batch vs one row at a time (what the engine did
  before: a ``torch.Generator`` and a multinomial draw per row);
* all-sampled rows with every knob (penalties, min-p, logit bias, logprobs).
Prints one line per case (fastest of ``--steps`` interleaved runs) and a JSON line last.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from backends.base import SamplingParams
from backends.sampling import SamplingBatch


def per_row_loop(logits: torch.Tensor, rows: list[tuple[SamplingParams, torch.Generator]]) -> list[int]:
    """One row at a time, each with its own generator (the engine's choice before ``SamplingBatch``)."""
    out = []
    for i, (p, generator) in enumerate(rows):
        scores = logits[i].float() / p.temperature
        if p.top_k:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > p.top_p
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(drop, 0.0))
        out.append(int(torch.multinomial(probs, 1, generator=generator).item()))
    return out


def timed(cases: dict[str, Callable[[], object]], steps: int) -> dict[str, float]:
    """Fastest milliseconds of each case. The cases run interleaved, step by step, so that load from other
    processes falls on all of them alike; the minimum is the least disturbed run."""
    for step in cases.values():
        for _ in range(3):
            step()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(steps):
        for name, step in cases.items():
            start = time.perf_counter()
            step()
            samples[name].append((time.perf_counter() - start) * 1000)
    return {name: min(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=151936)  # Qwen2.5's
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    logits = torch.randn((args.batch, args.vocab), generator=torch.Generator().manual_seed(0)) * 4
    prompts = [list(range(100 + i, 400 + i)) for i in range(args.batch)]

    greedy = SamplingBatch.of([SamplingParams(max_tokens=1, temperature=0)] * args.batch, prompts, args.vocab, device)
    sampled_params = [SamplingParams(max_tokens=1, temperature=0.7, top_p=0.9, top_k=50, seed=i)
                      for i in range(args.batch)]
    sampled = SamplingBatch.of(sampled_params, prompts, args.vocab, device)
    every = SamplingBatch.of([SamplingParams(max_tokens=1, temperature=0.7, top_p=0.9, top_k=50, min_p=0.05,
                                             frequency_penalty=0.3, presence_penalty=0.2, repetition_penalty=1.05,
                                             logit_bias=((5, 2.0),), logprobs=5, seed=i)
                              for i in range(args.batch)], prompts, args.vocab, device)
    rows = [(p, torch.Generator().manual_seed(i)) for i, p in enumerate(sampled_params)]

    results = timed({
        "argmax_ms": lambda: torch.argmax(logits, dim=-1).tolist(),
        "greedy_batch_ms": lambda: greedy.choose(logits),
        "sampled_loop_ms": lambda: per_row_loop(logits, rows),
        "sampled_batch_ms": lambda: sampled.choose(logits),
        "every_knob_batch_ms": lambda: every.choose(logits),
    }, args.steps)
    for name, value in results.items():
        print(f"{name:>22}: {value:8.3f} ms per step (batch {args.batch}, vocab {args.vocab})")
    summary = {
        "bench": "sampling", "batch": args.batch, "vocab": args.vocab, "threads": torch.get_num_threads(),
        **{k: round(v, 4) for k, v in results.items()},
        "greedy_vs_argmax": round(results["greedy_batch_ms"] / results["argmax_ms"], 3),
        "sampled_batch_vs_loop": round(results["sampled_batch_ms"] / results["sampled_loop_ms"], 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
