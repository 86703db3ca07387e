"""The served tokenizer, with ``encode`` going straight to the Rust ``tokenizers`` backend when there is one.

transformers' Python wrapper around a fast tokenizer costs more than the tokenization itself for the short texts
a request has (measured: 14.6 us vs 5.8 us per call on a chat segment); the ids are the same, since the wrapper
calls that backend with the same ``add_special_tokens``. Everything else is the transformers tokenizer's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from starlette.requests import Request

LONG_TEXT = 4096  # characters; above this, tokenization lets other threads run (see ``encode``)


class ServedTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.hf = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        self._backend = backend

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._backend is None:
            return list(self.hf.encode(text, add_special_tokens=add_special_tokens))
        if len(text) > LONG_TEXT:
            # The Rust ``encode`` holds the GIL throughout (a 1 MB text: 4 s in which no other thread, the event
            # loop included, runs); ``encode_batch`` releases it and gives the same ids.
            return list(self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def __len__(self) -> int:  # the vocabulary size with added tokens (dunders bypass __getattr__)
        return len(self.hf)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.hf, name)


# Bodies from this size on are rendered and tokenized on a worker thread. Measured (bench/prompt_offload.py, demo
# tokenizer, this 2-core box): a thread hop costs 0.06 ms; 4096 characters take 2 ms on the loop, 16384 take 32 ms
# and 65536 take 164 ms (it grows faster than linearly), all of which every other request (/health too) would wait.
# 8 KiB of JSON is 3-8 k characters of text: below it the loop is blocked for at most a few ms.
OFFLOAD_BODY_BYTES = 8 << 10

T = TypeVar("T")


async def prepare_off_loop(request: Request, prepare: Callable[..., T], *args: Any) -> T:
    """``prepare(*args)`` (render + tokenize), on a worker thread when the request body is large or its size
    unknown (chunked), on the loop otherwise (the hop would cost more than it saves)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) < OFFLOAD_BODY_BYTES:
        return prepare(*args)
    return await anyio.to_thread.run_sync(prepare, *args)
