"""Pieces shared by the endpoint models.

Request models are strict about types, as the OpenAI API is: ``"stream": "yes"`` or ``"n": "2"`` is a 400, not
coerced (an integer is still a valid number: ``"temperature": 1``). Every string of a request body must be valid
Unicode: a lone UTF-16 surrogate (``"\\ud800"`` in JSON) can be neither tokenized nor echoed back, so it is a 400.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.errors import InvalidRequest

GREEDY_BELOW = 1e-5  # a temperature under this samples as greedy (vLLM's _SAMPLING_EPS): logits / T would overflow
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # OpenAI documents seed as a 64-bit signed integer


def lone_surrogate_at(value: Any, path: str = "") -> str | None:
    """Where in a parsed JSON body a string holds a lone surrogate (``messages.0.content``), or ``None``."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        where = f"{path}.{key}" if path else str(key)
        found = lone_surrogate_at(key, where) if isinstance(key, str) else None
        found = found or lone_surrogate_at(item, where)
        if found:
            return found
    return None


class RequestBody(BaseModel):
    """The root model of a request body: strict types, and only valid Unicode in its strings."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = lone_surrogate_at(data)
        if where is not None:  # not a ValueError: pydantic lets ours through, with the exact param
            raise InvalidRequest(f"{where}: holds a lone UTF-16 surrogate, which is not valid Unicode text",
                                 param=where, code="invalid_unicode")
        return data


class OpenAIModel(BaseModel):
    """Accepts fields we do not know (OpenAI adds fields often); routes log them once. Strict types."""

    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(OpenAIModel):
    include_usage: bool | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SamplingFields(OpenAIModel, RequestBody):
    """Sampling parameters common to chat and text completions, in OpenAI's order."""

    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> bias in [-100, 100] added to its logit; -100 bans the token.")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2, description=(
        f"As in OpenAI; below {GREEDY_BELOW} it is greedy (0), since dividing logits by it would overflow."))
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

    @field_validator("temperature", mode="after")
    @classmethod
    def _tiny_temperature_is_greedy(cls, value: float | None) -> float | None:
        return 0.0 if value is not None and value < GREEDY_BELOW else value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)
