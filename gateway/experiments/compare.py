"""One chat request fanned out to several models at once (``POST /v1/compare``).

Every model runs the request as the chat endpoint would (same rendering, sampling, parsers), concurrently: on the
native backend the generations are submitted together and decode in one batch. Names are checked before anything
runs (an unknown model is a 404 for the whole request); what fails while a model runs (a full queue, an upstream
error) becomes that model's ``error`` and the others still answer.

Blind mode (the arena) draws two contestants, labels them ``A`` and ``B`` and leaves out everything that would name
them: the model, the variant and the prompt (templates differ between models). The feedback answer reveals them.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Request

from gateway.errors import GatewayError, InvalidRequest
from gateway.experiments.hooks import observe, resolve_route
from gateway.experiments.recording import Observation
from gateway.experiments.routing import VARIANT_HEADER, Resolution
from gateway.generation import PreparedPrompt, choice_streams, completion_budget, merge_streams, new_id
from gateway.logprobs import TokenNames
from gateway.protocol.chat import ChatCompletionRequest
from gateway.protocol.experiments import CompareEvent, CompareMetrics, CompareRequest, CompareResponse, CompareResult
from gateway.routes.chat import complete, logprob_request, output_parser, prepare_chat, stream_chunks
from gateway.state import GatewayState
from gateway.streaming import TextPiece
from gateway.templates import OutputParser

SLOTS = ("A", "B")


@dataclass(frozen=True)
class Contestant:
    index: int
    label: str  # what the answer is called: the requested name, or the slot in blind mode
    resolution: Resolution
    blind: bool


def contestants(state: GatewayState, body: CompareRequest, request: Request | None) -> list[Contestant]:
    """Who answers: every listed model, or two drawn at random in blind mode. Unknown names raise 404."""
    names = body.models
    if body.blind:
        pool = names or [t.name for t in state.adapters.targets()]
        if len(pool) < 2:
            raise InvalidRequest("blind compare needs at least two models to draw from", param="models")
        names = secrets.SystemRandom().sample(pool, 2)
    chosen = []
    for index, name in enumerate(names):
        resolution = resolve_route(state, body.model_copy(update={"model": name}), request)
        state.adapters.resolve(resolution.model)  # raises ModelNotFound before anything runs
        label = SLOTS[index] if body.blind else name
        chosen.append(Contestant(index, label, resolution, body.blind))
    return chosen


@dataclass(frozen=True)
class Run:
    """One contestant's generation, started: its chat request, prompt, observation, streams and parser."""

    contestant: Contestant
    chat: ChatCompletionRequest
    prompt: PreparedPrompt
    observation: Observation
    streams: list[AsyncIterator[TextPiece]]
    parser: OutputParser
    names: TokenNames | None  # token names, when the request asked for logprobs

    @property
    def model(self) -> str:
        """The ``model`` of its completion: the slot in blind mode, else what the chat endpoint would say."""
        c = self.contestant
        return c.label if c.blind else c.resolution.public_model

    def result(self) -> CompareResult:
        """Its result without the completion (figures complete once the streams ended)."""
        blind, observation = self.contestant.blind, self.observation
        metrics = None
        if observation.latency_s is not None:
            metrics = CompareMetrics(ttft_s=observation.ttft_s, total_s=observation.latency_s,
                                     tokens_per_s=observation.tokens_per_s, prompt_tokens=observation.prompt_tokens,
                                     completion_tokens=observation.completion_tokens)
        return CompareResult(
            model=self.contestant.label,
            variant=None if blind else self.contestant.resolution.headers().get(VARIANT_HEADER),
            response_id=observation.response_id,
            prompt=None if blind else self.prompt.text,
            metrics=metrics,
        )


def _chat_body(body: CompareRequest, contestant: Contestant) -> ChatCompletionRequest:
    fields = body.model_dump(exclude={"models", "blind", "model", "model_messages"}, exclude_unset=True)
    own = (body.model_messages or {}).get(contestant.label)
    if own is not None:
        fields["messages"] = [m.model_dump(exclude_none=True) for m in own]
    return ChatCompletionRequest.model_validate({**fields, "model": contestant.resolution.model})


@asynccontextmanager
async def running(state: GatewayState, body: CompareRequest, contestant: Contestant) -> AsyncIterator[Run]:
    """The contestant's generation, started as the chat endpoint starts one, its adapter leased for the block."""
    chat = _chat_body(body, contestant)
    async with state.adapters.leased(contestant.resolution.model) as lease:
        prepared = prepare_chat(state, lease.target, chat)  # the model's tool policy and history policy, as in chat
        prompt = prepared.prompt
        max_tokens = completion_budget(state, len(prompt.token_ids), chat.completion_budget())
        observation = observe(state, new_id("chatcmpl"), "compare", contestant.resolution, chat, prompt)
        logprobs = logprob_request(chat)
        names = TokenNames(state.tokenizer_for(lease.target)) if logprobs.logprobs is not None else None
        streams = observation.watch(choice_streams(state, lease.target, prompt, chat, 1, max_tokens, logprobs))
        parser = output_parser(lease.target, chat, prepared.tools_offered)
        yield Run(contestant, chat, prompt, observation, streams, parser, names)


def _failed(contestant: Contestant, exc: GatewayError) -> CompareResult:
    return CompareResult(model=contestant.label, error=exc.body()["error"])


async def answer(state: GatewayState, body: CompareRequest, contestant: Contestant) -> CompareResult:
    """One model's full answer with its figures; a failure becomes the result's ``error``."""
    try:
        async with running(state, body, contestant) as run:
            completion = await complete(run.observation.response_id, run.model, len(run.prompt.token_ids),
                                        run.streams, [run.parser], run.names)
    except GatewayError as exc:
        return _failed(contestant, exc)
    result = run.result()
    result.completion = completion
    return result


async def compare(state: GatewayState, body: CompareRequest, chosen: list[Contestant]) -> CompareResponse:
    results = await asyncio.gather(*(answer(state, body, c) for c in chosen))
    return CompareResponse(blind=body.blind, results=list(results))


async def _events(state: GatewayState, body: CompareRequest, contestant: Contestant) -> AsyncIterator[CompareEvent]:
    label, index = contestant.label, contestant.index
    try:
        async with running(state, body, contestant) as run:
            include_usage = bool(run.chat.stream_options and run.chat.stream_options.include_usage)
            chunks = stream_chunks(run.observation.response_id, run.model, len(run.prompt.token_ids), run.streams,
                                   [run.parser], include_usage, run.names)
            async for chunk in chunks:
                yield CompareEvent(model=label, index=index, chunk=chunk)
    except GatewayError as exc:
        yield CompareEvent(model=label, index=index, result=_failed(contestant, exc))
        return
    yield CompareEvent(model=label, index=index, result=run.result())


async def compare_stream(state: GatewayState, body: CompareRequest, chosen: list[Contestant]
                         ) -> AsyncIterator[CompareEvent]:
    """Every model's events as they come, each tagged with its model; each model ends with its result event."""
    async for _, event in merge_streams([_events(state, body, c) for c in chosen]):
        yield event
