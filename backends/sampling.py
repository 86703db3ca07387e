"""Per-row token choice for a whole batch at once, in tensors.

Every row of the engine's batch has its own sampling parameters (temperature, top-p, top-k, min-p, penalties,
logit bias, seed, logprobs). ``SamplingBatch`` keeps them as batched tensors in the engine's row order, together with
the per-row token counts the penalties need, updated incrementally after every step. One ``choose`` call picks the
next token of every row with a fixed sequence of tensor operations: no Python loop over rows per token.

Order of operations (vLLM's): logits + logit bias -> repetition penalty (prompt + generated tokens) -> frequency and
presence penalties (generated tokens) -> per-row masks (``choose(masks=...)``: the place for grammar-constrained
decoding) -> logprobs are taken here -> greedy rows: argmax; sampled rows: temperature, top-k, softmax, min-p, top-p,
then one draw.

Randomness is counter-based: a row's n-th draw is a hash (splitmix64) of its seed and n, turned into a uniform
number and looked up in the row's cumulative distribution. So a row's tokens depend only on its own seed, logits and
parameters, never on its batch neighbours or on the order rows joined; unseeded rows get a random seed.

When every row is greedy and nothing else is asked for, ``choose`` is a plain argmax over the logits as they are.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from backends.base import SamplingParams, TokenLogprob

# Columns of ``SamplingBatch.values``.
_TEMPERATURE, _TOP_P, _TOP_K, _MIN_P, _FREQUENCY, _PRESENCE, _REPETITION = range(7)

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # splitmix64's constants as signed int64 (torch has no uint64 multiply)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_LOGPROB_FLOOR = -9999.0  # what OpenAI reports for a token the distribution excludes (JSON has no -inf)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """A number in [0, 1) per row: splitmix64 of (seed, step), top 24 bits (exact in float32)."""
    z = seeds + (steps + 1) * _GOLDEN  # int64 arithmetic wraps, as splitmix64's uint64 arithmetic does
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 40).to(torch.float32) / float(1 << 24)


def row_seed(params: SamplingParams) -> int:
    """The row's random stream: its seed, or a fresh random one."""
    if params.seed is None:
        return secrets.randbits(63)
    return params.seed % (1 << 63)


@dataclass
class Choice:
    """The tokens chosen for every row, and for rows that asked for logprobs their entry (else ``None``)."""

    tokens: list[int]
    logprobs: list[TokenLogprob | None]


class SamplingBatch:
    """The sampling state of a batch's rows, as tensors. Build with ``of``; combine with ``cat`` and ``select``."""

    def __init__(self, params: list[SamplingParams], values: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                 counts: torch.Tensor | None, seen: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        self.params = params
        self.values = values  # [rows, 7] float32, columns as above
        self.seeds = seeds  # [rows] int64
        self.steps = steps  # [rows] int64: draws so far
        self.counts = counts  # [rows, vocab] float32: generated-token counts (only while a row has freq/presence)
        self.seen = seen  # [rows, vocab] bool: prompt + generated tokens (only while a row has repetition penalty)
        self.bias = bias  # [rows, vocab] float32 (only while a row has a logit bias)
        # Decided once per batch change, not per token.
        self.greedy = values[:, _TEMPERATURE] == 0
        self.all_greedy = all(p.temperature == 0 for p in params)
        self.has_top_k = (values[:, _TOP_K] > 0) & ~self.greedy
        self.top_k_max = max((p.top_k for p in params if p.temperature > 0), default=0)
        self.any_top_k = self.top_k_max > 0
        self.all_top_k = all(p.top_k > 0 for p in params if p.temperature > 0)
        self.any_top_p = any(p.top_p < 1.0 and p.temperature > 0 for p in params)
        self.any_min_p = any(p.min_p > 0 and p.temperature > 0 for p in params)
        self.logprobs_max = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        self.plain = self.all_greedy and counts is None and seen is None and bias is None and self.logprobs_max is None

    @classmethod
    def of(cls, params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]], vocab: int,
           device: torch.device) -> SamplingBatch:
        """The state of rows that have just been prefilled (``prompts`` are their prompt token ids)."""
        params = list(params)
        values = torch.tensor(
            [[p.temperature, p.top_p, p.top_k, p.min_p, p.frequency_penalty, p.presence_penalty, p.repetition_penalty]
             for p in params], dtype=torch.float32, device=device)
        seeds = torch.tensor([row_seed(p) for p in params], dtype=torch.long, device=device)
        steps = torch.zeros(len(params), dtype=torch.long, device=device)
        counts = seen = bias = None
        if any(p.frequency_penalty or p.presence_penalty for p in params):
            counts = torch.zeros((len(params), vocab), dtype=torch.float32, device=device)
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = torch.zeros((len(params), vocab), dtype=torch.bool, device=device)
            for row, prompt in enumerate(prompts):  # once per joining row, not per token
                if params[row].repetition_penalty != 1.0:
                    seen[row, torch.tensor(list(prompt), dtype=torch.long, device=device)] = True
        if any(p.logit_bias for p in params):
            bias = torch.zeros((len(params), vocab), dtype=torch.float32, device=device)
            for row, p in enumerate(params):
                for token, value in p.logit_bias:
                    bias[row, token] = value
        return cls(params, values, seeds, steps, counts, seen, bias)

    def __len__(self) -> int:
        return len(self.params)

    def cat(self, other: SamplingBatch) -> SamplingBatch:
        """This batch's rows followed by ``other``'s."""
        return SamplingBatch(
            self.params + other.params,
            torch.cat([self.values, other.values]),
            torch.cat([self.seeds, other.seeds]),
            torch.cat([self.steps, other.steps]),
            _cat_optional(self.counts, other.counts, len(self), len(other)),
            _cat_optional(self.seen, other.seen, len(self), len(other)),
            _cat_optional(self.bias, other.bias, len(self), len(other)),
        )

    def select(self, keep: list[int], index: torch.Tensor) -> SamplingBatch:
        """The rows at ``keep`` (``index`` is the same as a tensor on the device), in that order."""
        params = [self.params[i] for i in keep]
        counts = self.counts if any(p.frequency_penalty or p.presence_penalty for p in params) else None
        seen = self.seen if any(p.repetition_penalty != 1.0 for p in params) else None
        bias = self.bias if any(p.logit_bias for p in params) else None
        return SamplingBatch(
            params, self.values.index_select(0, index), self.seeds.index_select(0, index),
            self.steps.index_select(0, index),
            None if counts is None else counts.index_select(0, index),
            None if seen is None else seen.index_select(0, index),
            None if bias is None else bias.index_select(0, index),
        )

    # --- the step -------------------------------------------------------------------------------------------------

    def adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits every later stage sees: float32, plus logit bias, minus penalties."""
        x = logits.float()
        if self.bias is not None:
            x = x + self.bias
        if self.seen is not None:
            rep = self.values[:, _REPETITION : _REPETITION + 1]
            x = torch.where(self.seen, torch.where(x > 0, x / rep, x * rep), x)
        if self.counts is not None:
            x = (x - self.values[:, _FREQUENCY : _FREQUENCY + 1] * self.counts
                 - self.values[:, _PRESENCE : _PRESENCE + 1] * (self.counts > 0).float())
        if self.bias is not None or self.seen is not None or self.counts is not None:
            # An extreme penalty (repetition_penalty 1e-300 divides a logit into inf) must not turn the row's
            # distribution into NaN: +inf becomes the largest float, NaN a banned token.
            x = torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(x.dtype).max)
        return x

    def choose(self, logits: torch.Tensor, masks: torch.Tensor | None = None) -> Choice:
        """Next token of every row from ``logits`` ``[rows, vocab]``; advances the per-row state.

        ``masks`` (``[rows, vocab]`` bool, True = allowed), when given, bans the other tokens of each row before
        logprobs and choice (grammar-constrained decoding).
        """
        if self.plain and masks is None:
            # Exact in any float dtype: no float32 copy. (A greedy row never draws, so its draw counter can stay.)
            return Choice(torch.argmax(logits, dim=-1).tolist(), [None] * len(self))
        x = self.adjusted(logits)
        if masks is not None:
            x = x.masked_fill(~masks, float("-inf"))
        tokens = torch.argmax(x, dim=-1)
        if not self.all_greedy:
            tokens = torch.where(self.greedy, tokens, self._sample(x))
        self._count(tokens)
        logprobs: list[TokenLogprob | None] = [None] * len(self)
        if self.logprobs_max is not None:
            logprobs = self._logprobs(x, tokens)
        self.steps += 1
        return Choice(tokens.tolist(), logprobs)

    def _sample(self, x: torch.Tensor) -> torch.Tensor:
        """One draw per sampled row: its uniform number looked up in the cumulative sum of its weights. Rows with a
        top-k draw among their k best tokens (best first), the others over the vocabulary (in id order)."""
        u = uniform(self.seeds, self.steps)
        chosen = torch.zeros(len(self), dtype=torch.long, device=x.device)
        if self.any_top_k:
            weights, ids = self.candidates(x)
            chosen = ids.gather(1, _draw(weights, u)).squeeze(1)
        if not self.all_top_k:
            chosen = torch.where(self.has_top_k, chosen, _draw(self.dense(x), u).squeeze(1))
        return chosen

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        temperature = self.values[:, _TEMPERATURE]
        return x / torch.where(self.greedy, torch.ones_like(temperature), temperature)[:, None]

    def candidates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For rows with a top-k: unnormalised weights over their k best tokens (best first; the batch's largest k
        columns, the rest weighted 0), then min-p and top-p, and the candidates' token ids.

        Weights are ``exp(score - best)``, elementwise, and top-p uses a prefix sum, so a row's numbers do not depend
        on how many columns its neighbours need. One ``topk`` instead of sorting the vocabulary.
        """
        v = self.values
        count = min(self.top_k_max, x.shape[-1])
        best, ids = torch.topk(self._scores(x), count, dim=-1)
        k = torch.where(self.has_top_k, v[:, _TOP_K], torch.full_like(v[:, _TOP_K], count)).long()
        best = best.masked_fill(torch.arange(count, device=x.device)[None, :] >= k[:, None], float("-inf"))
        weights = torch.exp(best - best[:, :1])
        if self.any_min_p:  # relative to the most likely token, whose weight is 1
            weights = weights.masked_fill(weights < v[:, _MIN_P : _MIN_P + 1], 0.0)
        if self.any_top_p:
            cumulative = torch.cumsum(weights, dim=-1)
            top_p = v[:, _TOP_P : _TOP_P + 1]
            weights = weights.masked_fill((cumulative - weights > top_p * cumulative[:, -1:]) & (top_p < 1.0), 0.0)
        return weights, ids

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """For rows without a top-k: probabilities over the vocabulary after min-p and top-p (unnormalised)."""
        v = self.values
        probs = torch.softmax(self._scores(x), dim=-1)
        if self.any_min_p:
            floor = v[:, _MIN_P : _MIN_P + 1] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < floor, 0.0)
        if self.any_top_p:
            sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            total = sorted_probs.sum(dim=-1, keepdim=True)  # min-p may have removed mass: top-p is relative
            drop = (before > v[:, _TOP_P : _TOP_P + 1] * total) & (v[:, _TOP_P : _TOP_P + 1] < 1.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs.masked_fill(drop, 0.0))
        return probs

    def distribution(self, x: torch.Tensor) -> torch.Tensor:
        """Every row's normalised sampling distribution over the vocabulary (for checks; greedy rows meaningless)."""
        out = self.dense(x)
        if self.any_top_k:
            weights, ids = self.candidates(x)
            out = torch.where(self.has_top_k[:, None], torch.zeros_like(out).scatter(1, ids, weights), out)
        return out / out.sum(dim=-1, keepdim=True)

    def _count(self, tokens: torch.Tensor) -> None:
        rows = torch.arange(len(self), device=tokens.device)
        if self.counts is not None:
            self.counts[rows, tokens] += 1
        if self.seen is not None:
            self.seen[rows, tokens] = True

    def _logprobs(self, x: torch.Tensor, tokens: torch.Tensor) -> list[TokenLogprob | None]:
        assert self.logprobs_max is not None
        logprobs = torch.log_softmax(x, dim=-1)
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
        top_values: list[list[float]] = [[] for _ in self.params]
        top_ids: list[list[int]] = [[] for _ in self.params]
        if self.logprobs_max > 0:
            top = torch.topk(logprobs, min(self.logprobs_max, x.shape[-1]), dim=-1)
            top_values, top_ids = top.values.tolist(), top.indices.tolist()
        out: list[TokenLogprob | None] = []
        token_list = tokens.tolist()
        for row, p in enumerate(self.params):  # building the answer objects: per row, as the engine's deltas are
            if p.logprobs is None:
                out.append(None)
                continue
            pairs = tuple((i, _floor(v)) for i, v in zip(top_ids[row][: p.logprobs], top_values[row], strict=False))
            out.append(TokenLogprob(token_list[row], _floor(chosen[row]), pairs))
        return out


def _draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index ``[rows, 1]`` where each row's cumulative weight first exceeds ``u`` times its total."""
    cdf = torch.cumsum(weights, dim=-1)
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].contiguous(), right=True)
    return index.clamp(max=cdf.shape[-1] - 1)


def prompt_logprobs(logits: torch.Tensor, prompt: Sequence[int], top: int) -> tuple[TokenLogprob | None, ...]:
    """Every prompt token's logprob from the prefill's logits ``[len(prompt), vocab]`` of one row (raw model
    distribution: penalties are defined over generated tokens); the first token has none."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = torch.tensor(list(prompt[1:]), dtype=torch.long, device=logits.device)
    chosen = logprobs.gather(1, targets[:, None]).squeeze(1).tolist()
    top_values: list[list[float]] = [[] for _ in chosen]
    top_ids: list[list[int]] = [[] for _ in chosen]
    if top > 0:
        found = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1)
        top_values, top_ids = found.values.tolist(), found.indices.tolist()
    entries: list[TokenLogprob | None] = [None]
    for position, value in enumerate(chosen):
        pairs = tuple((i, _floor(v)) for i, v in zip(top_ids[position], top_values[position], strict=True))
        entries.append(TokenLogprob(prompt[position + 1], _floor(value), pairs))
    return tuple(entries)


def _floor(value: float) -> float:
    return value if value > _LOGPROB_FLOOR else _LOGPROB_FLOOR  # also for NaN (a row with no finite logit)


def _cat_optional(a: torch.Tensor | None, b: torch.Tensor | None, rows_a: int, rows_b: int) -> torch.Tensor | None:
    """Concatenate per-row state where either side has it; the side without gets neutral rows (zeros)."""
    if a is None and b is None:
        return None
    if a is None:
        assert b is not None
        a = b.new_zeros((rows_a, b.shape[1]))
    if b is None:
        b = a.new_zeros((rows_b, a.shape[1]))
    return torch.cat([a, b])
