"""The contract between the gateway and an inference engine.

A backend receives a prompt the gateway has already rendered and tokenized, and streams back what it generates.
It never sees chat messages or templates: that keeps every backend answering the same way for the same prompt.

Errors: a backend raises only ``gateway.errors.GatewayError`` subclasses. Foreign exceptions (httpx, torch) are
translated at the backend's edge, e.g. ``raise UpstreamError("...") from exc``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class OutputConstraint:
    """What the output must be: ``prefix``, one JSON value valid against ``json_schema``, ``suffix``, then the end.

    ``json_schema`` is JSON text (``{"type": "object"}`` for JSON mode); ``prefix``/``suffix`` are literal text (a
    tool format's markers). ``thought`` holds a reasoning template's (open, close) words when the output may start
    with a thought block before ``prefix``; the text inside it is not constrained. ``param`` names the request field
    the constraint comes from, for errors. Hashable: backends cache compiled grammars by it.
    """

    json_schema: str
    prefix: str = ""
    suffix: str = ""
    thought: tuple[str, str] | None = None
    param: str = "response_format"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` means greedy; ``stop_token_ids`` end generation when sampled."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings; the gateway also enforces them across token boundaries
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # the model's end-of-sequence ids do not stop generation (stop_token_ids still do)
    # ``stop`` / ``stop_token_ids`` hold everything that ends this generation (the gateway's stop rule, as
    # LLaMA-Factory stops: gateway.stop_tokens): an upstream's own eos / generation-config ids must not end it too.
    only_listed_stops: bool = False
    # Penalties: frequency/presence as OpenAI (over the row's generated tokens, subtracted from the logits);
    # repetition as HF/vLLM (over prompt + generated tokens: positive logits divided, negative multiplied).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0  # drop tokens whose probability is below min_p x the most likely token's (0 = off)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit); -100 bans the token
    logprobs: int | None = None  # report each chosen token's logprob and this many alternatives (None = off)
    prompt_logprobs: int | None = None  # also every prompt token's (the first has none), with this many alternatives
    # Fields whose value is the served model's default (generation_config.json, sampling_defaults), not the
    # request's: an upstream that cannot take one leaves it to its own defaults instead of refusing the request.
    defaulted: frozenset[str] = frozenset()
    constraint: OutputConstraint | None = None  # structured output (response_format, forced tool calls)


@dataclass(frozen=True)
class GenerationRequest:
    """One completion to produce. ``adapter`` is the LoRA name, or ``None`` for the base model."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    prompt_text: str
    adapter: str | None
    sampling: SamplingParams


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and the ``top`` most likely tokens at its position as (token id, logprob),
    most likely first. Values are the log-softmax of the logits after logit bias and penalties, before temperature
    and top-k/top-p/min-p truncation."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """A piece of output.

    Native backends fill ``token_ids`` and leave ``text`` as ``None``: the gateway detokenizes incrementally.
    Upstream backends that only return text fill ``text`` (and ``token_ids`` when the upstream reports them).
    The last delta of a stream has ``finish_reason`` set; upstreams may report their own token counts in
    ``prompt_tokens`` / ``completion_tokens`` on it.
    When the request asked for them, ``logprobs`` has one entry per generated token of this delta (aligned with
    ``token_ids``; the last delta may have one entry more: the stop token that ended the row, which has no text),
    and the first delta carries ``prompt_logprobs``: one entry per prompt token, ``None`` first.
    """

    token_ids: tuple[int, ...] = ()
    text: str | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; the gateway consults this instead of probing."""

    runtime_adapters: bool = False  # load_adapter / unload_adapter work while serving
    token_ids_in: bool = True  # accepts prompt token ids (otherwise the rendered text is sent)
    token_ids_out: bool = True  # reports generated token ids
    max_context: int | None = None


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str = ""
    extra: dict[str, object] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    capabilities: Capabilities

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the completion. Closing the iterator early (``aclose``) cancels the request."""
        ...

    async def load_adapter(self, name: str, path: str) -> None:
        """Make adapter ``name`` available; returns at once if it is already loaded from ``path``."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """Forget adapter ``name``; returns at once if it is not loaded."""
        ...

    async def health(self) -> Health: ...

    async def aclose(self) -> None: ...
