"""Paired statistics over seeds: a variant's loss minus vanilla's at the same seed (same initial weights, same
batches), summarised by the mean, the sample standard deviation, a 95% t interval for the mean, the interval
where one more seed is expected (95% prediction interval), and the number of seeds where the variant wins."""

from __future__ import annotations

import functools
import math
import random
import statistics
from dataclasses import dataclass
from typing import Any

# Two-sided 95% quantiles of Student's t by degrees of freedom (beyond the table: the next smaller df listed,
# which errs on the wide side; 1.96 in the limit).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError(f"df={df}: a t interval needs at least 2 values")
    return _T95[max(d for d in _T95 if d <= df)] if df <= 120 else 1.960


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    sd: float | None  # sample standard deviation (n - 1); None for a single value
    wins: int = 0  # values below zero: seeds where the variant's loss is lower than the reference's

    @property
    def outside_2sd(self) -> bool | None:
        """|mean| > 2 sd: the difference stands out of the seed-to-seed spread of the difference itself."""
        if self.sd is None:
            return None
        return abs(self.mean) > 2 * self.sd

    @property
    def ci95(self) -> tuple[float, float] | None:
        """95% t interval for the mean over seeds."""
        if self.sd is None:
            return None
        half = t95(self.n - 1) * self.sd / math.sqrt(self.n)
        return (self.mean - half, self.mean + half)

    @property
    def predict95(self) -> tuple[float, float] | None:
        """95% prediction interval for the value of one more seed: where a rerun with a new seed should land."""
        if self.sd is None:
            return None
        half = t95(self.n - 1) * self.sd * math.sqrt(1 + 1 / self.n)
        return (self.mean - half, self.mean + half)

    @property
    def excludes_zero(self) -> bool | None:
        """The 95% interval of the mean lies on one side of zero."""
        ci = self.ci95
        return None if ci is None else (ci[0] > 0 or ci[1] < 0)

    def text(self, digits: int = 4) -> str:
        if self.sd is None:
            return f"{self.mean:+.{digits}f} (1 seed)"
        return f"{self.mean:+.{digits}f} ± {self.sd:.{digits}f} ({self.n} seeds)"

    def interval_text(self, digits: int = 3) -> str:
        """`[lo, hi]` of the 95% interval of the mean; empty for one value."""
        ci = self.ci95
        return "" if ci is None else f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def summarize(values: list[float]) -> Summary | None:
    if not values:
        return None
    sd = statistics.stdev(values) if len(values) > 1 else None
    return Summary(len(values), statistics.fmean(values), sd, sum(v < 0 for v in values))


ROBUST_SDS = 3.0  # a run further than this many robust sd from its group's median is an outlier


def robust_sd(values: list[float]) -> float:
    """1.4826 * the median absolute deviation: the sd of a normal sample, unmoved by a few broken runs."""
    med = statistics.median(values)
    return 1.4826 * statistics.median(abs(v - med) for v in values)


def outliers(values: dict[int, float], limit: float = ROBUST_SDS) -> dict[int, float]:
    """{seed: distance in robust sd} of the values further than `limit` robust sd from the median (a group of
    fewer than 4 values has none: its median absolute deviation says nothing)."""
    if len(values) < 4:
        return {}
    med, rsd = statistics.median(values.values()), robust_sd(list(values.values()))
    if rsd == 0:
        return {s: math.inf for s, v in values.items() if v != med}
    return {s: abs(v - med) / rsd for s, v in values.items() if abs(v - med) > limit * rsd}


@functools.cache
def _healthy_max_distance(n: int, draws: int = 20000, seed: int = 0) -> tuple[float, ...]:
    """Sorted: in each of `draws` groups of n values drawn from one normal distribution (no broken run), the
    largest distance from the group's median in robust sd. Seeded: the report regenerates byte for byte."""
    rng = random.Random(seed)
    groups = ({i: rng.gauss(0.0, 1.0) for i in range(n)} for _ in range(draws))
    return tuple(sorted(max(outliers(values, limit=0.0).values(), default=0.0) for values in groups))


def outlier_chance(n: int, limit: float = ROBUST_SDS) -> float:
    """How often a healthy group of n runs (one normal distribution) has some run beyond `limit` robust sd, as
    `outliers` judges: the rate at which that test flags a group with nothing broken in it (the median absolute
    deviation of a few values is itself noisy, so at 8 seeds this is about 1 in 5)."""
    if n < 4:  # `outliers` does not judge so few
        return 0.0
    distances = _healthy_max_distance(n)
    return sum(d > limit for d in distances) / len(distances)


def outlier_limit(n: int, chance: float = 0.01) -> float:
    """The distance in robust sd that a healthy group of n runs exceeds by chance in `chance` of groups."""
    if n < 4:
        return math.inf
    distances = _healthy_max_distance(n)
    return distances[min(len(distances) - 1, math.ceil((1 - chance) * len(distances)))]


def paired(rows: list[dict[str, Any]], baseline: list[dict[str, Any]], key: str = "val_loss") -> list[float]:
    """Differences row[key] - baseline[key] over the seeds both hold, in seed order."""
    base = {r["seed"]: r[key] for r in baseline}
    return [r[key] - base[r["seed"]] for r in sorted(rows, key=lambda r: r["seed"]) if r["seed"] in base]


def paired_curve(rows: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> list[tuple[int, Summary]]:
    """The paired difference of the validation curves at every token count both runs of a seed evaluated."""
    base = {r["seed"]: dict((int(t), v) for t, v in r["val_curve"]) for r in baseline}
    at: dict[int, list[float]] = {}
    for r in rows:
        ref = base.get(r["seed"])
        if ref is None:
            continue
        for t, v in r["val_curve"]:
            if int(t) in ref:
                at.setdefault(int(t), []).append(v - ref[int(t)])
    n = max((len(v) for v in at.values()), default=0)
    return [(t, summarize(v)) for t, v in sorted(at.items()) if len(v) == n]


def mean_curve(rows: list[dict[str, Any]], key: str = "val_curve") -> list[tuple[int, float, float]]:
    """(tokens, mean, sd) of the runs' curves at the token counts every run has."""
    if not rows:
        return []
    points = [dict((int(t), v) for t, v in r[key]) for r in rows]
    common = sorted(set.intersection(*(set(p) for p in points)))
    out = []
    for t in common:
        values = [p[t] for p in points]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append((t, statistics.fmean(values), sd))
    return out


def fmt_sd(sd: float | None, digits: int = 4) -> str:
    return "" if sd is None or math.isnan(sd) else f"{sd:.{digits}f}"
