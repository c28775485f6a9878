"""`phd study SUITE --status`: what is done, what is training, what is left, and about how long it will take.

The estimate prices each remaining run by its training FLOPs at the seconds per FLOP this machine achieved on
the suite's finished runs of the same variant (else on all finished runs), plus the evaluation overhead seen.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .flops import training_flops
from .recipes import Run, Suite
from .runner import is_locked, logged_steps, read_results, run_dir, run_rows


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def status_text(suite: Suite, results_path: Path, runs_root: Path) -> str:
    rows = {(r["suite"], r["recipe"], r["variant"], r["seed"]): r
            for r in run_rows(read_results(results_path))}
    mine = [r for key, r in rows.items() if key[0] == suite.name]
    rate_all = [r["wall_s"] / r["flops"] for r in mine if r.get("wall_s")]
    by_variant: dict[str, list[float]] = {}
    for r in mine:
        if r.get("wall_s"):
            by_variant.setdefault(r["variant"], []).append(r["wall_s"] / r["flops"])
    lines = [f"suite {suite.name} ({suite.path}): {len(suite.runs)} runs", ""]
    lines.append("| run | state | tokens | val loss | wall |")
    lines.append("|---|---|---:|---:|---:|")
    left_s, unknown, done = 0.0, 0, 0
    for run in suite.runs:
        row = rows.get(run.key)
        if row:
            done += 1
            lines.append(f"| {run.name} | done | {row['tokens']:,} | {row['val_loss']:.4f} | "
                         f"{_hours(row['wall_s'] or 0)} |")
            continue
        folder = run_dir(runs_root, run)
        step = logged_steps(folder)
        state = "training now" if is_locked(folder) else ("interrupted" if step else "pending")
        remaining = 1 - step / run.steps
        rates = by_variant.get(run.variant) or rate_all
        cost = _estimate(run, rates, remaining)
        if cost is None:
            unknown += 1
        else:
            left_s += cost
        eta = "?" if cost is None else _hours(cost)
        lines.append(f"| {run.name} | {state} (step {step}/{run.steps}) | {run.tokens:,} | | {eta} left |")
    lines.append("")
    summary = (f"{done} of {len(suite.runs)} runs done; about {_hours(left_s)} of one process left at the pace of "
               "the finished runs (which includes whatever else shared the cores then)")
    if left_s:
        summary += f" ({_hours(left_s / 2)} with two processes, one per core)"
    if unknown:
        summary += f"; {unknown} run(s) not estimated until one run of this suite has finished"
    lines.append(summary)
    return "\n".join(lines)


def _estimate(run: Run, rates: list[float], remaining: float) -> float | None:
    if not rates:
        return None
    cfg: Any = run.model_config()
    return statistics.median(rates) * training_flops(cfg, run.settings["seq_len"], run.tokens) * remaining
