"""``/v1/completions`` (legacy text completions) — request, response and stream chunk."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field

from gateway.protocol.common import SamplingFields, Usage


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, or token ids (OpenAI allows both); a list of several prompts answers each of them.")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="OpenAI allows 0..5; like vLLM we allow up to 20.")
    max_tokens: int | None = Field(16, ge=1)
    n: int = Field(1, ge=1, le=16)
    suffix: str | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: parallel lists, one entry per token (``None`` for the first echoed prompt token)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None = None


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
