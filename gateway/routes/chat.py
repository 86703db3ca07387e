"""``POST /v1/chat/completions``: render with the target's training template, generate, parse, answer."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from gateway.admission import check_sizes
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
    prepend,
    start_stream,
)
from gateway.history import MESSAGES_DROPPED_HEADER, fit_history
from gateway.logprobs import TokenNames, chat_logprobs
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
from gateway.routes.deps import admit_generation, gateway_state, require_api_key
from gateway.sse import sse_response
from gateway.state import GatewayState
from gateway.streaming import PlacedLogprob, TextPiece
from gateway.structured import output_constraint
from gateway.templates import JinjaTemplate, OutputParser, ParsedDelta, encode_segments
from gateway.tokenization import prepare_off_loop
from gateway.tool_policy import TOOLS_IGNORED_HEADER

log = logging.getLogger(__name__)

router = APIRouter(dependencies=[Depends(require_api_key)])


def enable_thinking(body: ChatCompletionRequest) -> bool | None:
    value = (body.chat_template_kwargs or {}).get("enable_thinking")
    return None if value is None else bool(value)


def offers_tools(state: GatewayState, target: Target, body: ChatCompletionRequest) -> bool:
    """Whether ``target``'s prompt shows the request's tools (its tool policy, and ``tool_choice: "none"``)."""
    return state.policies.for_target(target).tools.offers_tools(body.tools, body.tool_choice)


def ignored_tools(state: GatewayState, target: Target, body: ChatCompletionRequest) -> int:
    """How many of the request's tools ``target``'s tool policy leaves out of the prompt (not counting
    ``tool_choice: "none"``, which is the client's own choice)."""
    if not body.tools or body.tool_choice == "none" or offers_tools(state, target, body):
        return 0
    return len(body.tools)


def end_tokens(state: GatewayState, target: Target, template_stop: Sequence[str]) -> tuple[str, ...]:
    """What ends ``target``'s chats unasked. A LLaMA-Factory template stops where LLaMA-Factory does: its eos and
    stop words (``template_stop``; gateway.stop_tokens), the model's eos ids only with --stop-on-model-eos. A Jinja
    template has no such rule: it stops on its folder's eos too (a LLaMA-Factory run saves its fixed tokenizer:
    for qwen, <|im_end|>) and on the model's eos ids, as transformers and vLLM do."""
    template = target.template
    own = (template.eos_token,) if isinstance(template, JinjaTemplate) and template.eos_token else ()
    model_eos = state.model_eos if model_eos_wanted(state, target) else ()
    return tuple(dict.fromkeys([*template_stop, *own, *model_eos]))


def model_eos_wanted(state: GatewayState, target: Target) -> bool:
    """Whether the model's config eos ids end ``target``'s chats: with --stop-on-model-eos, or for a Jinja template."""
    return state.settings.stop_on_model_eos or isinstance(target.template, JinjaTemplate)


def render_chat(state: GatewayState, target: Target, body: ChatCompletionRequest, *,
                with_tools: bool | None = None) -> PreparedPrompt:
    """The exact prompt ``target`` receives for this request (``with_tools=False``: as if it had no tools)."""
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    if with_tools is None:
        with_tools = offers_tools(state, target, body)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools and with_tools else None
    tokenizer = state.tokenizer_for(target)
    rendering = target.template.render(
        messages,
        tools,
        enable_thinking=enable_thinking(body),
        bos_token=tokenizer.bos_token if tokenizer.bos_token_id is not None else None,
        eos_token=tokenizer.eos_token if tokenizer.eos_token_id is not None else None,
    )
    token_ids = tuple(encode_segments(tokenizer, rendering.segments))
    end = end_tokens(state, target, rendering.stop)
    stops = tuple(dict.fromkeys([*end, *body.stop_list()]))
    # Complete unless the model's eos ids belong to the rule and the gateway does not know them (an upstream-only
    # base without --tokenizer folder): then the upstream's own eos has to keep ending answers.
    complete = bool(end) and (bool(state.model_eos) or not model_eos_wanted(state, target))
    return PreparedPrompt(text=rendering.prompt, token_ids=token_ids, stop=stops, end=end, end_complete=complete)


def output_parser(target: Target, body: ChatCompletionRequest, tools_offered: bool) -> OutputParser:
    return target.template.output_parser(tools_enabled=tools_offered, enable_thinking=enable_thinking(body))


def _check_tools_fit(state: GatewayState, target: Target, body: ChatCompletionRequest, prompt_tokens: int) -> None:
    """When the rendered tools are what leaves no room for an answer, a 400 that says so and names the setting."""
    if prompt_tokens < state.max_model_len:
        return
    without = len(render_chat(state, target, body, with_tools=False).token_ids)
    if without >= state.max_model_len:
        return  # too long even without the tools: the ordinary context error
    assert body.tools is not None
    raise InvalidRequest(
        f"This model's maximum context length is {state.max_model_len} tokens, and the request's "
        f"{len(body.tools)} tools take {prompt_tokens - without} of the prompt's {prompt_tokens} tokens. "
        f"Send fewer tools, or have `{target.name}` ignore them: tool_policy ignore (--tool-policy ignore for the "
        f"base, --adapter-tool-policy {target.name}=ignore for an adapter, or tool_policy: in the config file).",
        param="tools",
        code="context_length_exceeded",
    )


@dataclass(frozen=True)
class ChatPrompt:
    """A request's prompt for one model, and what its policies left out of it."""

    prompt: PreparedPrompt
    tools_offered: bool
    tools_ignored: int  # tools the model's tool policy left out
    messages_dropped: int  # oldest messages dropped to fit the context (gateway.history)

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.tools_ignored:
            headers[TOOLS_IGNORED_HEADER] = str(self.tools_ignored)
        if self.messages_dropped:
            headers[MESSAGES_DROPPED_HEADER] = str(self.messages_dropped)
        return headers


def prepare_chat(state: GatewayState, target: Target, body: ChatCompletionRequest) -> ChatPrompt:
    """The prompt after the model's tool policy and, for a chat too long for the context, the history policy."""
    tools_offered = offers_tools(state, target, body)
    prompt = render_chat(state, target, body, with_tools=tools_offered)
    dropped = 0
    if len(prompt.token_ids) >= state.max_model_len:
        if tools_offered:
            _check_tools_fit(state, target, body, len(prompt.token_ids))
        if state.settings.history_overflow == "drop_oldest":
            fitted = fit_history(
                body.messages,
                lambda kept: render_chat(state, target, body.model_copy(update={"messages": kept}),
                                         with_tools=tools_offered),
                lambda candidate: len(candidate.token_ids),
                max_len=state.max_model_len, wanted_room=body.completion_budget(), role=lambda m: m.role,
            )
            if fitted is not None:
                prompt, dropped = fitted
    return ChatPrompt(prompt, tools_offered, ignored_tools(state, target, body), dropped)


def _log_policies(target: Target, chat: ChatPrompt) -> None:
    if chat.tools_ignored:
        log.info("%s: ignoring the request's %d tools (the model's tool policy)", target.name, chat.tools_ignored)
    if chat.messages_dropped:
        log.info("%s: dropped the %d oldest messages to fit the context (--history-overflow drop_oldest)",
                 target.name, chat.messages_dropped)


def logprob_request(body: ChatCompletionRequest) -> LogprobRequest:
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    return LogprobRequest(logprobs=(body.top_logprobs or 0) if body.logprobs else None)


@router.post("/v1/chat/render")
async def render_chat_prompt(body: ChatCompletionRequest, request: Request,
                             state: GatewayState = Depends(gateway_state)) -> RenderedChat:
    """The exact prompt (text and token ids) ``body.model`` would receive, and why that template."""
    target = state.adapters.resolve(body.model)  # no need to load the adapter to render its prompt
    chat = await prepare_off_loop(request, prepare_chat, state, target, body)
    prompt = chat.prompt
    return RenderedChat(model=target.name, template=target.template.name, template_source=target.template_source,
                        prompt=prompt.text, token_ids=list(prompt.token_ids), stop=list(prompt.stop),
                        tools_ignored=chat.tools_ignored, messages_dropped=chat.messages_dropped)


@router.post("/v1/chat/completions", response_model=None, dependencies=[Depends(admit_generation)])
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, response: Response, state: GatewayState = Depends(gateway_state)
) -> JSONResponse | Any:
    note_unknown_fields(state, body)
    check_sizes(state.settings, body.messages, body.tools)
    logprobs = logprob_request(body)
    resolution = resolve_route(state, body, request)  # a route becomes one of its variants before the lease
    async with state.adapters.leased(resolution.model) as lease:
        target = lease.target
        names = TokenNames(state.tokenizer_for(target)) if logprobs.logprobs is not None else None
        chat = await prepare_off_loop(request, prepare_chat, state, target, body)
        prompt = chat.prompt
        parsers = [output_parser(target, body, chat.tools_offered) for _ in range(body.n)]
        constraint = output_constraint(target, body, prompt.text, parsers[0])
        max_tokens = completion_budget(state, len(prompt.token_ids), body.completion_budget())
        completion_id = new_id("chatcmpl")
        observation = observe(state, completion_id, "chat", resolution, body, prompt)
        streams = observation.watch(choice_streams(state, target, prompt, body, body.n, max_tokens, logprobs,
                                                   constraint))
        model = resolution.public_model
        _log_policies(target, chat)
        headers = {**chat.headers(), **resolution.headers(), **capped_headers(body.completion_budget(), max_tokens)}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = stream_chunks(completion_id, model, len(prompt.token_ids), streams, parsers, include_usage,
                                   names)
            streaming = sse_response(await start_stream(lease, chunks))
            streaming.headers.update(headers)  # FastAPI applies `response`'s headers to returned models only
            return streaming
        response.headers.update(headers)
        return await while_connected(request, complete(completion_id, model, len(prompt.token_ids), streams, parsers,
                                                       names))


def _tool_calls(parsed: ParsedDelta) -> list[ToolCallBody] | None:
    if not parsed.tool_calls:
        return None
    return [
        ToolCallBody(id=c.id, function=FunctionCallBody(name=c.name, arguments=c.arguments)) for c in parsed.tool_calls
    ]


async def complete(completion_id: str, model: str, prompt_tokens: int, streams: list[AsyncIterator[TextPiece]],
                   parsers: list[OutputParser], names: TokenNames | None = None) -> ChatCompletion:
    placed: list[list[PlacedLogprob]] = [[] for _ in streams]
    content = [""] * len(streams)
    reasoning = [""] * len(streams)
    finish: list[Any] = [None] * len(streams)
    calls: list[list[ToolCallBody] | None] = [None] * len(streams)
    completion_tokens = 0
    async for index, piece in merge_streams(streams):
        placed[index].extend(piece.logprobs)
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
            logprobs=None if names is None else chat_logprobs(placed[i], names),
        )
        for i in range(len(streams))
    ]
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                  total_tokens=prompt_tokens + completion_tokens)
    return ChatCompletion(id=completion_id, model=model, choices=choices, usage=usage)


def _delta_chunk(base: dict[str, Any], index: int, parsed: ParsedDelta, logprobs: Any = None) -> ChatCompletionChunk:
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
    return ChatCompletionChunk(**base, choices=[ChunkChoice(index=index, delta=delta, logprobs=logprobs)])


async def stream_chunks(completion_id: str, model: str, prompt_tokens: int, streams: list[AsyncIterator[TextPiece]],
                        parsers: list[OutputParser], include_usage: bool,
                        names: TokenNames | None = None) -> AsyncIterator[ChatCompletionChunk]:
    base: dict[str, Any] = {"id": completion_id, "created": int(time.time()), "model": model}
    pieces = merge_streams(streams)
    first = await anext(pieces)  # the backend has accepted the request (or raised) before any byte is sent
    yield ChatCompletionChunk(
        **base,
        choices=[ChunkChoice(index=i, delta=ChoiceDelta(role="assistant", content="")) for i in range(len(streams))],
    )
    completion_tokens = 0
    async for index, piece in prepend(first, pieces):
        # A chunk's logprobs are those of the tokens whose text it starts; they ride on its first delta chunk.
        logprobs = None if names is None or not piece.logprobs else chat_logprobs(piece.logprobs, names)
        parsed = parsers[index].feed(piece.text)
        if parsed or logprobs is not None:
            yield _delta_chunk(base, index, parsed, logprobs)
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

