"""Watching a response as it is generated, for the feedback store and for compare's figures.

``Observation.watch`` wraps the choice streams of one response. When the last of them ends it writes the
``ResponseRecord`` (before the stream's last piece reaches the caller, so a client that has its answer can vote on it
at once); a stream that fails is recorded as an error, one closed early (the client went away) as cancelled.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio

from gateway.errors import GatewayError
from gateway.experiments.routing import Resolution
from gateway.experiments.store import FeedbackStore, ResponseRecord, Status
from gateway.streaming import TextPiece

log = logging.getLogger(__name__)

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "max_tokens", "max_completion_tokens", "n", "stop",
                   "ignore_eos")


def sampling_of(body: Any) -> dict[str, Any]:
    """The sampling fields a request set (for the record)."""
    return {name: getattr(body, name) for name in SAMPLING_FIELDS if getattr(body, name, None) not in (None, False)}


class Observation:
    """One response: its id, where it ran, and its figures once its streams end."""

    def __init__(self, store: FeedbackStore, response_id: str, endpoint: str, resolution: Resolution, *,
                 prompt: str, prompt_tokens: int, sampling: dict[str, Any], keep_text: bool) -> None:
        self.response_id = response_id
        self.resolution = resolution
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.ttft_s: float | None = None
        self.latency_s: float | None = None
        self._store = store
        self._endpoint = endpoint
        self._prompt = prompt
        self._sampling = sampling
        self._keep_text = keep_text
        self._texts: list[str] = []
        self._open = 0
        self._status: Status = "ok"
        self._error: str | None = None
        self._start = time.perf_counter()
        self._recorded = False

    @property
    def tokens_per_s(self) -> float | None:
        """Completion tokens over the whole time of the response."""
        if not self.latency_s:
            return None
        return self.completion_tokens / self.latency_s

    def watch(self, streams: list[AsyncIterator[TextPiece]]) -> list[AsyncIterator[TextPiece]]:
        self._texts = [""] * len(streams)
        self._open = len(streams)
        return [self._watch(i, s) for i, s in enumerate(streams)]

    async def _watch(self, index: int, stream: AsyncIterator[TextPiece]) -> AsyncIterator[TextPiece]:
        finished = False
        try:
            async for piece in stream:
                if self.ttft_s is None:
                    self.ttft_s = time.perf_counter() - self._start
                self._texts[index] += piece.text
                if piece.finish_reason is not None:
                    finished = True
                    self.completion_tokens += piece.completion_tokens or 0
                    await self._stream_ended()
                yield piece
        except GatewayError as exc:
            self._status, self._error = "error", exc.message
            raise
        except Exception as exc:
            self._status, self._error = "error", type(exc).__name__
            raise
        finally:
            if not finished:
                if self._status == "ok":
                    self._status = "cancelled"
                await self._stream_ended()

    async def _stream_ended(self) -> None:
        self._open -= 1
        if self._open > 0 or self._recorded:
            return
        self._recorded = True
        self.latency_s = time.perf_counter() - self._start
        record = ResponseRecord(
            id=self.response_id, endpoint=self._endpoint, model=self.resolution.model, route=self.resolution.route,
            prompt_hash=hashlib.sha256(self._prompt.encode("utf-8")).hexdigest(), sampling=self._sampling,
            status=self._status, latency_s=self.latency_s, ttft_s=self.ttft_s, prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens, error=self._error,
            prompt=self._prompt if self._keep_text else None,
            output="\x1e".join(self._texts) if self._keep_text else None)
        try:
            with anyio.CancelScope(shield=True):  # a client that hangs up still leaves its record
                await self._store.record(record)
        except Exception:  # the answer matters more than its record
            log.exception("could not record response %s", self.response_id)
