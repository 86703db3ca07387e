"""Continuous batching on one engine thread.

Every decode step runs all active sequences in one forward pass; each row carries its own LoRA adapter (a slot of
``backends.lora.LoraBank``), its own sampling parameters and its own stop conditions. A new sequence is prefilled
between two steps and joins the batch at the next one; a finished or cancelled sequence leaves it at once.

The batch's KV cache is left-padded: rows of different lengths share one ``[batch, heads, length, dim]`` tensor per
layer, with an attention mask of zeros over the padding. Padding never changes a row's numbers (masked positions get
zero attention weight), so in float32 a sequence's greedy output is the same alone or in any batch. Sliding-window
and chunked layers are cached whole too (the model's mask applies the window); models whose cache holds anything
but per-token keys and values are refused at load (``backends.kv_cache``).

Model mutations (loading or deleting an adapter) are *commands* run on the engine thread between steps, so a forward
pass never sees a half-loaded adapter.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from backends.base import Delta, GenerationRequest, TokenLogprob
from backends.kv_cache import kv_cache
from backends.lora import LoraBank
from backends.sampling import Choice, SamplingBatch, prompt_logprobs
from backends.structured import RowGrammar, mask_logits
from gateway.errors import BackendUnavailable, GatewayError, Overloaded

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # how ``adapters_in_use`` counts rows on the base


@dataclass(eq=False)
class Sequence:
    """One request's state inside the engine. ``cancelled`` may be set from any thread.

    The engine puts the sequence's output on ``queue`` through ``loop`` (the event loop that awaits it): every
    ``Delta`` of one step for every row of one loop is handed over with a single ``call_soon_threadsafe``.
    """

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Delta | GatewayError]
    stop_token_ids: frozenset[int]
    max_total_len: int
    grammar: RowGrammar | None = None  # structured output: the tokens this row may choose (backends.structured)
    generated: int = 0
    next_token: int = -1
    cancelled: bool = False
    submitted_at: float = 0.0  # perf_counter() when submitted and when it joined the batch (its queue time)
    joined_at: float | None = None
    position: int = field(init=False)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # sent with the first token, then dropped

    def __post_init__(self) -> None:
        # Position id of ``next_token``: the last prompt token's until the first token is chosen.
        self.position = len(self.request.prompt_token_ids) - 1

    @property
    def adapter_name(self) -> str:
        return self.request.adapter or BASE_ADAPTER

    @property
    def adapter(self) -> str | None:
        return self.request.adapter


@dataclass
class _Command:
    run: Callable[[], Any]
    future: concurrent.futures.Future[Any]


class Engine:
    """Owns the model on its thread. ``submit`` and ``run_command`` are safe to call from any thread."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: torch.device,
        pad_token_id: int,
        max_batch_size: int,
        max_queue: int,
    ) -> None:
        self.model = model
        self.device = device
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.lora = LoraBank(model)  # touched only on the engine thread (commands, steps)
        self._waiting: deque[Sequence] = deque()
        self._commands: deque[_Command] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._rows: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._sampling: SamplingBatch | None = None  # the rows' sampling state, in ``_rows`` order
        self._outbox: list[tuple[Sequence, Delta | GatewayError]] = []  # this step's output, handed over at its end
        self._thread = threading.Thread(target=self._loop, name="lora-gateway-engine", daemon=True)
        self._thread.start()

    # --- called from other threads ----------------------------------------------------------------------------

    def submit(self, sequence: Sequence) -> None:
        with self._cond:
            if self._stopping:
                raise BackendUnavailable("the engine is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"the server has {len(self._waiting)} requests waiting; try again shortly")
            sequence.submitted_at = time.perf_counter()
            self._waiting.append(sequence)
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    async def run_command(self, run: Callable[[], Any]) -> Any:
        """Run ``run()`` on the engine thread between two steps and return its result."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise BackendUnavailable("the engine is shutting down")
            self._commands.append(_Command(run, future))
            self._cond.notify()
        return await asyncio.wrap_future(future)

    def adapters_in_use(self) -> dict[str, int]:
        """Sequences waiting or running per adapter name (a snapshot)."""
        with self._cond:
            counts: dict[str, int] = {}
            for seq in [*self._waiting, *self._rows]:
                if not seq.cancelled:
                    counts[seq.adapter_name] = counts.get(seq.adapter_name, 0) + 1
            return counts

    def adapter_rows(self) -> tuple[dict[str, int], dict[str, int]]:
        """(running, waiting) sequences per adapter name, base rows under ``BASE_ADAPTER`` (a snapshot)."""
        with self._cond:
            running: dict[str, int] = {}
            waiting: dict[str, int] = {}
            for rows, counts in ((self._rows, running), (self._waiting, waiting)):
                for seq in list(rows):
                    if not seq.cancelled:
                        counts[seq.adapter_name] = counts.get(seq.adapter_name, 0) + 1
            return running, waiting

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        return len(self._rows)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # --- the engine thread ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._commands or self._rows):
                    self._cond.wait()
                if self._stopping:
                    break
                commands = list(self._commands)
                self._commands.clear()
            for command in commands:  # before taking joiners: a command sees every request not yet running
                self._run_command(command)
            with self._cond:
                room = self.max_batch_size - len(self._rows)
                joining = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            try:
                with torch.inference_mode():
                    self._drop_rows([s for s in self._rows if s.cancelled])
                    joining = [s for s in joining if not s.cancelled]
                    if joining:
                        self._prefill(joining)
                        self._flush()  # first tokens go out now, not after the next decode step (TTFT)
                    if self._rows:
                        self._decode()
            except Exception as exc:  # a failed forward must not kill the engine: fail the batch, keep serving
                log.exception("engine step failed")
                error = BackendUnavailable(f"the inference engine failed: {type(exc).__name__}")
                for seq in [*self._rows, *joining]:
                    self._post(seq, error)
                self._rows, self._cache, self._mask, self._sampling = [], None, None, None
            self._flush()
        self._fail_all(BackendUnavailable("the engine stopped"))

    def _post(self, seq: Sequence, item: Delta | GatewayError) -> None:
        self._outbox.append((seq, item))

    def _flush(self) -> None:
        """Hand this step's output to the event loops: one ``call_soon_threadsafe`` per loop, not per row."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Delta | GatewayError], Any]]] = {}
        for seq, item in self._outbox:
            by_loop.setdefault(seq.loop, []).append((seq.queue, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass

    def _run_command(self, command: _Command) -> None:
        if not command.future.set_running_or_notify_cancel():
            return
        try:
            command.future.set_result(command.run())
        except BaseException as exc:  # handed to the awaiting coroutine
            command.future.set_exception(exc)

    def _fail_all(self, error: GatewayError) -> None:
        with self._cond:
            pending = [*self._waiting, *self._rows]
            self._waiting.clear()
            commands = list(self._commands)
            self._commands.clear()
        for seq in pending:
            self._post(seq, error)
        self._flush()
        for command in commands:
            command.future.set_exception(error)
        self._rows, self._cache, self._mask, self._sampling = [], None, None, None

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
                 adapters: list[str | None], every_position: bool = False) -> torch.Tensor:
        """Logits of the last position ``[rows, vocab]``, or of every position ``[rows, length, vocab]``."""
        self.lora.select(adapters)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,  # the argument's name since transformers 5.24 (`past_key_values` goes in 5.40)
            use_cache=True,
            logits_to_keep=0 if every_position else 1,
        )
        return out.logits if every_position else out.logits[:, -1, :]

    def _prefill(self, joining: list[Sequence]) -> None:
        joined = time.perf_counter()
        for seq in joining:
            seq.joined_at = joined
        try:
            logits, cache, mask = self._prefill_forward(joining)
            sampling = self._sampling_of(joining, logits.shape[-1])
            choice = sampling.choose(self._constrained(joining, logits))
        except Exception as exc:
            failing = self._find_failing(joining, self._trial_prefill)
            self._fail_rows(failing or joining, exc)
            rest = [s for s in joining if s not in failing]
            if failing and rest:
                self._prefill(rest)  # each retry has fewer rows: this ends
            return
        self._join(joining, cache, mask, sampling)
        self._accept(joining, choice)

    def _prefill_forward(self, joining: list[Sequence]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """Last-position logits, cache and mask of the joining rows (and their prompt logprobs, for echo)."""
        longest = max(len(s.request.prompt_token_ids) for s in joining)
        ids = torch.full((len(joining), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(joining), longest), dtype=torch.long)
        for row, seq in enumerate(joining):
            prompt = seq.request.prompt_token_ids
            ids[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, longest - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        # Prompt logprobs (echo) need every position's logits, only for prefills that have such a row.
        echo = any(s.request.sampling.prompt_logprobs is not None for s in joining)
        logits = self._forward(ids, mask, positions, cache, [s.adapter for s in joining], every_position=echo)
        if echo:
            for row, seq in enumerate(joining):
                top = seq.request.sampling.prompt_logprobs
                if top is not None:
                    prompt = seq.request.prompt_token_ids
                    seq.prompt_logprobs = prompt_logprobs(logits[row, longest - len(prompt) :], prompt, top)
            logits = logits[:, -1, :]
        return logits, cache, mask

    def _sampling_of(self, rows: list[Sequence], vocab: int) -> SamplingBatch:
        return SamplingBatch.of([s.request.sampling for s in rows], [s.request.prompt_token_ids for s in rows], vocab,
                                self.device)

    @staticmethod
    def _constrained(rows: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with each structured-output row's disallowed tokens masked (in place; other rows untouched)."""
        mask_logits(logits, [s.grammar for s in rows])
        return logits

    def _decode(self) -> None:
        assert self._cache is not None and self._mask is not None and self._sampling is not None
        rows, width = self._rows, self._mask.shape[1]
        try:
            logits = self._decode_forward(rows, self._cache, self._mask)
            choice = self._sampling.choose(self._constrained(rows, logits))
        except Exception as exc:
            # The cache is updated layer by layer in place: layers before the failure hold one position more.
            self._cache = kv_cache([(k[:, :, :width], v[:, :, :width]) for k, v in _key_values(self._cache)])
            failing = self._find_failing(rows, self._trial_decode)
            self._fail_rows(failing or rows, exc)
            if failing and self._rows:
                self._decode()  # the same step for the others; each retry has fewer rows: this ends
            return
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        self._accept(rows, choice)

    def _decode_forward(self, rows: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor([[s.next_token] for s in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[s.position] for s in rows], dtype=torch.long, device=self.device)
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        return self._forward(ids, mask, positions, cache, [s.adapter for s in rows])

    # --- failure isolation: a row that breaks a step fails alone --------------------------------------------------
    # A step (forward and token choice) that raises is retried without the rows that fail on their own. They are
    # found by bisection over the batch (a step fails when any of its rows does): one bad row costs about
    # 2*log2(batch) smaller trial steps, on copies of the rows' cache and sampling state, and only when a step has
    # failed. A failure no part of the batch reproduces alone (out of memory, a broken device) cannot be pinned on
    # a row and fails them all. Sampling draws are counter-based (backends.sampling), so a retried step draws for
    # the other rows exactly the tokens they would have drawn.

    def _find_failing(self, rows: list[Sequence], attempt: Callable[[list[Sequence]], object]) -> list[Sequence]:
        """The rows of ``rows`` (a batch ``attempt`` failed on) that make ``attempt`` fail by themselves."""
        if len(rows) == 1:
            return rows
        failing: list[Sequence] = []
        half = len(rows) // 2
        for part in (rows[:half], rows[half:]):
            try:
                attempt(part)
            except Exception:
                failing += self._find_failing(part, attempt)
        return failing

    def _trial_prefill(self, part: list[Sequence]) -> None:
        logits, _, _ = self._prefill_forward(part)
        self._sampling_of(part, logits.shape[-1]).choose(self._constrained(part, logits))

    def _trial_decode(self, part: list[Sequence]) -> None:
        """One decode step of some running rows on copies of their state (the batch's own is not touched)."""
        assert self._cache is not None and self._mask is not None and self._sampling is not None
        keep = [self._rows.index(s) for s in part]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        cache = kv_cache([(k.index_select(0, index), v.index_select(0, index)) for k, v in _key_values(self._cache)])
        logits = self._decode_forward(part, cache, self._mask.index_select(0, index))
        self._sampling.select(keep, index).choose(self._constrained(part, logits))

    def _fail_rows(self, rows: list[Sequence], exc: Exception) -> None:
        log.error("engine step failed for %d of its rows (%s: %s); the others go on", len(rows),
                  type(exc).__name__, exc, exc_info=exc)
        error = GatewayError(f"the inference engine failed on this request ({type(exc).__name__}); other requests "
                             "were not affected")
        for seq in rows:
            self._post(seq, error)
        self._drop_rows([s for s in rows if s in self._rows])

    def _accept(self, rows: list[Sequence], choice: Choice) -> None:
        finished = []
        for seq, token, logprob in zip(rows, choice.tokens, choice.logprobs, strict=True):
            seq.generated += 1
            seq.position += 1
            seq.next_token = token
            prompt_lp, seq.prompt_logprobs = seq.prompt_logprobs, None
            logprobs = () if logprob is None else (logprob,)
            if token in seq.stop_token_ids:  # not part of the text; its logprob is reported (as vLLM does)
                self._post(seq, Delta(finish_reason="stop", completion_tokens=seq.generated, logprobs=logprobs,
                                      prompt_logprobs=prompt_lp))
                finished.append(seq)
                continue
            if seq.grammar is not None and seq.grammar.accept(token):  # the grammar is complete: nothing may follow
                self._post(seq, Delta(token_ids=(token,), finish_reason="stop", completion_tokens=seq.generated,
                                      logprobs=logprobs, prompt_logprobs=prompt_lp))
                finished.append(seq)
            elif seq.generated >= seq.request.sampling.max_tokens or seq.position + 1 >= seq.max_total_len:
                self._post(seq, Delta(token_ids=(token,), finish_reason="length", completion_tokens=seq.generated,
                                      logprobs=logprobs, prompt_logprobs=prompt_lp))
                finished.append(seq)
            else:
                self._post(seq, Delta(token_ids=(token,), logprobs=logprobs, prompt_logprobs=prompt_lp))
        self._drop_rows(finished)

    def _join(self, joining: list[Sequence], cache: DynamicCache, mask: torch.Tensor, sampling: SamplingBatch) -> None:
        if self._cache is None or self._mask is None or self._sampling is None:
            self._rows, self._cache, self._mask, self._sampling = list(joining), cache, mask, sampling
            return
        width = max(self._mask.shape[1], mask.shape[1])
        layers = []
        for (old_k, old_v), (new_k, new_v) in zip(_key_values(self._cache), _key_values(cache), strict=True):
            keys = torch.cat([_left_pad(old_k, width), _left_pad(new_k, width)], dim=0)
            values = torch.cat([_left_pad(old_v, width), _left_pad(new_v, width)], dim=0)
            layers.append((keys, values))
        self._cache = kv_cache(layers)
        self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(mask, width)], dim=0)
        self._rows = self._rows + list(joining)
        self._sampling = self._sampling.cat(sampling)

    def _drop_rows(self, leaving: list[Sequence]) -> None:
        if not leaving:
            return
        gone = set(leaving)
        keep = [i for i, s in enumerate(self._rows) if s not in gone]
        self._rows = [self._rows[i] for i in keep]
        if not keep or self._cache is None or self._mask is None or self._sampling is None:
            self._rows, self._cache, self._mask, self._sampling = [], None, None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._sampling = self._sampling.select(keep, index)
        mask = self._mask.index_select(0, index)
        # Columns that are padding for every remaining row can go.
        start = int((mask.sum(0) > 0).nonzero()[0].item())
        layers = [
            (keys.index_select(0, index)[:, :, start:], values.index_select(0, index)[:, :, start:])
            for keys, values in _key_values(self._cache)
        ]
        self._cache = kv_cache(layers)
        self._mask = mask[:, start:]


def _put_all(items: list[tuple[asyncio.Queue[Delta | GatewayError], Delta | GatewayError]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _key_values(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's key and value tensors (full-attention layers; other cache layouts are not batched here)."""
    pairs = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise TypeError(f"unsupported KV cache layer {type(layer).__name__}")
        pairs.append((keys, values))
    return pairs


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Pad the sequence dimension (dim 2 of a KV tensor, dim 1 of a mask) on the left with zeros up to ``width``."""
    missing = width - tensor.shape[-2 if tensor.dim() == 4 else -1]
    if missing == 0:
        return tensor
    if tensor.dim() == 4:
        return torch.nn.functional.pad(tensor, (0, 0, missing, 0))
    return torch.nn.functional.pad(tensor, (missing, 0))
