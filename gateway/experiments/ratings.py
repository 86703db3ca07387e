"""Leaderboard figures: Bradley-Terry ratings from pairwise votes, and per-variant serving figures.

Ratings follow FastChat's ``compute_bt`` / ``compute_bootstrap_bt`` (fastchat/serve/monitor/rating_systems.py):

- each battle is ``(model_a, model_b, outcome)`` with outcome 1 (a won), 0 (b won) or 0.5 — a tie *and* a
  "both bad" vote both count as half a win for each side, as FastChat treats "tie" and "tie (bothbad)";
- identical ``(a, b, outcome)`` rows are merged into weights; the strengths ``x`` minimise the weighted logistic
  loss of ``P(a beats b) = sigmoid(ln(10) * (x_a - x_b))`` with scipy's L-BFGS-B from zeros (which keeps their mean
  at 0), and the rating is ``400 * x + 1000`` (the Elo scale);
- the 95 % interval is the 2.5 / 97.5 % quantiles over bootstrap rounds that redraw the battle counts from a
  multinomial over the merged rows (seeded, so the same votes give the same intervals).

Battles of a model against itself (two responses of one model) carry no information and are left out.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from scipy.stats import t as student_t
from threadpoolctl import threadpool_limits

from gateway.experiments.store import Battle, Served
from gateway.protocol.experiments import VariantRow

SCALE = 400.0
BASE = 10.0
INIT_RATING = 1000.0
_OUTCOME = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}


@dataclass(frozen=True)
class Rating:
    model: str
    rating: float
    ci_low: float
    ci_high: float
    battles: int
    wins: int
    losses: int
    ties: int  # ties and "both bad" votes

    @property
    def win_rate(self) -> float:
        """Share of battles won, a tie counting half."""
        return (self.wins + 0.5 * self.ties) / self.battles if self.battles else 0.0


def _loss_and_grad(x: np.ndarray, matchups: np.ndarray, outcomes: np.ndarray, weights: np.ndarray,
                   alpha: float) -> tuple[float, np.ndarray]:
    logits = alpha * (x[matchups[:, 0]] - x[matchups[:, 1]])
    probs = expit(logits)
    eps = np.finfo(np.float64).tiny
    loss = -float(((np.log(probs + eps) * outcomes + np.log(1.0 - probs + eps) * (1.0 - outcomes)) * weights).sum())
    pair_grad = -alpha * (outcomes - probs) * weights
    grad = np.zeros_like(x)
    np.add.at(grad, matchups[:, 0], pair_grad)
    np.add.at(grad, matchups[:, 1], -pair_grad)
    return loss, grad


def _fit(matchups: np.ndarray, outcomes: np.ndarray, weights: np.ndarray, n_models: int) -> np.ndarray:
    result = minimize(_loss_and_grad, np.zeros(n_models), args=(matchups, outcomes, weights, math.log(BASE)),
                      jac=True, method="L-BFGS-B", options={"maxiter": 100, "gtol": 1e-6})
    return np.asarray(result.x) * SCALE + INIT_RATING


def bradley_terry(battles: Sequence[Battle], *, rounds: int = 100, seed: int = 0) -> list[Rating]:
    """Ratings with 95 % bootstrap intervals, best first; ``rounds`` bootstrap fits (0: no interval)."""
    # The fits are tiny: BLAS threads only contend (30x slower on a busy 2-core machine than one thread).
    with threadpool_limits(limits=1, user_api="blas"):
        return _bradley_terry(battles, rounds, seed)


def _bradley_terry(battles: Sequence[Battle], rounds: int, seed: int) -> list[Rating]:
    battles = [b for b in battles if b.model_a != b.model_b]
    if not battles:
        return []
    models = sorted({b.model_a for b in battles} | {b.model_b for b in battles})
    index = {m: i for i, m in enumerate(models)}
    schedule = np.array([(index[b.model_a], index[b.model_b], int(2 * _OUTCOME[b.outcome])) for b in battles])
    rows, counts = np.unique(schedule, axis=0, return_counts=True)
    matchups, outcomes, weights = rows[:, :2], rows[:, 2] / 2.0, counts.astype(np.float64)
    # Weights as shares of the battles, in the point fit as in the bootstrap fits (FastChat's compute_bt passes raw
    # counts): the same maximum, and the same stopping rule, so an undefeated model's rating (no finite maximum)
    # stops where its bootstrap ratings stop instead of beyond them.
    ratings = _fit(matchups, outcomes, weights / len(battles), len(models))
    low, high = ratings.copy(), ratings.copy()
    if rounds > 0:
        draws = np.random.default_rng(seed).multinomial(len(battles), weights / weights.sum(), size=rounds)
        samples = np.array([_fit(matchups, outcomes, w / len(battles), len(models)) for w in draws.astype(float)])
        low, high = np.quantile(samples, 0.025, axis=0), np.quantile(samples, 0.975, axis=0)
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # wins, losses, ties
    for b in battles:
        if b.outcome == "a":
            tally[b.model_a][0] += 1
            tally[b.model_b][1] += 1
        elif b.outcome == "b":
            tally[b.model_b][0] += 1
            tally[b.model_a][1] += 1
        else:
            tally[b.model_a][2] += 1
            tally[b.model_b][2] += 1
    out = [Rating(m, float(ratings[i]), float(low[i]), float(high[i]), sum(tally[m]), *tally[m])
           for i, m in enumerate(models)]
    return sorted(out, key=lambda r: -r.rating)


def mean_interval(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """Mean and its 95 % Student-t interval; ``None`` where it is undefined."""
    if not values:
        return None, None, None
    data = np.asarray(values, dtype=np.float64)
    mean = float(data.mean())
    if len(data) < 2:
        return mean, None, None
    half = float(student_t.ppf(0.975, len(data) - 1) * data.std(ddof=1) / math.sqrt(len(data)))
    return mean, mean - half, mean + half


def variant_figures(served: Sequence[Served]) -> list[VariantRow]:
    """Serving figures of every model, on its own (``route`` None) or as a route's variant."""
    groups: dict[tuple[str | None, str], list[Served]] = defaultdict(list)
    for row in served:
        groups[(row.route, row.model)].append(row)
    out = []
    for (route, model), rows in sorted(groups.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
        latencies = [r.latency_s for r in rows if r.status == "ok"]
        scores = [r.score for r in rows if r.score is not None]
        mean, low, high = mean_interval(scores)
        out.append(VariantRow(
            route=route, model=model, requests=len(rows), errors=sum(r.status == "error" for r in rows),
            latency_p50_s=float(np.percentile(latencies, 50)) if latencies else None,
            latency_p95_s=float(np.percentile(latencies, 95)) if latencies else None,
            completion_tokens=sum(r.completion_tokens for r in rows), scores=len(scores),
            mean_score=mean, score_ci_low=low, score_ci_high=high))
    return out
