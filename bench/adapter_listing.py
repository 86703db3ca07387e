"""``GET /v1/models`` with 100 run folders under ``--adapter-root``: how long the event loop stalls per listing.

Before: every listing read every folder on the event loop (walk + config + weights header + template per
folder); that synchronous work is timed directly (``old_scan_ms``, the stall every stream saw per listing).
After: the listing comes from ``gateway.adapter_roots.RootListing`` (read in a thread, reused for
``--adapter-scan-interval`` seconds, unchanged folders not inspected again). Measured in-process on the real app
(demo base, native engine): the longest gap of a 1 ms ticker on the event loop while 20 listings run, with the
default interval (cached) and with interval 0 (every listing re-reads the roots in a thread), and the listing
latency. Each is run three times and the run with the smallest gap kept (the machine's other processes'
time slices also show up as gaps).

Prints a table, then ONE JSON line. Run: ``PYTHONPATH=. python -m bench.adapter_listing``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from gateway.adapter_files import BaseShapes, inspect_adapter
from gateway.adapter_roots import run_folders
from gateway.app import create_app
from gateway.demo import build_demo
from gateway.settings import Settings
from gateway.templates import resolve_template

FOLDERS = 100
LISTINGS = 20
ROUNDS = 3


def old_scan_seconds(root: Path, base: Path) -> float:
    """What one listing cost on the event loop before: every folder read and inspected, synchronously."""
    shapes = BaseShapes.read(base)
    start = time.perf_counter()
    for _, folder in run_folders([root]):
        inspect_adapter(folder, shapes, base_names=("tiny-qwen",), allow_unsafe=False)
        resolve_template(explicit=None, adapter_dir=folder, base_template="qwen", base_dir=base)
    return time.perf_counter() - start


async def listing_run(settings: Settings) -> tuple[float, list[float], int]:
    """(longest event-loop gap, listing latencies, models listed)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        longest = 0.0
        stop = False

        async def ticker() -> None:
            nonlocal longest
            last = time.perf_counter()
            while not stop:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                longest = max(longest, now - last)
                last = now

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            await client.get("/v1/models")  # warm-up (routing, pydantic)
            tick = asyncio.create_task(ticker())
            await asyncio.sleep(0.05)
            longest = 0.0
            latencies, count = [], 0
            for _ in range(LISTINGS):
                start = time.perf_counter()
                response = await client.get("/v1/models")
                latencies.append(time.perf_counter() - start)
                count = len(response.json()["data"])
                await asyncio.sleep(0.01)  # clients list now and then, not back to back
            stop = True
            await tick
    return longest, latencies, count


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        demo = build_demo(Path(tmp) / "demo")
        root = Path(tmp) / "root"
        for i in range(FOLDERS):
            shutil.copytree(demo.adapters["pku-assistant"], root / f"train_{i:03d}")
        old = old_scan_seconds(root, demo.base_dir)
        common = {"model": str(demo.base_dir), "served_model_name": "tiny-qwen", "template": "qwen",
                  "adapter_roots": (str(root),)}
        # Three runs each, the quietest kept: on a shared machine other processes' time slices show up as gaps too.
        cached_runs = [await listing_run(Settings(**common)) for _ in range(ROUNDS)]
        reread_runs = [await listing_run(Settings(**common, adapter_scan_interval=0)) for _ in range(ROUNDS)]
        cached_gap, cached, listed = min(cached_runs, key=lambda run: run[0])
        reread_gap, reread, _ = min(reread_runs, key=lambda run: run[0])
    result = {
        "bench": "adapter_listing",
        "folders": FOLDERS,
        "models_listed": listed,
        "old_scan_ms": round(old * 1000, 1),
        "cached_listing_p50_ms": round(statistics.median(cached) * 1000, 2),
        "cached_max_loop_gap_ms": round(cached_gap * 1000, 2),
        "reread_listing_p50_ms": round(statistics.median(reread) * 1000, 2),
        "reread_max_loop_gap_ms": round(reread_gap * 1000, 2),
    }
    result["stall_ratio_old_vs_cached"] = round(result["old_scan_ms"] / max(result["cached_max_loop_gap_ms"], 0.01), 1)
    print(f"{'before: one listing, on the loop':45s} {result['old_scan_ms']:8.1f} ms")
    print(f"{'after, cached: listing p50':45s} {result['cached_listing_p50_ms']:8.2f} ms")
    print(f"{'after, cached: longest loop gap':45s} {result['cached_max_loop_gap_ms']:8.2f} ms")
    print(f"{'after, re-read each time: listing p50':45s} {result['reread_listing_p50_ms']:8.2f} ms")
    print(f"{'after, re-read each time: longest loop gap':45s} {result['reread_max_loop_gap_ms']:8.2f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
