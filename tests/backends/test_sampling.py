"""``SamplingBatch``: each knob against transformers' own logits processors (HF semantics) or OpenAI's documented
formula, draws against the distribution they come from, and rows independent of their neighbours."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from backends.base import SamplingParams
from backends.sampling import SamplingBatch, uniform

VOCAB = 40
CPU = torch.device("cpu")


def params(**kwargs: object) -> SamplingParams:
    return SamplingParams(max_tokens=100, **kwargs)  # type: ignore[arg-type]


def batch(*rows: SamplingParams, prompts: list[list[int]] | None = None) -> SamplingBatch:
    return SamplingBatch.of(list(rows), prompts or [[1]] * len(rows), VOCAB, CPU)


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((rows, VOCAB), generator=torch.Generator().manual_seed(seed)) * 3


def forcing(tokens: list[int]) -> torch.Tensor:
    """Logits that make every (greedy) row choose its token."""
    logits = torch.zeros((len(tokens), VOCAB))
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 1000.0
    return logits


def test_all_greedy_without_knobs_is_a_plain_argmax() -> None:
    b = batch(params(temperature=0), params(temperature=0))
    assert b.plain
    logits = random_logits(2).to(torch.bfloat16)
    choice = b.choose(logits)
    assert choice.tokens == torch.argmax(logits, dim=-1).tolist() and choice.logprobs == [None, None]


def test_repetition_penalty_is_transformers_over_prompt_and_output() -> None:
    prompt = [3, 4, 4, 9]
    b = batch(params(temperature=0, repetition_penalty=1.3), params(temperature=0), prompts=[prompt, [5]])
    logits = random_logits(2)
    hf = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt]), logits[:1].clone())
    assert torch.equal(b.adjusted(logits)[0], hf[0])
    assert torch.equal(b.adjusted(logits)[1], logits[1])  # its neighbour has no penalty
    b.choose(forcing([12, 12]))  # the generated token counts too
    hf = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[*prompt, 12]]), logits[:1].clone())
    assert torch.equal(b.adjusted(logits)[0], hf[0])


def test_frequency_and_presence_follow_openais_formula_over_generated_tokens() -> None:
    b = batch(params(temperature=0, frequency_penalty=0.5, presence_penalty=0.25), params(temperature=0),
              prompts=[[7, 7, 7], [7]])
    for token in (3, 3, 5):
        b.choose(forcing([token, token]))
    adjusted = b.adjusted(torch.zeros((2, VOCAB)))
    expected = torch.zeros(VOCAB)
    expected[3] = -(2 * 0.5 + 0.25)
    expected[5] = -(1 * 0.5 + 0.25)
    assert torch.equal(adjusted[0], expected)  # prompt token 7 is not penalised
    assert torch.equal(adjusted[1], torch.zeros(VOCAB))


def test_logit_bias_adds_and_bans() -> None:
    b = batch(params(temperature=0, logit_bias=((2, 5.0), (6, -100.0))), params(temperature=0))
    logits = random_logits(2)
    adjusted = b.adjusted(logits)
    assert adjusted[0, 2] == logits[0, 2] + 5 and adjusted[0, 6] == logits[0, 6] - 100
    assert torch.equal(adjusted[1], logits[1])
    logits[0, 6] = 50.0  # would win without the ban
    assert b.choose(logits).tokens[0] != 6


@pytest.mark.parametrize("knob, warper", [
    ({"top_k": 5}, TopKLogitsWarper(5)),
    ({"top_p": 0.7}, TopPLogitsWarper(0.7)),
    ({"min_p": 0.1}, MinPLogitsWarper(0.1)),
    ({"top_k": 30, "top_p": 0.7}, TopPLogitsWarper(0.7)),  # top-k over candidates, then top-p (30 keeps all)
    ({"top_k": 30, "min_p": 0.1}, MinPLogitsWarper(0.1)),
])
def test_truncation_keeps_the_same_tokens_as_transformers(knob: dict[str, float], warper: object) -> None:
    logits = random_logits(3, seed=4)
    b = batch(*(params(temperature=0.7, **knob) for _ in range(3)))  # type: ignore[arg-type]
    ours = b.distribution(b.adjusted(logits))
    theirs = torch.softmax(warper(torch.zeros((3, 1), dtype=torch.long), logits / 0.7), dim=-1)  # type: ignore[operator]
    assert torch.equal(ours > 0, theirs > 0)
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("top_k, expected", [(0, [0.1, 0.2, 0.3, 0.4]), (3, [0.0, 2 / 9, 3 / 9, 4 / 9])])
def test_draws_follow_the_distribution(top_k: int, expected: list[float]) -> None:
    rows = 4000
    b = SamplingBatch.of([params(temperature=1.0, seed=i, top_k=top_k) for i in range(rows)], [[1]] * rows, 4, CPU)
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().expand(rows, 4)
    probs = torch.tensor(expected)
    counts = torch.bincount(torch.tensor(b.choose(logits).tokens), minlength=4).float()
    sigma = (rows * probs * (1 - probs)).sqrt()
    assert ((counts - rows * probs).abs() <= 4 * sigma).all(), counts


def test_uniform_numbers_are_uniform_and_seeded() -> None:
    seeds = torch.arange(20000, dtype=torch.long)
    u = uniform(seeds, torch.zeros_like(seeds))
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert torch.equal(u, uniform(seeds, torch.zeros_like(seeds)))
    assert not torch.equal(u, uniform(seeds, torch.ones_like(seeds)))


@pytest.mark.parametrize("others_top_k", [0, 7, 35])  # dense path; candidates: fewer / more than mine
def test_a_row_does_not_depend_on_its_neighbours_or_its_place(others_top_k: int) -> None:
    mine = params(temperature=0.9, top_p=0.8, top_k=12, min_p=0.02, frequency_penalty=0.3, presence_penalty=0.1,
                  repetition_penalty=1.1, logit_bias=((4, 2.0),), seed=42, logprobs=3)
    others = [params(temperature=0), params(temperature=1.3, seed=1, top_k=others_top_k),
              params(temperature=0.5, top_k=others_top_k or 3, seed=2),
              params(temperature=0, repetition_penalty=1.5, logprobs=1)]
    alone = batch(mine, prompts=[[5, 6, 7]])
    crowd = batch(*others[:2], mine, *others[2:], prompts=[[1], [2], [5, 6, 7], [3], [4]])
    tokens_alone, tokens_crowd = [], []
    for step in range(30):
        logits = random_logits(5, seed=step)
        a = alone.choose(logits[2:3])
        c = crowd.choose(logits)
        tokens_alone.append((a.tokens[0], a.logprobs[0]))
        tokens_crowd.append((c.tokens[2], c.logprobs[2]))
    assert tokens_alone == tokens_crowd
    assert len({t for t, _ in tokens_alone}) > 3  # it really sampled


def test_rows_leave_and_join_with_their_state() -> None:
    first = batch(params(temperature=0, frequency_penalty=1.0), params(temperature=0))
    first.choose(forcing([3, 3]))
    joined = first.cat(batch(params(temperature=0, repetition_penalty=2.0), prompts=[[8]]))
    kept = joined.select([0, 2], torch.tensor([0, 2]))
    adjusted = kept.adjusted(torch.ones((2, VOCAB)))
    assert adjusted[0, 3] == 0.0 and adjusted[0, 8] == 1.0  # frequency count of token 3 kept
    assert adjusted[1, 8] == 0.5 and adjusted[1, 3] == 1.0  # repetition over its own prompt only


def test_an_extreme_penalty_never_gives_nan() -> None:
    """repetition_penalty 5e-324 divides a positive logit into inf (schemathesis found the NaN logprob it made)."""
    logits = torch.tensor([[3.0, 2.0, -1.0, 0.5, -4.0, 1.0]])
    for temperature in (0.0, 1.0):
        params = SamplingParams(max_tokens=4, temperature=temperature, top_p=5e-324, repetition_penalty=5e-324,
                                logprobs=3, seed=1)
        choice = SamplingBatch.of([params], [[0, 1]], 6, torch.device("cpu")).choose(logits.clone())
        (entry,) = choice.logprobs
        assert entry is not None and math.isfinite(entry.logprob)
        assert all(math.isfinite(value) for _, value in entry.top)
