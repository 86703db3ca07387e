"""From a backend's deltas to text the client can show.

- Incremental detokenization: text is emitted only once it is whole — never half a UTF-8 character — and
  decoding in pieces gives exactly the text of decoding everything at once.
- Stop strings are found across token boundaries; text that could still be the start of a stop string is held back,
  and the stop string itself is never emitted.
- Special tokens are never shown (decoded with ``skip_special_tokens``).
- With ``clean_up``, tokenization spaces (``"ChatGPT ?"`` -> ``"ChatGPT?"``) are cleaned up with transformers' own
  ``clean_up_tokenization``, on the streamed text as a whole: the pieces join to the clean-up of one decode of all
  ids, so streamed and non-streamed answers are the same text. Whether to clean is ``--decode-clean-up``
  (``gateway.generation.cleans_up``): by default the served tokenizer's ``clean_up_tokenization_spaces``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from backends.base import Delta, TokenLogprob
from gateway.request_context import RequestContext

FinishReason = Literal["stop", "length"]


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...,
               clean_up_tokenization_spaces: bool | None = ...) -> str: ...

    def clean_up_tokenization(self, text: str) -> str: ...


CLEANUP_HOLD = 8  # characters at the end of cleaned text that later text may still change (patterns span <= 4)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces.

    It decodes a small window of recent tokens and emits only what the newest tokens added, holding back text that
    ends in an incomplete UTF-8 sequence (decoded as U+FFFD) until the next token completes it.
    """

    def __init__(self, tokenizer: Decoder) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens already turned into emitted text

    def _decode(self, ids: list[int]) -> str:
        # Windows are decoded raw: a clean-up inside a window would change text already emitted (SpaceCleaner).
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""
        new_text = full_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        return new_text

    def flush(self) -> str:
        """Whatever is left at the end, even if it is not valid UTF-8 (then it holds U+FFFD, as a full decode would)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :]


class SpaceCleaner:
    """``clean(text)`` of all text fed so far, emitted as it settles: the pieces join to ``clean`` of the whole."""

    def __init__(self, clean: Callable[[str], str]) -> None:
        self._clean = clean
        self._raw = ""
        self._sent = ""

    def feed(self, text: str) -> str:
        self._raw += text
        cleaned = self._clean(self._raw)
        settled = cleaned[: max(0, len(cleaned) - CLEANUP_HOLD)]
        if len(settled) <= len(self._sent) or not settled.startswith(self._sent):
            return ""
        out, self._sent = settled[len(self._sent) :], settled
        return out

    def flush(self) -> str:
        cleaned = self._clean(self._raw)
        out = cleaned[len(self._sent) :] if cleaned.startswith(self._sent) else ""
        self._sent = cleaned
        return out


class StopMatcher:
    """Finds the first stop string in streamed text; holds back what could still become one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._buffer = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self._buffer += text
        if not self._stops:
            out, self._buffer = self._buffer, ""
            return out
        hits = [i for i in (self._buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._buffer = self._buffer[: min(hits)], ""
            return out
        cut = max(0, len(self._buffer) - self._hold)
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out

    def flush(self) -> str:
        out, self._buffer = ("" if self.stopped else self._buffer), ""
        return out


@dataclass(frozen=True)
class PlacedLogprob:
    """A generated token's logprob and where its text starts in the choice's returned text."""

    entry: TokenLogprob
    offset: int


@dataclass(frozen=True)
class TextPiece:
    text: str
    finish_reason: FinishReason | None = None
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    logprobs: tuple[PlacedLogprob, ...] = ()  # the tokens whose text starts in this piece (when requested)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # on the first piece, when requested


class _LogprobPlacer:
    """Keeps logprob entries in step with the text actually returned.

    Each token is placed at the length the detokenized text had before it; it is released with the piece whose
    visible text reaches past that point. When a stop string cuts the text, tokens that start at or after the cut
    are dropped (a token straddling the cut is kept: it contributed text). A stop *token* that ended the row (an
    entry beyond the delta's ``token_ids``) is reported last, with no text, as vLLM does.
    """

    def __init__(self) -> None:
        self.produced = 0  # length of all detokenized text so far
        self.emitted = 0  # length of the text returned so far
        self._pending: list[PlacedLogprob] = []

    def add(self, delta: Delta, text: str) -> None:
        for entry in delta.logprobs:
            self._pending.append(PlacedLogprob(entry, self.produced))
        self.produced += len(text)

    def release(self, visible: str, *, final: bool = False, cut: bool = False) -> tuple[PlacedLogprob, ...]:
        self.emitted += len(visible)
        if final and not cut:
            out, self._pending = self._pending, []
            return tuple(out)
        out = [p for p in self._pending if p.offset < self.emitted]
        self._pending = [] if final else self._pending[len(out):]
        return tuple(out)


async def stream_text(
    deltas: AsyncIterator[Delta], tokenizer: Decoder, stops: Sequence[str], observer: RequestContext | None = None,
    *, clean_up: bool = False
) -> AsyncIterator[TextPiece]:
    """Text pieces for one completion; the last piece has ``finish_reason`` and the completion token count.

    Logprobs, when the backend sends them, travel on the piece whose text their token starts (``_LogprobPlacer``).
    Stopping on a stop string closes ``deltas``, which cancels the generation in the backend. ``observer`` (the
    request's context) hears of every output delta and of the finish, for metrics and the access log.
    """
    detokenizer = IncrementalDetokenizer(tokenizer)
    cleaner = SpaceCleaner(tokenizer.clean_up_tokenization) if clean_up else None
    matcher = StopMatcher(stops)
    placer = _LogprobPlacer()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    count = 0
    observed = 0  # tokens reported to the observer (a text-only delta counts as one)
    try:
        async for delta in deltas:
            count += len(delta.token_ids)
            if observer is not None and (delta.token_ids or delta.text):
                observer.output(len(delta.token_ids) or 1)
                observed += len(delta.token_ids) or 1
            text = delta.text if delta.text is not None else detokenizer.add(delta.token_ids)
            if delta.finish_reason is not None and delta.text is None:
                text += detokenizer.flush()
            if cleaner is not None and delta.text is None:  # an upstream's text is already decoded its way
                text = cleaner.feed(text) + (cleaner.flush() if delta.finish_reason is not None else "")
            placer.add(delta, text)
            if delta.prompt_logprobs is not None:
                prompt_logprobs = delta.prompt_logprobs
            visible = matcher.feed(text)
            if matcher.stopped:
                if observer is not None:
                    observer.finished("stop", observed, delta.completion_tokens or count or None)
                yield TextPiece(visible, "stop", delta.completion_tokens or count, delta.prompt_tokens,
                                placer.release(visible, final=True, cut=True), prompt_logprobs)
                return
            if delta.finish_reason is not None:
                visible += matcher.flush()
                if observer is not None:
                    observer.finished(delta.finish_reason, observed, delta.completion_tokens or count or None)
                yield TextPiece(visible, delta.finish_reason, delta.completion_tokens or count, delta.prompt_tokens,
                                placer.release(visible, final=True), prompt_logprobs)
                return
            placed = placer.release(visible)
            if visible or placed or prompt_logprobs is not None:
                yield TextPiece(visible, logprobs=placed, prompt_logprobs=prompt_logprobs)
                prompt_logprobs = None
    finally:
        close = getattr(deltas, "aclose", None)
        if close is not None:
            await close()
