"""When rendering + tokenizing a prompt should leave the event loop: ``python -m bench.prompt_offload``.

A thread hop (``anyio.to_thread.run_sync``) costs a fixed amount; rendering and tokenizing grow with the prompt.
Below the threshold the hop would cost more than the time the loop is blocked is worth; above it, other requests
(``/health`` included) wait for the whole tokenization. Prints per size: on-loop time, hop cost, and the ratio;
the last line is JSON.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import anyio

from gateway.demo import build_demo
from gateway.templates import encode_segments, resolve_template
from gateway.tokenization import ServedTokenizer

SIZES = (256, 1024, 4096, 16384, 65536)


def _median_ms(fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


async def main() -> None:
    from transformers import AutoTokenizer

    demo = build_demo()
    tokenizer = ServedTokenizer(AutoTokenizer.from_pretrained(str(demo.base_dir)))
    template = resolve_template(explicit="qwen", adapter_dir=None, base_template=None, base_dir=None).template

    def render(text: str) -> int:
        rendering = template.render([{"role": "user", "content": text}], None)
        return len(encode_segments(tokenizer, rendering.segments))

    hops = []
    for _ in range(200):
        start = time.perf_counter()
        await anyio.to_thread.run_sync(int)
        hops.append(time.perf_counter() - start)
    hop_ms = statistics.median(hops) * 1000
    rows = {}
    for size in SIZES:
        text = ("北京大学的人工智能助手 hello world, " * (size // 20 + 1))[:size]
        on_loop = _median_ms(lambda text=text: render(text), 20)
        rows[size] = round(on_loop, 4)
        print(f"{size:>6} chars: render+tokenize {on_loop:8.3f} ms on the loop; thread hop {hop_ms:.3f} ms "
              f"({on_loop / hop_ms:6.1f}x the hop)")
    print(json.dumps({"bench": "prompt_offload", "hop_ms": round(hop_ms, 4), "render_ms_by_chars": rows}))


if __name__ == "__main__":
    asyncio.run(main())
