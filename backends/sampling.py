"""Per-row token choice: every row of a batch has its own temperature, top-p, top-k and random generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.base import SamplingParams


@dataclass
class RowSampler:
    params: SamplingParams
    generator: torch.Generator | None  # None for greedy

    @classmethod
    def create(cls, params: SamplingParams, device: torch.device) -> RowSampler:
        if params.temperature == 0:
            return cls(params, None)
        generator = torch.Generator(device=device)
        if params.seed is not None:
            generator.manual_seed(params.seed)
        else:
            generator.seed()
        return cls(params, generator)

    def choose(self, logits: torch.Tensor) -> int:
        """Pick the next token from one row of logits (shape ``[vocab]``, float32)."""
        if self.generator is None:
            return int(torch.argmax(logits).item())
        p = self.params
        scores = logits / p.temperature
        if p.top_k and p.top_k < scores.shape[-1]:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop = cumulative - sorted_probs > p.top_p  # keep the smallest set reaching top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator).item())


def choose_tokens(logits: torch.Tensor, samplers: list[RowSampler]) -> list[int]:
    """Next token for every row; greedy rows are done in one argmax (and only that, when all rows are greedy)."""
    if all(s.generator is None for s in samplers):
        return torch.argmax(logits, dim=-1).tolist()  # argmax is exact in any float dtype: no float32 copy
    logits = logits.float()
    greedy = torch.argmax(logits, dim=-1).tolist()
    return [greedy[i] if s.generator is None else s.choose(logits[i]) for i, s in enumerate(samplers)]
