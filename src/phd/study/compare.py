"""`phd compare`'s library: a paired comparison of variants as a one-recipe study suite, trained in worker
processes and summarised as markdown beside the spread the project's study measured for the same setting.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from .recipes import Suite
from .runner import done_keys, logged_steps, read_results, run_dir, run_rows, run_suite
from .stats import paired, summarize

DEFAULTS = dict(variants=["vanilla", "PHD-CSWA-3-16-32"], preset="cpu-1m", seq_len=256, batch_size=16,
                tokens=750_000, lr=0.003, evals=6, eval_sequences=256)
STUDY_SUITE = "small"  # the suite of experiments/ that measured the defaults over seeds
REPO = Path(__file__).resolve().parents[3]


class Comparison(Protocol):
    """The settings of one comparison (what `phd compare` parses)."""

    variants: list[str]
    preset: str
    seq_len: int
    batch_size: int
    tokens: int
    steps: int | None
    lr: float
    evals: int
    eval_sequences: int
    seeds: list[int]
    jobs: int
    quiet: bool


def suite_for(args: Comparison, data: str) -> tuple[str, dict[str, Any]]:
    """(recipe name, suite) of this comparison; the name carries a digest of the settings, so other settings
    train in other folders and nothing of an earlier comparison is overwritten."""
    settings = {"preset": args.preset, "data": data, "seq_len": args.seq_len, "batch_size": args.batch_size,
                "tokens": args.steps * args.seq_len * args.batch_size if args.steps else args.tokens,
                "lr": args.lr, "evals": args.evals, "eval_sequences": args.eval_sequences,
                "checkpoint_every": 25}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    recipe = f"compare-{digest}"
    suite = {"description": "phd compare", "defaults": settings,
             "recipes": {recipe: {"variants": list(args.variants), "seeds": list(args.seeds)}}}
    return recipe, suite


def train(suite: Suite, results: Path, out: Path, args: Comparison) -> None:
    """Train the suite's runs, in `jobs` worker processes (`phd study`) or, with one job, in this process."""
    pending = [r for r in suite.runs if r.key not in done_keys(read_results(results))]
    jobs = min(args.jobs, len(pending))
    if jobs <= 1:
        run_suite(suite, results, out / "runs", progress=not args.quiet)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "phd", "study", "compare", "--experiments", str(out / "suites"),
               "--results", str(results), "--runs", str(out / "runs"), "--threads", str(threads), "--quiet"]
    workers = []
    for i in range(jobs):
        log = open(logs / f"worker{i}.log", "w")  # noqa: SIM115 (closed below)
        workers.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(1.0)  # the first worker takes the first run's lock before the next one looks
    _follow(suite, out / "runs", [w for w, _ in workers], quiet=args.quiet)
    for worker, log in workers:
        log.close()
        if worker.returncode:
            tail = (logs / Path(log.name).name).read_text().splitlines()[-5:]
            print(f"phd compare: a worker failed (exit {worker.returncode}):\n  " + "\n  ".join(tail), file=sys.stderr)


def _follow(suite: Suite, runs_root: Path, workers: list[subprocess.Popen], quiet: bool) -> None:
    """A progress bar over all runs' steps, read from their metrics files, until the workers exit."""
    def done() -> int:
        return sum(min(logged_steps(run_dir(runs_root, r)), r.steps) for r in suite.runs)

    total = sum(r.steps for r in suite.runs)
    bar = None
    if not quiet:
        bar = tqdm(total=total, desc="compare (all runs)", unit="step", dynamic_ncols=True)
    try:
        while any(w.poll() is None for w in workers):
            time.sleep(2.0)
            if bar is not None:
                bar.n = done()
                bar.refresh()
    except KeyboardInterrupt:
        for w in workers:
            w.terminate()  # SIGTERM: each worker saves a checkpoint after its current step
        for w in workers:
            w.wait()
        raise
    finally:
        if bar is not None:
            bar.n = done()
            bar.close()


def summary(rows: list[dict[str, Any]], args: Comparison, settings: dict[str, Any], data: Path) -> str:
    """The comparison as markdown: per variant the loss of every seed and the paired difference to the first."""
    by_variant = {v: sorted((r for r in rows if r["variant"] == v), key=lambda r: r["seed"]) for v in args.variants}
    base_name = args.variants[0]
    base = by_variant[base_name]
    first = rows[0]
    lines = [
        f"{args.preset} ({first['params']:,} parameters), seq_len {args.seq_len}, batch {args.batch_size}, "
        f"{first['tokens']:,} training tokens per run, lr {args.lr}, seeds {' '.join(map(str, args.seeds))}, "
        f"data {data}",
        "",
        f"| variant | val loss by seed | mean | paired Δ vs {base_name} | train FLOPs | tok/s | time |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for variant, group in by_variant.items():
        losses = " ".join(f"{r['val_loss']:.4f}" for r in group)
        mean = summarize([r["val_loss"] for r in group])
        delta = summarize(paired(group, base)) if variant != base_name else None
        tok_s = sum(r["tok_per_s"] for r in group) / len(group)
        wall = sum(r["wall_s"] or 0 for r in group) / len(group)
        lines.append(f"| {variant} | {losses} | {mean.mean:.4f} | {delta.text() if delta else ''} | "
                     f"{group[0]['flops'] / 1e12:.2f} TF | {tok_s:,.0f} | {wall:.0f} s |")
    reference = study_reference(settings, args.variants)
    if reference:
        lines += ["", reference]
    return "\n".join(lines)


def study_reference(settings: dict[str, Any], variants: list[str],
                    path: Path = REPO / "experiments" / "results.jsonl") -> str | None:
    """The same setting's paired differences over seeds from the project's study, when this is a checkout. Only
    runs at equal parameters and tokens (role "main"): a suite also holds vanilla runs of other shapes (equal
    FLOPs) and ablations at the same token count, which are not this comparison's baseline."""
    if not path.exists():
        return None
    keys = ("seq_len", "batch_size", "lr")
    rows = [r for r in run_rows(read_results(path)) if r.get("suite") == STUDY_SUITE and r.get("role", "main") == "main"
            and all(r["config"][k] == settings[k] for k in keys) and r["tokens"] >= settings["tokens"] * 0.99
            and r["tokens"] <= settings["tokens"] * 1.01 and r["config"]["model"]["vocab_size"] > 0]
    base = [r for r in rows if r["variant"] == variants[0]]
    parts = []
    for v in variants[1:]:
        diffs = paired([r for r in rows if r["variant"] == v], base)
        s = summarize(diffs)
        if s is not None:
            verdict = "" if s.outside_2sd is None else (
                ", outside 2 sd" if s.outside_2sd else ", within 2 sd: not distinguishable from noise")
            by_seed = ", ".join(f"{d:+.4f}" for d in diffs)
            parts.append(f"{v} − {variants[0]}: {s.text()}{verdict} (by seed: {by_seed})")
    if not parts:
        return None
    return (f"The study measured this setting on the project's corpus (docs/RESULTS.md, suite `{STUDY_SUITE}`): "
            + "; ".join(parts) + ".")


def plot_curves(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """The validation curves as a PNG, or None without matplotlib (the `plot` extra: imported here)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors: dict[str, str] = {}
    for r in sorted(rows, key=lambda r: (r["variant"], r["seed"])):
        xs = [t for t, _ in r["val_curve"]]
        ys = [v for _, v in r["val_curve"]]
        line = ax.plot(xs, ys, marker=".", color=colors.get(r["variant"]),
                       label=r["variant"] if r["variant"] not in colors else None)[0]
        colors.setdefault(r["variant"], line.get_color())
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path
