"""``POST /v1/chat/completions``: render with the target's training template, generate, parse, answer."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse

from gateway.generation import (
    PreparedPrompt,
    capped_headers,
    choice_streams,
    completion_budget,
    merge_streams,
    new_id,
    note_unknown_fields,
    prepend,
    start_stream,
)
from gateway.protocol.chat import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceDelta,
    ChunkChoice,
    FunctionCallBody,
    RenderedChat,
    ToolCallBody,
    ToolCallDelta,
)
from gateway.protocol.common import Usage
from gateway.registry import Target
from gateway.routes.deps import gateway_state, require_api_key
from gateway.sse import sse_response
from gateway.state import GatewayState
from gateway.streaming import TextPiece
from gateway.structured import output_constraint
from gateway.templates import OutputParser, ParsedDelta, encode_segments

router = APIRouter(dependencies=[Depends(require_api_key)])


def enable_thinking(body: ChatCompletionRequest) -> bool | None:
    value = (body.chat_template_kwargs or {}).get("enable_thinking")
    return None if value is None else bool(value)


def render_chat(state: GatewayState, target: Target, body: ChatCompletionRequest) -> PreparedPrompt:
    """The exact prompt ``target`` receives for this request."""
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    tokenizer = state.tokenizer
    rendering = target.template.render(
        messages,
        tools,
        enable_thinking=enable_thinking(body),
        bos_token=tokenizer.bos_token if tokenizer.bos_token_id is not None else None,
        eos_token=tokenizer.eos_token if tokenizer.eos_token_id is not None else None,
    )
    token_ids = tuple(encode_segments(tokenizer, rendering.segments))
    stops = tuple(dict.fromkeys([*rendering.stop, *body.stop_list()]))
    return PreparedPrompt(text=rendering.prompt, token_ids=token_ids, stop=stops)


def _parser(target: Target, body: ChatCompletionRequest) -> OutputParser:
    tools_enabled = bool(body.tools) and body.tool_choice != "none"
    return target.template.output_parser(tools_enabled=tools_enabled, enable_thinking=enable_thinking(body))


@router.post("/v1/chat/render")
async def render_chat_prompt(body: ChatCompletionRequest, state: GatewayState = Depends(gateway_state)) -> RenderedChat:
    """The exact prompt (text and token ids) ``body.model`` would receive, and why that template."""
    target = state.adapters.resolve(body.model)  # no need to load the adapter to render its prompt
    prompt = render_chat(state, target, body)
    return RenderedChat(model=target.name, template=target.template.name, template_source=target.template_source,
                        prompt=prompt.text, token_ids=list(prompt.token_ids), stop=list(prompt.stop))


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, response: Response, state: GatewayState = Depends(gateway_state)
) -> JSONResponse | Any:
    note_unknown_fields(state, body)
    async with state.adapters.leased(body.model) as lease:
        target = lease.target
        prompt = render_chat(state, target, body)
        parsers = [_parser(target, body) for _ in range(body.n)]
        constraint = output_constraint(target, body, prompt.text, parsers[0])
        max_tokens = completion_budget(state, len(prompt.token_ids), body.completion_budget())
        streams = choice_streams(state, target, prompt, body, body.n, max_tokens, constraint)
        completion_id = new_id("chatcmpl")
        headers = capped_headers(body.completion_budget(), max_tokens)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = _stream_chunks(completion_id, body.model, len(prompt.token_ids), streams, parsers, include_usage)
            stream = sse_response(await start_stream(lease, chunks))
            stream.headers.update(headers)
            return stream
        response.headers.update(headers)
        return await _complete(completion_id, body.model, len(prompt.token_ids), streams, parsers)


def _tool_calls(parsed: ParsedDelta) -> list[ToolCallBody] | None:
    if not parsed.tool_calls:
        return None
    return [
        ToolCallBody(id=c.id, function=FunctionCallBody(name=c.name, arguments=c.arguments)) for c in parsed.tool_calls
    ]


async def _complete(completion_id: str, model: str, prompt_tokens: int, streams: list[AsyncIterator[TextPiece]],
                    parsers: list[OutputParser]) -> ChatCompletion:
    content = [""] * len(streams)
    reasoning = [""] * len(streams)
    finish: list[Any] = [None] * len(streams)
    calls: list[list[ToolCallBody] | None] = [None] * len(streams)
    completion_tokens = 0
    async for index, piece in merge_streams(streams):
        parsed = parsers[index].feed(piece.text)
        content[index] += parsed.content
        reasoning[index] += parsed.reasoning_content
        if piece.finish_reason is not None:
            tail = parsers[index].finish()
            content[index] += tail.content
            reasoning[index] += tail.reasoning_content
            calls[index] = _tool_calls(tail)
            finish[index] = "tool_calls" if tail.tool_calls else piece.finish_reason
            completion_tokens += piece.completion_tokens or 0
    choices = [
        Choice(
            index=i,
            message=AssistantMessage(
                content=content[i] if content[i] or not calls[i] else None,
                reasoning_content=reasoning[i] or None,
                tool_calls=calls[i],
            ),
            finish_reason=finish[i],
        )
        for i in range(len(streams))
    ]
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                  total_tokens=prompt_tokens + completion_tokens)
    return ChatCompletion(id=completion_id, model=model, choices=choices, usage=usage)


def _delta_chunk(base: dict[str, Any], index: int, parsed: ParsedDelta, finish: Any = None) -> ChatCompletionChunk:
    tool_calls = None
    if parsed.tool_calls:
        tool_calls = [
            ToolCallDelta(
                index=i, id=c.id, type="function", function=FunctionCallBody(name=c.name, arguments=c.arguments)
            )
            for i, c in enumerate(parsed.tool_calls)
        ]
    delta = ChoiceDelta(content=parsed.content or None, reasoning_content=parsed.reasoning_content or None,
                        tool_calls=tool_calls)
    return ChatCompletionChunk(**base, choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish)])


async def _stream_chunks(completion_id: str, model: str, prompt_tokens: int, streams: list[AsyncIterator[TextPiece]],
                         parsers: list[OutputParser], include_usage: bool) -> AsyncIterator[ChatCompletionChunk]:
    base: dict[str, Any] = {"id": completion_id, "created": int(time.time()), "model": model}
    pieces = merge_streams(streams)
    first = await anext(pieces)  # the backend has accepted the request (or raised) before any byte is sent
    yield ChatCompletionChunk(
        **base,
        choices=[ChunkChoice(index=i, delta=ChoiceDelta(role="assistant", content="")) for i in range(len(streams))],
    )
    completion_tokens = 0
    async for index, piece in prepend(first, pieces):
        parsed = parsers[index].feed(piece.text)
        if parsed:
            yield _delta_chunk(base, index, parsed)
        if piece.finish_reason is not None:
            tail = parsers[index].finish()
            if tail:
                yield _delta_chunk(base, index, tail)
            completion_tokens += piece.completion_tokens or 0
            finish = "tool_calls" if tail.tool_calls else piece.finish_reason
            end = ChunkChoice(index=index, delta=ChoiceDelta(), finish_reason=finish)
            yield ChatCompletionChunk(**base, choices=[end])
    if include_usage:
        yield ChatCompletionChunk(**base, choices=[], usage=Usage(
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens))

