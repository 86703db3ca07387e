"""Leaderboard maths: Bradley-Terry equals an independent fit; intervals; per-variant figures by hand."""

from __future__ import annotations

import math
import random

import pytest

from gateway.experiments.ratings import bradley_terry, mean_interval, variant_figures
from gateway.experiments.store import Battle, Served
from tests.gateway.experiments.reference import reference_ratings

STRENGTH = {"tiny-qwen": 0.0, "pku-assistant": 150.0, "cat-assistant": 60.0, "thinker": -80.0}  # Elo points


def simulated_battles(count: int, seed: int = 7) -> list[Battle]:
    rng = random.Random(seed)
    models = list(STRENGTH)
    battles = []
    for _ in range(count):
        a, b = rng.sample(models, 2)
        p = 1 / (1 + 10 ** ((STRENGTH[b] - STRENGTH[a]) / 400))
        roll = rng.random()
        outcome = "tie" if roll < 0.1 else "both_bad" if roll < 0.15 else "a" if rng.random() < p else "b"
        battles.append(Battle(a, b, outcome))  # type: ignore[arg-type]
    return battles


def test_ratings_equal_an_independent_bradley_terry_fit() -> None:
    battles = simulated_battles(600)
    ours = {r.model: r.rating for r in bradley_terry(battles, rounds=0)}
    reference = reference_ratings(battles)
    assert ours.keys() == reference.keys()
    for model in ours:
        assert ours[model] == pytest.approx(reference[model], abs=0.05), model
    ranked = [r.model for r in bradley_terry(battles, rounds=0)]
    assert ranked[0] == "pku-assistant" and ranked[-1] == "thinker"


def test_a_tie_and_both_bad_count_half_each_way() -> None:
    even = bradley_terry([Battle("x", "y", "a"), Battle("x", "y", "b"), Battle("x", "y", "tie"),
                          Battle("y", "x", "both_bad")], rounds=0)
    assert [r.rating for r in even] == pytest.approx([1000.0, 1000.0], abs=1e-3)
    # 2 wins + 1 tie against 1 win: x won 2.5 of 4, so P(x beats y) = 0.625.
    lean = {r.model: r for r in bradley_terry([Battle("x", "y", "a"), Battle("x", "y", "a"), Battle("x", "y", "tie"),
                                                Battle("x", "y", "b")], rounds=0)}
    assert lean["x"].rating - lean["y"].rating == pytest.approx(400 * math.log10(0.625 / 0.375), abs=0.05)
    assert (lean["x"].wins, lean["x"].losses, lean["x"].ties, lean["x"].win_rate) == (2, 1, 1, 0.625)


def test_bootstrap_intervals_hold_the_rating_and_repeat_for_the_same_votes() -> None:
    battles = simulated_battles(300)
    first = bradley_terry(battles, rounds=200)
    again = bradley_terry(battles, rounds=200)
    assert [(r.ci_low, r.ci_high) for r in first] == [(r.ci_low, r.ci_high) for r in again]
    for rating in first:
        assert rating.ci_low < rating.rating < rating.ci_high
        assert 20 < rating.ci_high - rating.ci_low < 300  # ~75 battles each: tens of points, not zero or chaos


def test_self_battles_are_left_out() -> None:
    assert bradley_terry([Battle("x", "x", "a")]) == []


def test_mean_interval_by_hand() -> None:
    # [1, 0, 1, 1]: mean 0.75, sd 0.5, t(0.975, 3) = 3.182446305
    mean, low, high = mean_interval([1.0, 0.0, 1.0, 1.0])
    half = 3.182446305284263 * 0.5 / 2
    assert (mean, low, high) == pytest.approx((0.75, 0.75 - half, 0.75 + half))
    assert mean_interval([0.5]) == (0.5, None, None)
    assert mean_interval([]) == (None, None, None)


def test_variant_figures() -> None:
    served = [Served("bot", "a", "ok", latency, 10, score) for latency, score in
              [(0.1, 1.0), (0.2, None), (0.3, 0.0), (0.4, None)]]
    served += [Served("bot", "a", "error", 9.0, 0, None), Served(None, "a", "ok", 1.0, 5, None)]
    rows = {(r.route, r.model): r for r in variant_figures(served)}
    bot = rows[("bot", "a")]
    assert (bot.requests, bot.errors, bot.completion_tokens, bot.scores, bot.mean_score) == (5, 1, 40, 2, 0.5)
    assert bot.latency_p50_s == pytest.approx(0.25)  # errors are not in the latency figures
    assert bot.latency_p95_s == pytest.approx(0.385)
    assert rows[(None, "a")].requests == 1
