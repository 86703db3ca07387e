"""LoRA-affinity routing vs fewest-in-flight: how often a request finds its adapter already active on the replica.

Three fake vLLM replicas (tests/backends/fakes/vllm.py: ``--max-loras`` active LoRA slots each, an LRU; activating
an adapter that is not active is a *miss* and costs ``--load-ms``), ten runtime-loaded adapters, requests drawn
from a skewed popularity (Zipf, seeded) by ``--concurrency`` clients through one ``VLLMBackend`` with health rounds
(and ``/metrics`` scrapes) every ``--scrape-ms``. The same request sequence runs once with the lora-affinity
ordering and once with fewest in flight only. Reported: hit rate, misses, wall time and requests/s of each, the
ratio. The last line is one JSON object.

    python bench/lora_affinity.py [--requests 600] [--concurrency 6] [--max-loras 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.upstream_pool import Timeouts, UpstreamPool  # noqa: E402
from backends.vllm import VLLMBackend  # noqa: E402
from tests.backends.fakes.server import ServerThread  # noqa: E402
from tests.backends.fakes.vllm import FakeVLLM  # noqa: E402
from tests.backends.support import gen_request  # noqa: E402

ADAPTERS = [f"lora-{i}" for i in range(10)]


def workload(requests: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(ADAPTERS))]  # Zipf s=1
    return rng.choices(ADAPTERS, weights=weights, k=requests)


async def run(args: argparse.Namespace, sequence: list[str], affinity: bool) -> dict[str, Any]:
    disk = frozenset(f"/saves/{name}" for name in ADAPTERS)
    fakes = [FakeVLLM(disk=disk, max_loras=args.max_loras, tokens=args.tokens, delay_each=args.token_ms / 1000,
                      load_delay=args.load_ms / 1000) for _ in range(args.replicas)]
    servers = [ServerThread(fake.app()).start() for fake in fakes]
    pool = UpstreamPool([s.url for s in servers], timeouts=Timeouts(health_interval=args.scrape_ms / 1000))
    pool.lora_affinity = affinity
    backend = VLLMBackend(pool, base_model="tiny", verify_prompt_ids=False)
    try:
        await backend.start()
        for name in ADAPTERS:
            await backend.load_adapter(name, f"/saves/{name}")
        queue = list(reversed(sequence))

        async def client() -> None:
            while queue:
                async for _ in backend.generate(gen_request(queue.pop(), max_tokens=args.tokens)):
                    pass

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        wall = time.perf_counter() - started
    finally:
        await backend.aclose()
        for server in servers:
            server.stop()
    hits, misses = sum(f.hits for f in fakes), sum(f.misses for f in fakes)
    return {"hit_rate": round(hits / (hits + misses), 4), "hits": hits, "misses": misses,
            "wall_s": round(wall, 3), "rps": round(len(sequence) / wall, 1),
            "per_replica": [sum(f.served.values()) for f in fakes]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--max-loras", type=int, default=2, help="active LoRA slots per replica")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--token-ms", type=float, default=2.0)
    parser.add_argument("--load-ms", type=float, default=20.0, help="cost of activating an adapter (a miss)")
    parser.add_argument("--scrape-ms", type=float, default=500.0, help="health rounds with /metrics scrapes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sequence = workload(args.requests, args.seed)
    affinity = asyncio.run(run(args, sequence, affinity=True))
    baseline = asyncio.run(run(args, sequence, affinity=False))
    for label, result in (("lora-affinity", affinity), ("fewest-in-flight", baseline)):
        print(f"{label:>17}: hit rate {result['hit_rate']:.1%}  ({result['hits']} hits, {result['misses']} misses)"
              f"  {result['wall_s']:.2f} s  {result['rps']} req/s  per replica {result['per_replica']}")
    ratio = affinity["hit_rate"] / baseline["hit_rate"] if baseline["hit_rate"] else float("inf")
    print(f"hit rate ratio (affinity / fewest-in-flight): {ratio:.2f}x;"
          f" throughput ratio: {affinity['rps'] / baseline['rps']:.2f}x")
    print(json.dumps({"bench": "lora_affinity", "replicas": args.replicas, "adapters": len(ADAPTERS),
                      "max_loras": args.max_loras, "requests": args.requests, "concurrency": args.concurrency,
                      "affinity": affinity, "fewest_in_flight": baseline, "hit_rate_ratio": round(ratio, 2)}))


if __name__ == "__main__":
    main()
