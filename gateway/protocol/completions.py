"""``/v1/completions`` (legacy text completions) — request, response and stream chunk."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field

from gateway.protocol.common import SamplingFields, Usage


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[str]
    echo: bool = False
    max_tokens: int | None = Field(16, ge=1)
    n: int = Field(1, ge=1, le=16)
    suffix: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
