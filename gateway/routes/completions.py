"""``POST /v1/completions``: a raw prompt, no template (the prompt is the user's), same sampling as chat.

A prompt is text or token ids; a list of prompts is answered as ``n`` choices per prompt, indexed prompt by prompt
(as OpenAI does). With ``logprobs`` every choice carries OpenAI's legacy logprob lists; with ``echo`` as well, they
start with the prompt's tokens (the first has no logprob), computed from one full-prompt forward pass.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from gateway.disconnects import while_connected
from gateway.errors import InvalidRequest
from gateway.experiments.hooks import observe, resolve_route
from gateway.generation import (
    LogprobRequest,
    PreparedPrompt,
    capped_headers,
    choice_streams,
    completion_budget,
    merge_streams,
    new_id,
    note_unknown_fields,
    start_stream,
)
from gateway.logprobs import TokenNames, completion_logprobs, echo_prompt, joined
from gateway.protocol.common import Usage
from gateway.protocol.completions import (
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
)
from gateway.registry import Target
from gateway.routes.deps import admit_generation, gateway_state, require_api_key
from gateway.sse import sse_response
from gateway.state import GatewayState
from gateway.streaming import TextPiece
from gateway.tokenization import prepare_off_loop

router = APIRouter(dependencies=[Depends(require_api_key)])


def _prompt_list(body: CompletionRequest) -> list[str | list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]  # one prompt of token ids
    return list(prompt)  # type: ignore[arg-type]  # several prompts, each text or token ids


def prepare_prompts(state: GatewayState, target: Target, body: CompletionRequest) -> list[PreparedPrompt]:
    if body.suffix:
        raise InvalidRequest("suffix is not supported", param="suffix")
    tokenizer = state.tokenizer_for(target)  # a template's added tokens are part of its model's vocabulary
    vocab = len(tokenizer)
    # A raw prompt has no template: the model's own eos ids end it (gateway.stop_tokens).
    stops = tuple(dict.fromkeys([*state.model_eos, *body.stop_list()]))
    prepared = []
    for prompt in _prompt_list(body):
        if isinstance(prompt, str):
            token_ids = tuple(tokenizer.encode(prompt, add_special_tokens=True))
            text = prompt
        else:
            if any(not 0 <= t < vocab for t in prompt):
                raise InvalidRequest(f"prompt: token ids must lie in 0..{vocab - 1}", param="prompt")
            token_ids = tuple(prompt)
            text = tokenizer.decode(list(prompt), skip_special_tokens=False)
        if not token_ids:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        prepared.append(PreparedPrompt(text=text, token_ids=token_ids, stop=stops, end=state.model_eos,
                                       end_complete=bool(state.model_eos)))
    return prepared


@router.post("/v1/completions", response_model=None, dependencies=[Depends(admit_generation)])
async def create_completion(body: CompletionRequest, request: Request, response: Response,
                            state: GatewayState = Depends(gateway_state)) -> Any:
    note_unknown_fields(state, body)
    want = LogprobRequest(logprobs=body.logprobs,
                          prompt=body.logprobs if body.echo and body.logprobs is not None else None)
    resolution = resolve_route(state, body, request)  # a route becomes one of its variants before the lease
    async with state.adapters.leased(resolution.model) as lease:
        names = TokenNames(state.tokenizer_for(lease.target)) if body.logprobs is not None else None
        prompts = await prepare_off_loop(request, prepare_prompts, state, lease.target, body)
        streams: list[AsyncIterator[TextPiece]] = []
        capped: dict[str, str] = {}
        for prompt in prompts:
            max_tokens = completion_budget(state, len(prompt.token_ids), body.max_tokens)
            capped = capped_headers(body.max_tokens, max_tokens) or capped
            streams += choice_streams(state, lease.target, prompt, body, body.n, max_tokens, want)
        completion_id = new_id("cmpl")
        whole = prompts[0] if len(prompts) == 1 else PreparedPrompt(  # what the feedback store records
            text="".join(p.text for p in prompts), token_ids=tuple(t for p in prompts for t in p.token_ids), stop=())
        streams = observe(state, completion_id, "completion", resolution, body, whole).watch(streams)
        headers = {**resolution.headers(), **capped}
        echoes = [p for p in prompts for _ in range(body.n)] if body.echo else None
        answer = _Answer(completion_id, resolution.public_model, sum(len(p.token_ids) for p in prompts), echoes,
                         names)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            streaming = sse_response(await start_stream(lease, answer.stream(streams, include_usage)))
            streaming.headers.update(headers)
            return streaming
        response.headers.update(headers)
        return await while_connected(request, answer.complete(streams))


class _Answer:
    """Builds the response (or its chunks) of one request from its choice streams."""

    def __init__(self, completion_id: str, model: str, prompt_tokens: int, echoes: list[PreparedPrompt] | None,
                 names: TokenNames | None) -> None:
        self.id, self.model, self.prompt_tokens = completion_id, model, prompt_tokens
        self.echoes, self.names = echoes, names

    def _echo_text(self, index: int) -> str:
        return self.echoes[index].text if self.echoes else ""

    def _logprobs(self, index: int, piece: TextPiece, first: bool) -> CompletionLogprobs | None:
        """This piece's logprob lists; the choice's first piece also has the echoed prompt's."""
        if self.names is None:
            return None
        generated = completion_logprobs(piece.logprobs, self.names, offset=len(self._echo_text(index)))
        if not (first and self.echoes):
            return generated
        prompt = self.echoes[index]
        if piece.prompt_logprobs is None:
            raise InvalidRequest("this backend returned no prompt logprobs for echo", param="echo")
        return joined(echo_prompt(prompt.token_ids, piece.prompt_logprobs, self.names), generated)

    async def complete(self, streams: list[AsyncIterator[TextPiece]]) -> Completion:
        texts = [self._echo_text(i) for i in range(len(streams))]
        logprobs: list[CompletionLogprobs | None] = [None] * len(streams)
        finish: list[Any] = [None] * len(streams)
        completion_tokens = 0
        async for index, piece in merge_streams(streams):
            texts[index] += piece.text
            more = self._logprobs(index, piece, logprobs[index] is None)
            if more is not None:
                logprobs[index] = more if logprobs[index] is None else joined(logprobs[index], more)  # type: ignore[arg-type]
            if piece.finish_reason is not None:
                finish[index] = piece.finish_reason
                completion_tokens += piece.completion_tokens or 0
        choices = [CompletionChoice(index=i, text=texts[i], finish_reason=finish[i], logprobs=logprobs[i])
                   for i in range(len(streams))]
        return Completion(id=self.id, model=self.model, choices=choices, usage=self._usage(completion_tokens))

    async def stream(self, streams: list[AsyncIterator[TextPiece]], include_usage: bool,
                     ) -> AsyncIterator[CompletionChunk]:
        base: dict[str, Any] = {"id": self.id, "created": int(time.time()), "model": self.model}
        started: set[int] = set()
        completion_tokens = 0
        async for index, piece in merge_streams(streams):
            first = index not in started
            started.add(index)
            text = self._echo_text(index) + piece.text if first else piece.text
            logprobs = self._logprobs(index, piece, first)
            if piece.finish_reason is not None:
                completion_tokens += piece.completion_tokens or 0
            if text or piece.finish_reason is not None or (logprobs is not None and logprobs.tokens):
                choice = CompletionChoice(index=index, text=text, finish_reason=piece.finish_reason, logprobs=logprobs)
                yield CompletionChunk(**base, choices=[choice])
        if include_usage:
            yield CompletionChunk(**base, choices=[], usage=self._usage(completion_tokens))

    def _usage(self, completion_tokens: int) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=self.prompt_tokens + completion_tokens)
