"""``POST /v1/completions``: a raw prompt, no template (the prompt is the user's), same sampling as chat."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request

from gateway.disconnects import while_connected
from gateway.errors import InvalidRequest
from gateway.generation import (
    PreparedPrompt,
    choice_streams,
    completion_budget,
    merge_streams,
    new_id,
    note_unknown_fields,
    start_stream,
)
from gateway.protocol.common import Usage
from gateway.protocol.completions import Completion, CompletionChoice, CompletionChunk, CompletionRequest
from gateway.routes.deps import gateway_state, require_api_key
from gateway.sse import sse_response
from gateway.state import GatewayState
from gateway.streaming import TextPiece
from gateway.tokenization import prepare_off_loop

router = APIRouter(dependencies=[Depends(require_api_key)])


def prepare_text(state: GatewayState, body: CompletionRequest) -> PreparedPrompt:
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise InvalidRequest("prompt: give one prompt string per request", param="prompt")
        prompt = body.prompt[0]
    else:
        prompt = body.prompt
    if body.suffix:
        raise InvalidRequest("suffix is not supported", param="suffix")
    token_ids = tuple(state.tokenizer.encode(prompt, add_special_tokens=True))
    if not token_ids:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    # A raw prompt has no template: the model's own eos ids end it (gateway.stop_tokens).
    stops = tuple(dict.fromkeys([*state.model_eos, *body.stop_list()]))
    return PreparedPrompt(text=prompt, token_ids=token_ids, stop=stops, end=state.model_eos)


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request,
                            state: GatewayState = Depends(gateway_state)) -> Any:
    note_unknown_fields(state, body)
    async with state.adapters.leased(body.model) as lease:
        prompt = await prepare_off_loop(request, prepare_text, state, body)
        max_tokens = completion_budget(state, len(prompt.token_ids), body.max_tokens)
        streams = choice_streams(state, lease.target, prompt, body, body.n, max_tokens)
        completion_id = new_id("cmpl")
        echo = prompt.text if body.echo else ""
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = _stream(completion_id, body.model, len(prompt.token_ids), streams, echo, include_usage)
            return sse_response(await start_stream(lease, chunks))
        return await while_connected(request, _complete(completion_id, body.model, len(prompt.token_ids), streams,
                                                        echo))


async def _complete(completion_id: str, model: str, n_prompt: int, streams: list[AsyncIterator[TextPiece]],
                    echo: str) -> Completion:
    texts = [echo] * len(streams)
    finish: list[Any] = [None] * len(streams)
    completion_tokens = 0
    async for index, piece in merge_streams(streams):
        texts[index] += piece.text
        if piece.finish_reason is not None:
            finish[index] = piece.finish_reason
            completion_tokens += piece.completion_tokens or 0
    return Completion(
        id=completion_id,
        model=model,
        choices=[CompletionChoice(index=i, text=texts[i], finish_reason=finish[i]) for i in range(len(streams))],
        usage=Usage(prompt_tokens=n_prompt, completion_tokens=completion_tokens,
                    total_tokens=n_prompt + completion_tokens),
    )


async def _stream(completion_id: str, model: str, prompt_tokens: int, streams: list[AsyncIterator[TextPiece]],
                  echo: str, include_usage: bool) -> AsyncIterator[CompletionChunk]:
    base: dict[str, Any] = {"id": completion_id, "created": int(time.time()), "model": model}
    echoed: set[int] = set()
    completion_tokens = 0
    async for index, piece in merge_streams(streams):
        text = piece.text
        if echo and index not in echoed:
            echoed.add(index)
            text = echo + text
        if piece.finish_reason is not None:
            completion_tokens += piece.completion_tokens or 0
        if text or piece.finish_reason is not None:
            choice = CompletionChoice(index=index, text=text, finish_reason=piece.finish_reason)
            yield CompletionChunk(**base, choices=[choice])
    if include_usage:
        yield CompletionChunk(**base, choices=[], usage=Usage(
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens))
