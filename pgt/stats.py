"""How sure a row is: per-row means and spreads over seeds, and the PGT - baseline difference with a 95% confidence
interval (scipy.stats).

For rows run with the same seeds, the difference is paired by seed: d_k = pgt_k - baseline_k, and
d_bar +- t_{0.975, n-1} s_d / sqrt(n) (scipy's ttest_rel interval). Otherwise Welch's interval:
(mean_p - mean_b) +- t_{0.975, nu} sqrt(s_p^2 / n_p + s_b^2 / n_b), with the Welch-Satterthwaite degrees of freedom
nu (scipy's ttest_ind with equal_var=False). A row with one seed has no spread to estimate, so its difference comes
without an interval. s is the sample standard deviation (n - 1 in the denominator).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95


@dataclass
class Summary:
    n: int
    mean: float
    std: float  # nan with one value


def summarize(values: list[float]) -> Summary:
    values = np.asarray(values, dtype=np.float64)
    return Summary(len(values), float(values.mean()) if len(values) else math.nan,
                   float(values.std(ddof=1)) if len(values) > 1 else math.nan)


@dataclass
class Difference:
    estimate: float
    low: float  # nan without an interval
    high: float
    method: str  # 'paired', 'Welch' or 'one seed'

    def contains(self, value: float) -> bool | None:
        """Whether ``value`` lies in the interval (None without one)."""
        if math.isnan(self.low):
            return None
        return self.low <= value <= self.high


def difference(pgt: dict[int, float], baseline: dict[int, float], level: float = LEVEL) -> Difference:
    """PGT - baseline from {seed: value} of each row: paired when both have the same seeds (two or more), Welch when
    both have two or more, otherwise the difference of the means alone."""
    a, b = np.array(list(pgt.values()), dtype=np.float64), np.array(list(baseline.values()), dtype=np.float64)
    estimate = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return Difference(estimate, math.nan, math.nan, 'one seed')
    if set(pgt) == set(baseline):
        seeds = sorted(pgt)
        pairs = np.array([pgt[s] for s in seeds]) - np.array([baseline[s] for s in seeds])
        if np.all(pairs == pairs[0]):  # no spread: the interval is the point (scipy would give nan)
            return Difference(estimate, estimate, estimate, 'paired')
        interval = stats.ttest_rel(np.array([pgt[s] for s in seeds]),
                                   np.array([baseline[s] for s in seeds])).confidence_interval(level)
        return Difference(estimate, float(interval.low), float(interval.high), 'paired')
    if a.std() == 0 and b.std() == 0:
        return Difference(estimate, estimate, estimate, 'Welch')
    interval = stats.ttest_ind(a, b, equal_var=False).confidence_interval(level)
    return Difference(estimate, float(interval.low), float(interval.high), 'Welch')
