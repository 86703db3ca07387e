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
from dataclasses import dataclass

from fastapi import Request

from gateway.errors import GatewayError, InvalidRequest
from gateway.experiments.hooks import observe, resolve_route
from gateway.experiments.recording import Observation
from gateway.experiments.routing import Resolution
from gateway.generation import choice_streams, completion_budget, merge_streams, new_id
from gateway.protocol.chat import ChatCompletionRequest
from gateway.protocol.experiments import CompareEvent, CompareMetrics, CompareRequest, CompareResponse, CompareResult
from gateway.routes.chat import complete, output_parser, render_chat, stream_chunks
from gateway.state import GatewayState

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


def _result(contestant: Contestant, observation: Observation | None, prompt: str | None) -> CompareResult:
    blind = contestant.blind
    metrics = None
    if observation is not None and observation.latency_s is not None:
        metrics = CompareMetrics(ttft_s=observation.ttft_s, total_s=observation.latency_s,
                                 tokens_per_s=observation.tokens_per_s, prompt_tokens=observation.prompt_tokens,
                                 completion_tokens=observation.completion_tokens)
    return CompareResult(
        model=contestant.label,
        variant=None if blind else contestant.resolution.headers().get("x-gateway-variant"),
        response_id=observation.response_id if observation is not None else None,
        prompt=None if blind else prompt,
        metrics=metrics,
    )


def _chat_body(body: CompareRequest, contestant: Contestant) -> ChatCompletionRequest:
    fields = body.model_dump(exclude={"models", "blind", "model", "model_messages"}, exclude_unset=True)
    own = (body.model_messages or {}).get(contestant.label)
    if own is not None:
        fields["messages"] = [m.model_dump(exclude_none=True) for m in own]
    return ChatCompletionRequest.model_validate({**fields, "model": contestant.resolution.model})


def _public_model(contestant: Contestant) -> str:
    return contestant.label if contestant.blind else contestant.resolution.public_model


async def answer(state: GatewayState, body: CompareRequest, contestant: Contestant) -> CompareResult:
    """One model's full answer with its figures; a failure becomes the result's ``error``."""
    chat = _chat_body(body, contestant)
    observation: Observation | None = None
    prompt_text = None
    try:
        async with state.adapters.leased(contestant.resolution.model) as lease:
            prompt = render_chat(state, lease.target, chat)
            prompt_text = prompt.text
            max_tokens = completion_budget(state, len(prompt.token_ids), chat.completion_budget())
            observation = observe(state, new_id("chatcmpl"), "compare", contestant.resolution, chat, prompt)
            streams = observation.watch(choice_streams(state, lease.target, prompt, chat, 1, max_tokens))
            completion = await complete(observation.response_id, _public_model(contestant), len(prompt.token_ids),
                                        streams, [output_parser(lease.target, chat)])
    except GatewayError as exc:
        failed = _result(contestant, observation, prompt_text)
        failed.error = exc.body()["error"]
        return failed
    result = _result(contestant, observation, prompt_text)
    result.completion = completion
    return result


async def compare(state: GatewayState, body: CompareRequest, chosen: list[Contestant]) -> CompareResponse:
    results = await asyncio.gather(*(answer(state, body, c) for c in chosen))
    return CompareResponse(blind=body.blind, results=list(results))


async def _events(state: GatewayState, body: CompareRequest, contestant: Contestant) -> AsyncIterator[CompareEvent]:
    chat = _chat_body(body, contestant)
    label, index = contestant.label, contestant.index
    observation: Observation | None = None
    prompt_text = None
    try:
        async with state.adapters.leased(contestant.resolution.model) as lease:
            prompt = render_chat(state, lease.target, chat)
            prompt_text = prompt.text
            max_tokens = completion_budget(state, len(prompt.token_ids), chat.completion_budget())
            observation = observe(state, new_id("chatcmpl"), "compare", contestant.resolution, chat, prompt)
            streams = observation.watch(choice_streams(state, lease.target, prompt, chat, 1, max_tokens))
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            chunks = stream_chunks(observation.response_id, _public_model(contestant), len(prompt.token_ids),
                                   streams, [output_parser(lease.target, chat)], include_usage)
            async for chunk in chunks:
                yield CompareEvent(model=label, index=index, chunk=chunk)
    except GatewayError as exc:
        failed = _result(contestant, observation, prompt_text)
        failed.error = exc.body()["error"]
        yield CompareEvent(model=label, index=index, result=failed)
        return
    yield CompareEvent(model=label, index=index, result=_result(contestant, observation, prompt_text))


async def compare_stream(state: GatewayState, body: CompareRequest, chosen: list[Contestant]
                         ) -> AsyncIterator[CompareEvent]:
    """Every model's events as they come, each tagged with its model; each model ends with its result event."""
    async for _, event in merge_streams([_events(state, body, c) for c in chosen]):
        yield event
