"""Intervals for the accuracy tables: Wilson intervals on retrieval rates and a bootstrap over
windows on perplexity, so two cache methods are told apart only where their intervals allow."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from kvpr.errors import KvprError


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (no continuity correction).

    Closed form; equal to ``scipy.stats.binomtest(k, n).proportion_ci(level, method="wilson")``
    with ``level = 2 * Phi(z) - 1`` (the tests check it), but taking ``z`` directly. No trials give
    the uninformative ``(0.0, 1.0)``.
    """
    if trials < 0 or not 0 <= successes <= trials:
        raise KvprError(f"successes={successes}, trials={trials}: need 0 <= successes <= trials")
    if z <= 0:
        raise KvprError(f"z={z}: must be positive (1.96 for a 95% interval)")
    if trials == 0:
        return 0.0, 1.0
    p_hat = successes / trials
    z2_n = z * z / trials
    centre = (p_hat + z2_n / 2) / (1 + z2_n)
    half = z / (1 + z2_n) * math.sqrt(p_hat * (1 - p_hat) / trials + z2_n / (4 * trials))
    # the exact bounds at 0 and n are 0 and 1; clamp away rounding
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def bootstrap_ppl_interval(
    nll_sums: Sequence[float],
    token_counts: Sequence[int],
    num_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``exp(sum nll / sum tokens)``, resampling whole windows.

    Args:
        nll_sums: summed negative log-likelihood (nats) of each window's scored tokens.
        token_counts: how many tokens each window scored (same length as ``nll_sums``).
    Returns:
        (low, high) perplexity, seeded: the same inputs and seed give the same interval.
    """
    nll = np.asarray(nll_sums, dtype=np.float64)
    counts = np.asarray(token_counts, dtype=np.float64)
    if nll.ndim != 1 or nll.shape != counts.shape or nll.size == 0:
        raise KvprError(f"{nll.size} nll sums and {counts.size} token counts: give one of each per window")
    if np.any(counts <= 0):
        raise KvprError("a window scored no tokens: every token count must be positive")
    if num_resamples < 1 or not 0.0 < level < 1.0:
        raise KvprError(f"num_resamples={num_resamples}, level={level}: need >= 1 and 0 < level < 1")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, nll.size, size=(num_resamples, nll.size))  # [resample, window]
    ppl = np.exp(nll[picks].sum(axis=1) / counts[picks].sum(axis=1))  # [resample]
    tail = (1.0 - level) / 2
    low, high = np.quantile(ppl, [tail, 1.0 - tail])
    return float(low), float(high)
