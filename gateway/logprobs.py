"""Token logprobs in OpenAI's two shapes: chat's ``logprobs.content[]`` and the legacy completions lists.

Token strings are the tokenizer's decoding of the single token (special tokens spelled out), as vLLM reports them
(a token that is only part of a UTF-8 character decodes to U+FFFD). ``bytes`` are the token's real bytes where the
tokenizer is byte-level BPE (GPT-2/Qwen/Llama-3 style), so the bytes of consecutive tokens join to the text's UTF-8
even across a split character, as OpenAI intends; for other tokenizers, the token string's UTF-8.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from backends.base import TokenLogprob
from gateway.protocol.chat import ChatTokenLogprob, ChoiceLogprobs, TopLogprob
from gateway.protocol.completions import CompletionLogprobs
from gateway.streaming import PlacedLogprob


class TokenDecoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def _byte_level_table(tokenizer: Any) -> dict[str, int] | None:
    """Byte-level BPE's character -> byte table, when ``tokenizer`` decodes that way."""
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


class TokenNames:
    """Token id -> the string and bytes OpenAI shows for it, decoded once per id."""

    def __init__(self, tokenizer: TokenDecoder) -> None:
        self._tokenizer = tokenizer
        self._names: dict[int, str] = {}
        self._byte_table = _byte_level_table(tokenizer)

    def name(self, token_id: int) -> str:
        name = self._names.get(token_id)
        if name is None:
            name = self._names[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return name

    def bytes(self, token_id: int) -> list[int]:
        if self._byte_table is not None:
            piece = self._tokenizer.convert_ids_to_tokens(token_id)  # type: ignore[attr-defined]
            if isinstance(piece, str) and all(c in self._byte_table for c in piece):
                return [self._byte_table[c] for c in piece]
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
    """Keys are token strings; two tokens can read the same (halves of UTF-8 characters: U+FFFD), and then the
    more likely one's value stays, so the dict's best value is always the position's best logprob."""
    top: dict[str, float] = {}
    for token_id, value in entry.top:
        top.setdefault(names.name(token_id), value)
    return top


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
