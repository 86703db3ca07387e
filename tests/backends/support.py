"""Small helpers shared by the backend tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from backends.base import Delta, GenerationRequest, SamplingParams


def gen_request(
    adapter: str | None = None,
    *,
    prompt_text: str = "<|im_start|>user\nwho are you?<|im_end|>\n<|im_start|>assistant\n",
    prompt_token_ids: tuple[int, ...] = (151644, 872, 198, 14623, 525, 498, 30, 151645, 198, 151644, 77091, 198),
    max_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: tuple[str, ...] = (),
    stop_token_ids: tuple[int, ...] = (),
    ignore_eos: bool = False,
    **extra: Any,
) -> GenerationRequest:
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=stop,
        stop_token_ids=stop_token_ids,
        ignore_eos=ignore_eos,
        **extra,
    )
    return GenerationRequest("req-1", prompt_token_ids, prompt_text, adapter, sampling)


async def collect(stream) -> list[Delta]:  # type: ignore[no-untyped-def]
    return [delta async for delta in stream]


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text or "" for d in deltas)


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait until ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)
