"""Figures over training seeds: a mean with its 95% t-interval, and paired per-seed differences
between two methods run on the same seeds (same starting model, same prompts within a seed), so
that seed-to-seed variation common to both cancels."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30 (scipy is not a dependency; beyond 30
# the normal's 1.96 is within 4% of t)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t-interval needs at least 2 values (df {df})")
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True)
class Interval:
    mean: float
    half: float  # half-width of the 95% interval; nan with one value
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def includes_zero(self) -> bool:
        return not (self.low > 0 or self.high < 0)  # nan (one seed): cannot exclude zero

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.half:.3f}" if self.n > 1 else f"{self.mean:.3f} (1 seed)"


def mean_interval(values: list[float]) -> Interval:
    """Mean and 95% t-interval half-width t_{0.975, n-1} * s / sqrt(n)."""
    if not values:
        raise ValueError("no values")
    n = len(values)
    if n == 1:
        return Interval(float(values[0]), math.nan, 1)
    return Interval(statistics.mean(values), t975(n - 1) * statistics.stdev(values) / math.sqrt(n), n)


@dataclass(frozen=True)
class Paired:
    diff: Interval  # of method - baseline, per seed
    wins: int  # seeds where the method is better (higher, or lower when lower_is_better)
    ties: int
    n: int


def paired(method: dict[int, float], baseline: dict[int, float], lower_is_better: bool = False) -> Paired:
    """Per-seed differences method - baseline over the seeds both have."""
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        raise ValueError("the two methods share no seed")
    d = [method[s] - baseline[s] for s in seeds]
    better = [(-x if lower_is_better else x) > 0 for x in d]
    return Paired(mean_interval(d), sum(better), sum(x == 0 for x in d), len(seeds))
