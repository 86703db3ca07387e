"""An independent Bradley-Terry fit for the tests: one likelihood term per battle (nothing merged), a tie or "both
bad" as half a win each, optimised by scipy's BFGS with numeric gradients; ratings centred on 1000."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize

from gateway.experiments.store import Battle


def reference_ratings(battles: Sequence[Battle]) -> dict[str, float]:
    models = sorted({b.model_a for b in battles} | {b.model_b for b in battles})
    index = {m: i for i, m in enumerate(models)}
    wins_a = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}

    def negative_log_likelihood(strength: np.ndarray) -> float:
        total = 0.0
        for b in battles:
            p = 1.0 / (1.0 + 10 ** ((strength[index[b.model_b]] - strength[index[b.model_a]]) / 400.0))
            s = wins_a[b.outcome]
            total -= s * math.log(p) + (1 - s) * math.log(1 - p)
        return total

    fit = minimize(negative_log_likelihood, np.zeros(len(models)), method="BFGS", options={"gtol": 1e-9})
    ratings = fit.x - fit.x.mean() + 1000.0
    return {m: float(ratings[index[m]]) for m in models}
