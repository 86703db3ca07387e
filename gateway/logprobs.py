"""Token logprobs in OpenAI's two shapes: chat's ``logprobs.content[]`` and the legacy completions lists.

Token strings are the tokenizer's decoding of the single token (special tokens spelled out), as vLLM reports them;
``bytes`` are that string's UTF-8 bytes (a token that is only part of a UTF-8 character decodes to U+FFFD, as in
vLLM). A token id the upstream reports as ``token_id:N`` is the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from backends.base import TokenLogprob
from gateway.protocol.chat import ChatTokenLogprob, ChoiceLogprobs, TopLogprob
from gateway.protocol.completions import CompletionLogprobs
from gateway.streaming import PlacedLogprob


class TokenDecoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class TokenNames:
    """Token id -> the string and bytes OpenAI shows for it, decoded once per id."""

    def __init__(self, tokenizer: TokenDecoder) -> None:
        self._tokenizer = tokenizer
        self._names: dict[int, str] = {}

    def name(self, token_id: int) -> str:
        name = self._names.get(token_id)
        if name is None:
            name = self._names[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return name

    def bytes(self, token_id: int) -> list[int]:
        return list(self.name(token_id).encode("utf-8"))


def chat_logprobs(placed: Sequence[PlacedLogprob], names: TokenNames) -> ChoiceLogprobs:
    content = []
    for item in placed:
        entry = item.entry
        content.append(ChatTokenLogprob(
            token=names.name(entry.token_id), logprob=entry.logprob, bytes=names.bytes(entry.token_id),
            top_logprobs=[TopLogprob(token=names.name(i), logprob=v, bytes=names.bytes(i)) for i, v in entry.top],
        ))
    return ChoiceLogprobs(content=content)


def _top_dict(entry: TokenLogprob, names: TokenNames) -> dict[str, float]:
    return {names.name(i): v for i, v in entry.top}


def completion_logprobs(placed: Sequence[PlacedLogprob], names: TokenNames, offset: int = 0) -> CompletionLogprobs:
    """The legacy shape for generated tokens; text offsets shifted by ``offset`` (the echoed prompt's length)."""
    out = CompletionLogprobs()
    for item in placed:
        out.tokens.append(names.name(item.entry.token_id))
        out.token_logprobs.append(item.entry.logprob)
        out.top_logprobs.append(_top_dict(item.entry, names))
        out.text_offset.append(offset + item.offset)
    return out


def echo_prompt(prompt_ids: Sequence[int], prompt: Sequence[TokenLogprob | None], names: TokenNames,
                ) -> CompletionLogprobs:
    """The echoed prompt's entries: every token, ``None`` logprob and top for the first; offsets by token names."""
    out = CompletionLogprobs()
    offset = 0
    for token_id, entry in zip(prompt_ids, prompt, strict=True):
        name = names.name(token_id)
        out.tokens.append(name)
        out.token_logprobs.append(None if entry is None else entry.logprob)
        out.top_logprobs.append(None if entry is None else _top_dict(entry, names))
        out.text_offset.append(offset)
        offset += len(name)
    return out


def joined(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=first.tokens + second.tokens,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        top_logprobs=first.top_logprobs + second.top_logprobs,
        text_offset=first.text_offset + second.text_offset,
    )
