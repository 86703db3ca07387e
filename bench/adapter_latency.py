"""Time to first token with 8 streams decoding vs idle, and adapter hot-load latency, on the native engine.

The 0.5B-shaped random Qwen2 in bf16 (see ``bench.common``), 32-token prompts.

- TTFT idle: a lone request's first token (its prefill), median of 12 (6 before, 6 after the busy phase).
- TTFT busy: the same while 8 streams over 4 adapters decode, median of 12. Target: busy <= 2x idle.
- Hot load: ``load_adapter`` of a 2 MB rank-8 q,k,v,o adapter then ``unload_adapter``, 20 times; p50 of the load.
  Target: <= 50 ms. Also measured while the 8 streams decode (a load waits for the step in progress to end).

Prints a table, then ONE JSON line. Run: ``PYTHONPATH=. python -m bench.adapter_latency``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from backends.torch_native import TorchBackend
from bench.common import backend_for, percentile, qwen_05b_shaped, request, time_to_first_token, write_random_adapter

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


async def hot_loads(backend: TorchBackend, folder: Path, times: int) -> list[float]:
    seconds = []
    for _ in range(times):
        start = time.perf_counter()
        await backend.load_adapter("hot", str(folder))
        seconds.append(time.perf_counter() - start)
        await backend.unload_adapter("hot")
    return seconds


async def idle_ttft(backend: TorchBackend, first_index: int, times: int) -> list[float]:
    """TTFT with nothing else running: wait until the previous probe's row has left the engine."""
    seconds = []
    for i in range(times):
        while backend._engine.batch_size or backend._engine.queue_depth:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        seconds.append(await time_to_first_token(backend, first_index + i, "a0"))
    return seconds


async def measure(model: torch.nn.Module, folders: dict[str, Path], hot: Path) -> dict[str, list[float]]:
    backend = backend_for(model, max_batch_size=16)
    try:
        for name, folder in folders.items():
            await backend.load_adapter(name, str(folder))
        for i in range(3):  # warm-up: base and LoRA prefill shapes
            await time_to_first_token(backend, 90 + i, None if i == 0 else "a0")
        idle = await idle_ttft(backend, 100, 6)
        loads_idle = await hot_loads(backend, hot, 20)

        streams = [backend.generate(request(i, f"a{i % 4}", 100_000)) for i in range(8)]
        for stream in streams:
            await anext(stream)  # all 8 are decoding from here on

        async def drain(stream: object) -> None:
            async for _ in stream:  # type: ignore[attr-defined]
                pass

        draining = [asyncio.create_task(drain(s)) for s in streams]
        busy = []
        for i in range(12):
            await asyncio.sleep(0.05 * (i % 3))  # land at different points of a step
            busy.append(await time_to_first_token(backend, 200 + i, "a1"))
        loads_busy = await hot_loads(backend, hot, 5)
        for task in draining:
            task.cancel()
        await asyncio.gather(*draining, return_exceptions=True)
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]
        idle += await idle_ttft(backend, 300, 6)  # idle again, so both phases see the same machine load
        return {"idle": idle, "busy": busy, "loads_idle": loads_idle, "loads_busy": loads_busy}
    finally:
        await backend.aclose()


def main() -> None:
    model = qwen_05b_shaped()
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        folders = {f"a{i}": Path(tmp) / f"a{i}" for i in range(4)}
        for i, folder in enumerate(folders.values()):
            write_random_adapter(folder, model, QKVO if i % 2 == 0 else ["q_proj", "v_proj"], seed=i)
        hot = Path(tmp) / "hot"
        hot_bytes = write_random_adapter(hot, model, QKVO, seed=42)
        runs = asyncio.run(measure(model, folders, hot))
    ms = {key: [round(v * 1000, 1) for v in values] for key, values in runs.items()}
    result = {
        "bench": "adapter_latency",
        "model": "qwen2-0.5b-shaped random bf16, 24 layers",
        "threads": torch.get_num_threads(),
        "ttft_idle_ms": statistics.median(ms["idle"]),
        "ttft_busy_ms": statistics.median(ms["busy"]),
        "ttft_ratio": round(statistics.median(ms["busy"]) / statistics.median(ms["idle"]), 2),
        "hot_adapter_bytes": hot_bytes,
        "hot_load_p50_ms": percentile(ms["loads_idle"], 0.5),
        "hot_load_p90_ms": percentile(ms["loads_idle"], 0.9),
        "hot_load_busy_p50_ms": percentile(ms["loads_busy"], 0.5),
        "runs_ms": ms,
    }
    print(f"TTFT idle:                   {result['ttft_idle_ms']:7.1f} ms")
    print(f"TTFT with 8 streams decoding:{result['ttft_busy_ms']:7.1f} ms   ratio {result['ttft_ratio']:.2f} "
          "(target <= 2)")
    print(f"hot load ({hot_bytes / 1e6:.1f} MB rank 8) p50: {result['hot_load_p50_ms']:6.1f} ms   "
          f"p90 {result['hot_load_p90_ms']:.1f} ms (target p50 <= 50 ms)")
    print(f"hot load while 8 streams decode p50: {result['hot_load_busy_p50_ms']:6.1f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
