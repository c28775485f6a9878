"""Paired statistics over seeds: a variant's loss minus vanilla's at the same seed (same initial weights, same
batches), summarised by the mean and the sample standard deviation of those differences."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    sd: float | None  # sample standard deviation (n - 1); None for a single value

    @property
    def outside_2sd(self) -> bool | None:
        """|mean| > 2 sd: the difference stands out of the seed-to-seed spread of the difference itself."""
        if self.sd is None:
            return None
        return abs(self.mean) > 2 * self.sd

    def text(self, digits: int = 4) -> str:
        if self.sd is None:
            return f"{self.mean:+.{digits}f} (1 seed)"
        return f"{self.mean:+.{digits}f} ± {self.sd:.{digits}f} ({self.n} seeds)"


def summarize(values: list[float]) -> Summary | None:
    if not values:
        return None
    sd = statistics.stdev(values) if len(values) > 1 else None
    return Summary(len(values), statistics.fmean(values), sd)


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
