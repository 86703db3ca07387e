"""The part of a request shared by chat and text completions: budget, sampling, and running ``n`` choices."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from backends.base import GenerationRequest, OutputConstraint, SamplingParams
from gateway.adapters import Lease
from gateway.errors import InvalidRequest
from gateway.protocol.common import SamplingFields
from gateway.registry import Target
from gateway.request_context import current_request
from gateway.sampling_defaults import OPENAI_DEFAULTS, requested_or_default
from gateway.state import GatewayState
from gateway.streaming import TextPiece, stream_text

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class PreparedPrompt:
    text: str
    token_ids: tuple[int, ...]
    stop: tuple[str, ...]  # the end tokens (below) + the request's stop strings
    end: tuple[str, ...] = ()  # what ends a generation unasked (template eos and stop words, see stop_tokens);
    # ``ignore_eos`` leaves these out and keeps only the request's own stops
    end_complete: bool = False  # ``end`` is all that may end it unasked: an upstream's own eos ids must not


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def note_unknown_fields(state: GatewayState, body: SamplingFields) -> None:
    """Unknown request fields are accepted (OpenAI adds fields often) and logged once each."""
    for name in body.model_extra or {}:
        if name not in state.unknown_fields_seen:
            state.unknown_fields_seen.add(name)
            log.info("ignoring unknown request field %r (logged once)", name)


CAPPED_HEADER = "x-gateway-max-tokens-capped"


def completion_budget(state: GatewayState, prompt_tokens: int, requested: int | None) -> int:
    """Tokens the completion may use: what was asked for, capped by what the context has left.

    A cap is logged (info, once per request) and reported to the client by ``capped_headers``.
    """
    room = state.max_model_len - prompt_tokens
    if room <= 0:
        raise InvalidRequest(
            f"This model's maximum context length is {state.max_model_len} tokens. However, your prompt is "
            f"{prompt_tokens} tokens long, which leaves no room for the completion. Please shorten your messages.",
            param="messages",
            code="context_length_exceeded",
        )
    if requested is not None and requested > room:
        log.info("max_tokens %d capped to %d: the prompt's %d tokens leave that much of the %d-token context",
                 requested, room, prompt_tokens, state.max_model_len)
        return room
    return room if requested is None else requested


def capped_headers(requested: int | None, budget: int) -> dict[str, str]:
    """``x-gateway-max-tokens-capped: N`` when the request asked for more than the ``budget`` it got."""
    return {CAPPED_HEADER: str(budget)} if requested is not None and requested > budget else {}


@dataclass(frozen=True)
class LogprobRequest:
    """What a request asks to be reported: ``logprobs`` alternatives per generated token, ``prompt`` per prompt
    token (echo); ``None`` = not at all."""

    logprobs: int | None = None
    prompt: int | None = None


def logit_bias(tokenizer: Any, body: SamplingFields) -> tuple[tuple[int, float], ...]:
    """The request's ``logit_bias`` as (token id, bias); ids must be tokens of the target's vocabulary."""
    pairs = []
    vocab = len(tokenizer)
    for key, bias in (body.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidRequest(f"logit_bias: {key!r} is not a token id", param="logit_bias") from None
        if not 0 <= token < vocab:
            raise InvalidRequest(f"logit_bias: token id {token} is not in the vocabulary (0..{vocab - 1})",
                                 param="logit_bias")
        pairs.append((token, float(bias)))
    return tuple(pairs)


def sampling_params(body: SamplingFields, max_tokens: int, stop: Sequence[str], stop_token_ids: Sequence[int],
                    choice: int, defaults: Mapping[str, float | int] = OPENAI_DEFAULTS,
                    bias: tuple[tuple[int, float], ...] = (), logprobs: LogprobRequest = LogprobRequest(),
                    constraint: OutputConstraint | None = None, only_listed_stops: bool = False) -> SamplingParams:
    """The engine's parameters for one choice; a field the request leaves out takes the model's ``defaults``
    (``gateway.sampling_defaults``: request field name → value)."""
    # Choice i samples with seed + i, wrapped into the signed 64-bit range every engine takes.
    seed = None if body.seed is None else (body.seed + choice + 2**63) % 2**64 - 2**63
    values = requested_or_default(body, defaults)
    defaulted = frozenset(name for name, value in values.items()
                          if value is not None and getattr(body, name, None) is None)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if values["temperature"] is None else values["temperature"],
        top_p=1.0 if values["top_p"] is None else values["top_p"],
        top_k=values["top_k"] or 0,
        seed=seed,
        stop=tuple(stop),
        stop_token_ids=tuple(stop_token_ids),
        ignore_eos=body.ignore_eos,
        only_listed_stops=only_listed_stops,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        repetition_penalty=1.0 if values["repetition_penalty"] is None else values["repetition_penalty"],
        min_p=values["min_p"] or 0.0,
        logit_bias=bias,
        logprobs=logprobs.logprobs,
        prompt_logprobs=logprobs.prompt,
        defaulted=defaulted,
        constraint=constraint,
    )


def stop_token_ids(tokenizer: Any, stops: Sequence[str]) -> list[int]:
    """Stop strings that are single tokens of the target's vocabulary also stop generation by id."""
    ids = []
    unk = tokenizer.unk_token_id
    for stop in stops:
        token_id = tokenizer.convert_tokens_to_ids(stop)
        if isinstance(token_id, int) and token_id != unk:
            ids.append(token_id)
    return ids


def cleans_up(state: GatewayState) -> bool:
    """Whether answers get transformers' tokenization-space clean-up (``gateway.streaming``): ``--decode-clean-up
    tokenizer`` (default) follows the served tokenizer's ``clean_up_tokenization_spaces``. LLaMA-Factory's chat
    engine cleans its non-streamed answers always and its streamed ones per the tokenizer; ``always`` gives its
    non-streamed text, the default its streamed text — both for stream and non-stream here."""
    mode = state.settings.decode_clean_up
    if mode == "tokenizer":
        return bool(getattr(state.tokenizer, "clean_up_tokenization_spaces", False))
    return mode == "always"


def choice_streams(state: GatewayState, target: Target, prompt: PreparedPrompt, body: SamplingFields, n: int,
                   max_tokens: int, logprobs: LogprobRequest = LogprobRequest(),
                   constraint: OutputConstraint | None = None) -> list[AsyncIterator[TextPiece]]:
    """One text stream per choice; each runs as its own sequence in the backend (``constraint``: structured
    output, see ``gateway.structured``)."""
    if n > state.settings.max_queue:  # the choices could never all wait for a batch slot: a 429 would be forever
        raise InvalidRequest(f"n is {n}, more choices than this server can queue (--max-queue "
                             f"{state.settings.max_queue})", param="n")
    stops = tuple(s for s in prompt.stop if s not in prompt.end) if body.ignore_eos else prompt.stop
    tokenizer = state.tokenizer_for(target)
    ids = stop_token_ids(tokenizer, stops)
    defaults = state.policies.for_target(target).sampling.values
    observer = current_request()
    if observer is not None:
        observer.generation_started(prompt_tokens=len(prompt.token_ids), max_tokens=max_tokens, model=target.name,
                                    adapter=target.adapter)
    bias = logit_bias(tokenizer, body)
    streams = []
    for choice in range(n):
        request = GenerationRequest(
            request_id=new_id("gen"),
            prompt_token_ids=prompt.token_ids,
            prompt_text=prompt.text,
            adapter=target.adapter,
            sampling=sampling_params(body, max_tokens, stops, ids, choice, defaults, bias, logprobs, constraint,
                                     only_listed_stops=prompt.end_complete),
        )
        streams.append(stream_text(state.backend.generate(request), tokenizer, stops, observer,
                                   clean_up=cleans_up(state)))
    return streams


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several streams (the choices of a request, the models of a compare) as items arrive, tagged with
    the stream's index."""
    if len(streams) == 1:
        async for piece in streams[0]:
            yield 0, piece
        return
    queue: asyncio.Queue[tuple[int, T | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for piece in stream:
                await queue.put((index, piece))
            await queue.put((index, None))
        except BaseException as exc:  # re-raised in the consumer
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def prepend(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    """``first`` followed by the rest: for streams whose first item was awaited before the response started.

    Closing this stream closes ``rest`` at once (a client that hangs up frees its engine rows in the next step).
    """
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        aclose = getattr(rest, "aclose", None)
        if aclose is not None:
            await aclose()


async def start_stream(lease: Lease, stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """``stream`` with its first item already awaited, so that errors before the first token (queue full, upstream
    down) still get their HTTP status. The returned stream keeps ``lease`` (the adapter stays loaded) until it ends
    or is closed; if the first item fails, the lease stays with the caller's ``leased`` block."""
    first = await anext(stream)
    lease.keep()
    return _holding(lease, first, stream)


async def _holding(lease: Lease, first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        lease.release()
        aclose = getattr(rest, "aclose", None)
        if aclose is not None:
            await aclose()
