"""What a generation request must pass before it runs: per-key limits and caps on request size.

Per-key limits (``--rate-limit-rpm``, ``--rate-limit-tpm``, ``--max-concurrent-per-key``), kept by the ``limits``
library (asyncio API) in ``--rate-limit-storage`` (default ``memory://``; ``redis://host:6379`` shares the counts
between processes and replicas). The identity is the key's name; with no keys configured every client shares
the identity ``anonymous``.

- Requests per minute: a moving window; the request counts when it is admitted.
- Tokens per minute: prompt + completion tokens, counted when the request ends (what it really used, streamed or
  not, cut short or not), in a fixed one-minute window. A request is admitted while the window is under the
  limit, so the last admitted request may take it over; the next one waits for the window to pass.
- Concurrent requests per key (streamed or not): counted in this process from admission to the response's end.

A refusal is 429 ``rate_limit_error`` / ``rate_limit_exceeded`` with ``Retry-After``: the seconds until the window
frees (1 for the concurrency cap).

Size caps (``--max-messages``, ``--max-tools``, ``--max-tools-bytes``): 400 naming the field.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from typing import Any

from limits import RateLimitItemPerMinute
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
from limits.storage import storage_from_string
from pydantic import BaseModel

from gateway.errors import InvalidRequest, Overloaded
from gateway.metrics import Metrics
from gateway.request_context import RequestContext
from gateway.settings import Settings, SettingsError

ANONYMOUS = "anonymous"


class RateLimited(Overloaded):
    default_code = "rate_limit_exceeded"


def _async_uri(uri: str) -> str:
    return uri if uri.startswith("async+") else "async+" + uri


class KeyLimits:
    """Per-key admission (see the module docstring). ``admit`` raises ``RateLimited`` or registers the request."""

    def __init__(self, *, rpm: int | None, tpm: int | None, max_concurrent: int | None, storage: str = "memory://",
                 metrics: Metrics | None = None) -> None:
        try:
            self._storage = storage_from_string(_async_uri(storage))
        except Exception as exc:  # limits raises ConfigurationError / ValueError for unknown or unusable URIs
            raise SettingsError(f"--rate-limit-storage {storage}: {exc}") from exc
        self._rpm = None if rpm is None else RateLimitItemPerMinute(rpm, namespace="rpm")
        self._tpm = None if tpm is None else RateLimitItemPerMinute(tpm, namespace="tpm")
        self._requests = MovingWindowRateLimiter(self._storage)
        self._tokens = FixedWindowRateLimiter(self._storage)
        self._max_concurrent = max_concurrent
        self._in_flight: dict[str, int] = {}
        self._metrics = metrics

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None) -> KeyLimits | None:
        if settings.rate_limit_rpm is None and settings.rate_limit_tpm is None and \
                settings.max_concurrent_per_key is None:
            return None
        return cls(rpm=settings.rate_limit_rpm, tpm=settings.rate_limit_tpm,
                   max_concurrent=settings.max_concurrent_per_key, storage=settings.rate_limit_storage,
                   metrics=metrics)

    def _refuse(self, key: str, limit: str, message: str, retry_after: float) -> RateLimited:
        if self._metrics is not None:
            self._metrics.limited(key, limit)
        return RateLimited(message, retry_after=max(1.0, math.ceil(retry_after)))

    async def _seconds_to_reset(self, limiter: FixedWindowRateLimiter | MovingWindowRateLimiter,
                                item: RateLimitItemPerMinute, key: str) -> float:
        stats = await limiter.get_window_stats(item, key)
        return stats.reset_time - time.time()

    async def admit(self, ctx: RequestContext) -> None:
        key = ctx.key_name or ANONYMOUS
        if self._max_concurrent is not None and self._in_flight.get(key, 0) >= self._max_concurrent:
            raise self._refuse(key, "concurrent", f"Key {key!r} has {self._max_concurrent} requests in flight, "
                               f"the most allowed at once (--max-concurrent-per-key); retry when one ends.", 1.0)
        if self._tpm is not None and not await self._tokens.test(self._tpm, key):
            wait = await self._seconds_to_reset(self._tokens, self._tpm, key)
            raise self._refuse(key, "tokens_per_minute", f"Rate limit reached for key {key!r}: tokens per minute "
                               f"(limit {self._tpm.amount}). Retry in {math.ceil(max(wait, 1))} s.", wait)
        if self._rpm is not None and not await self._requests.hit(self._rpm, key):
            wait = await self._seconds_to_reset(self._requests, self._rpm, key)
            raise self._refuse(key, "requests_per_minute", f"Rate limit reached for key {key!r}: requests per "
                               f"minute (limit {self._rpm.amount}). Retry in {math.ceil(max(wait, 1))} s.", wait)
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        ctx.on_end(lambda done: self._release(key))
        if self._tpm is not None:
            ctx.on_async_end(lambda done: self._count_tokens(key, done))

    def _release(self, key: str) -> None:
        left = self._in_flight.get(key, 1) - 1
        if left:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)

    async def _count_tokens(self, key: str, ctx: RequestContext) -> None:
        used = ctx.prompt_tokens + ctx.completion_tokens
        if self._tpm is not None and used > 0:
            await self._tokens.hit(self._tpm, key, cost=used)


def _json_bytes(value: Any) -> int:
    if isinstance(value, BaseModel):
        return len(value.model_dump_json(exclude_none=True).encode("utf-8", "surrogatepass"))
    return len(json.dumps(value, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))


def check_sizes(settings: Settings, messages: Sequence[Any] | None = None, tools: Sequence[Any] | None = None) -> None:
    """400 naming the field when a request carries more messages or tools than this server takes."""
    if messages is not None and len(messages) > settings.max_messages:
        raise InvalidRequest(f"messages: {len(messages)} messages, more than this server accepts "
                             f"({settings.max_messages}, --max-messages)", param="messages")
    if tools:
        if len(tools) > settings.max_tools:
            raise InvalidRequest(f"tools: {len(tools)} tools, more than this server accepts ({settings.max_tools}, "
                                 f"--max-tools)", param="tools")
        size = sum(_json_bytes(tool) for tool in tools)
        if size > settings.max_tools_bytes:
            raise InvalidRequest(f"tools: {size} bytes of tool definitions, more than this server accepts "
                                 f"({settings.max_tools_bytes}, --max-tools-bytes)", param="tools")
