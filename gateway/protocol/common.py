"""Pieces shared by the endpoint models."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


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

    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> bias in [-100, 100] added to its logit; -100 bans the token.")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
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
    repetition_penalty: float | None = Field(
        None, gt=0, le=2, description="vLLM's extension (HF semantics): logits of tokens in the prompt or the output "
                                      "so far are divided by it when positive, multiplied when negative (1: off).")
    min_p: float | None = Field(None, ge=0, le=1, description="vLLM's extension: drop tokens less likely than min_p "
                                                               "times the most likely token (0: off).")

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {token} is {bias}; biases must lie in [-100, 100]")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)
