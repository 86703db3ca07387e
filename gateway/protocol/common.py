"""Pieces shared by the endpoint models."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class OpenAIModel(BaseModel):
    """Accepts fields we do not know (OpenAI adds fields often); routes log them once."""

    model_config = ConfigDict(extra="allow")


class StreamOptions(OpenAIModel):
    include_usage: bool | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SamplingFields(OpenAIModel):
    """Sampling parameters common to chat and text completions, in OpenAI's order."""

    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None

    # --- lora-gateway extensions -------------------------------------------------------------------------------
    top_k: int | None = Field(None, ge=0, description="Sample from the k most likely tokens only (0: all).")
    ignore_eos: bool = Field(False, description="vLLM's extension: keep generating past the end-of-sequence token "
                                                "(stop strings still apply); for benchmarks.")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)
