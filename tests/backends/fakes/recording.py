"""What a fake upstream remembers: every request it received, and how it should misbehave next."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Recorded:
    method: str
    path: str
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Faults:
    """Misbehaviour switches, read by the fakes on every generation request.

    ``status``: answer this HTTP status with the engine's error body instead of generating.
    ``error_after``: send an in-stream error object after this many pieces.
    ``drop_after``: break the connection (no terminating chunk) after this many pieces.
    ``delay_first``: seconds to wait before the first byte of the body; ``delay_each``: between pieces.
    ``health_status``: what the health endpoint answers.
    """

    status: int | None = None
    error_after: int | None = None
    drop_after: int | None = None
    delay_first: float = 0.0
    delay_each: float = 0.0
    health_status: int = 200


@dataclass
class Recorder:
    requests: list[Recorded] = field(default_factory=list)
    faults: Faults = field(default_factory=Faults)
    aborted: int = 0  # streams that ended before their last byte (the client went away, or a dropped fault)
    completed: int = 0

    def bodies(self, path: str) -> list[Any]:
        return [r.body for r in self.requests if r.path == path]


class DroppedConnection(Exception):
    """Raised inside a streaming body to make uvicorn cut the connection mid-answer."""


def pieces_of(text: str) -> list[str]:
    """Split an answer into token-like pieces: words with their leading space."""
    out: list[str] = []
    for i, word in enumerate(text.split(" ")):
        out.append(word if i == 0 else " " + word)
    return [p for p in out if p]


def apply_stop(pieces: list[str], max_tokens: int, stop: list[str]) -> tuple[list[str], str]:
    """Generate like an engine: at most ``max_tokens`` pieces, cut before the first stop string (which may span
    pieces; engines hold back a partial match, so nothing after the cut is sent)."""
    taken = pieces[:max_tokens]
    text = "".join(taken)
    hits = [text.find(s) for s in stop if s and s in text]
    if not hits:
        return taken, ("length" if len(pieces) > max_tokens else "stop")
    cut, out, pos = min(hits), [], 0
    for piece in taken:
        if pos >= cut:
            break
        out.append(piece[: cut - pos])
        pos += len(piece)
    return [p for p in out if p], "stop"


async def tracked(recorder: Recorder, stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """Pass ``stream`` through, counting in ``recorder`` whether it ran to its end or was abandoned."""
    finished = False
    try:
        async for item in stream:
            yield item
        finished = True
    finally:
        if finished:
            recorder.completed += 1
        else:
            recorder.aborted += 1
