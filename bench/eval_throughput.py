"""``gateway eval`` throughput on the demo: examples one at a time vs concurrently (the engine batches them).

The demo gateway in-process (as ``gateway eval --demo`` runs it), the 20-example identity set of the tests repeated
``--repeat`` times, through ``tiny-qwen`` and ``pku-assistant`` (greedy, ``--max-tokens`` per answer), with 1 and
with ``--concurrency`` requests in flight. The rate is examples (of all models) per second of wall time, best of
``--runs`` (the CPU may be shared: noise only ever slows a run down), and the process's CPU seconds per example
(all threads; less sensitive to other load on a shared machine). Target: concurrent >= 4x sequential.
Prints a table, then ONE JSON line.
Run: ``PYTHONPATH=. python -m bench.eval_throughput [--repeat 2] [--concurrency 16] [--max-tokens 32]
[--max-batch-size 16]``. On a machine shared with other CPU-heavy processes, set ``OMP_NUM_THREADS=1``: torch's
threads otherwise spin waiting for each other and every rate drops ~10x.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from gateway.eval.datasets import load_examples
from gateway.eval.runner import Sampling, in_process_client, run_models
from gateway.settings import Settings

DATA = Path(__file__).parents[1] / "tests" / "gateway" / "data" / "eval"
MODELS = ("tiny-qwen", "pku-assistant")


async def measure(repeat: int, concurrency: int, max_tokens: int, runs: int,
                  max_batch_size: int) -> tuple[dict[str, float], dict[str, float]]:
    examples, _ = load_examples("identity", DATA)
    examples = examples * repeat
    sampling = Sampling(temperature=0.0, max_tokens=max_tokens)
    rates: dict[str, float] = {}
    cpu: dict[str, float] = {}
    async with in_process_client(Settings.load(demo=True, max_batch_size=max_batch_size), timeout=600) as client:
        await run_models(client, MODELS, examples[:4], sampling, concurrency, progress=False)  # warm-up
        for label, bound in (("sequential", 1), ("concurrent", concurrency)):
            best, least = 0.0, float("inf")
            for _ in range(runs):
                started, cpu_started = time.perf_counter(), time.process_time()
                await run_models(client, MODELS, examples, sampling, bound, progress=False)
                count = len(examples) * len(MODELS)
                best = max(best, count / (time.perf_counter() - started))
                least = min(least, (time.process_time() - cpu_started) / count)
            rates[label], cpu[label] = best, least
    return rates, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=16, help="the engine's (gateway serve's) batch bound")
    args = parser.parse_args()
    rates, cpu = asyncio.run(measure(args.repeat, args.concurrency, args.max_tokens, args.runs,
                                        args.max_batch_size))
    examples = 20 * args.repeat * len(MODELS)
    speedup = rates["concurrent"] / rates["sequential"]
    print(f"{examples} examples ({len(MODELS)} models), max_tokens {args.max_tokens}, "
          f"max_batch_size {args.max_batch_size}")
    print(f"sequential (1 in flight):   {rates['sequential']:7.2f} examples/s  {cpu['sequential']:.3f} CPU s/example")
    print(f"concurrent ({args.concurrency} in flight): {rates['concurrent']:7.2f} examples/s  "
          f"{cpu['concurrent']:.3f} CPU s/example")
    print(f"speedup: {speedup:.2f}x (target >= 4x)")
    print(json.dumps({"bench": "eval_throughput", "examples": examples, "max_tokens": args.max_tokens,
                      "concurrency": args.concurrency,
                      "max_batch_size": args.max_batch_size, "sequential_examples_per_s": round(rates["sequential"], 2),
                      "concurrent_examples_per_s": round(rates["concurrent"], 2), "speedup": round(speedup, 2),
                      "sequential_cpu_s_per_example": round(cpu["sequential"], 4),
                      "concurrent_cpu_s_per_example": round(cpu["concurrent"], 4),
                      "target_met": speedup >= 4}))


if __name__ == "__main__":
    main()
