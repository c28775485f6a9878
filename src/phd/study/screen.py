"""Early-instability screens: each run of a suite trained only to its first N steps, on the full run's schedule
(same warmup, same peak), with its health logged every step; one row per run in a screen results file.

The runs that went wrong in this project's studies were already off by their first evaluation, after a single
gradient spike in the first 30 steps, so a screen of many seeds over the first steps tells recipes apart at a
fraction of the cost of full runs; the recipe it picks is then judged on full runs. A screen run keeps no
checkpoint: one that is interrupted is trained again from its first step.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..train.trainer import read_metrics
from .recipes import Run, Suite
from .runner import StudyTrainer, append_result, git_commit, read_results, resolve_data, run_dir, run_lock

SPIKE = 4.0  # a step whose gradient norm is more than SPIKE times the run's median (steps after the first 5)


def screen_keys(rows: list[dict[str, Any]], steps: int) -> set[tuple[str, str, str, int]]:
    return {(r["suite"], r["recipe"], r["variant"], r["seed"]) for r in rows
            if r.get("kind") == "screen" and r["screen_steps"] == steps}


def screen_row(run: Run, folder: Path, steps: int, commit: str) -> dict[str, Any]:
    """The screen's row of one run, from its metrics."""
    records = read_metrics(folder)
    train = [r for r in records if "lr" in r and r["step"] <= steps]
    norms = [r["grad_norm"] for r in train if r.get("grad_norm") is not None]
    settled = norms[5:] or norms
    median = statistics.median(settled) if settled else None
    spikes = [r["step"] for r in train[5:] if median and (r.get("grad_norm") or 0) > SPIKE * median]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    last = [r["loss"] for r in train[-5:] if r.get("loss") is not None]
    probes = [r for r in train if "attn_logit_max" in r]
    return {
        "kind": "screen", "suite": run.suite, "recipe": run.recipe, "variant": run.variant, "seed": run.seed,
        "screen_steps": steps, "commit": commit,
        "train_loss_last5": round(sum(last) / len(last), 5) if last else None,
        "first_val_loss": round(vals[0], 5) if vals else None,
        "grad_norm_median": median, "grad_norm_max": max(norms, default=None), "spike_steps": spikes,
        "attn_logit_max": max((max(r["attn_logit_max"]) for r in probes), default=None),
        "out_logit_max": max((r["out_logit_max"] for r in probes), default=None),
        "loss_curve": [round(r["loss"], 4) if r.get("loss") is not None else None for r in train],
        "grad_norm_curve": [round(r["grad_norm"], 3) if r.get("grad_norm") is not None else None for r in train],
    }


def screen_suite(suite: Suite, results_path: Path, runs_root: Path, steps: int,
                 log: Callable[[str], None] = print) -> int:
    """Screen every run of the suite that has no screen row for `steps` yet; return how many were trained."""
    commit = git_commit()
    trained = 0
    for run in suite.runs:
        if run.key in screen_keys(read_results(results_path), steps):
            continue
        folder = run_dir(runs_root / "screen", run)
        with run_lock(folder) as mine:
            if not mine or run.key in screen_keys(read_results(results_path), steps):
                continue
            cfg = run.train_config(data=resolve_data(run, log), out=str(folder), progress=False)
            cfg.diagnostics_every, cfg.checkpoint_every = 1, 0
            StudyTrainer(cfg, commit=commit).fit(stop_after=steps)
            row = screen_row(run, folder, steps, commit)
            append_result(results_path, row)
            trained += 1
            spikes = ", ".join(map(str, row["spike_steps"])) or "none"
            log(f"[screen {suite.name}] {run.name}: loss {row['train_loss_last5']} at step {steps}, first val "
                f"{row['first_val_loss']}, grad norm max {row['grad_norm_max']:.2f} (median "
                f"{row['grad_norm_median']:.2f}), spikes at steps {spikes}")
    return trained
