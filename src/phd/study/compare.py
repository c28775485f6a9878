"""`phd compare`'s library: a paired comparison of variants as a one-recipe study suite, trained in worker
processes and summarised as markdown beside the spread the project's study measured for the same setting.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from .recipes import NOT_TRAINED, Suite
from .runner import done_keys, logged_steps, read_results, run_dir, run_rows, run_suite
from .stats import Summary, paired, summarize

DEFAULTS = dict(variants=["vanilla", "PHD-CSWA-3-16-32"], preset="cpu-1m", seq_len=256, batch_size=16,
                tokens=750_000, lr=0.006, warmup_fraction=0.5, compile=True, evals=6, eval_sequences=256)
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
    warmup_fraction: float
    compile: bool
    evals: int
    eval_sequences: int
    seeds: list[int]
    jobs: int
    quiet: bool


def suite_for(args: Comparison, data: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(recipe name, suite) of this comparison; the name carries a digest of the settings, so other settings
    train in other folders and nothing of an earlier comparison is overwritten. `data`: a data folder, or
    {"corpus": "default" | "pypi"}."""
    settings = {"preset": args.preset, "data": data, "seq_len": args.seq_len, "batch_size": args.batch_size,
                "tokens": args.steps * args.seq_len * args.batch_size if args.steps else args.tokens,
                "lr": args.lr, "warmup_fraction": args.warmup_fraction, "evals": args.evals,
                "eval_sequences": args.eval_sequences, "compile": args.compile, "checkpoint_every": 25}
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
    """The comparison as markdown: per variant the loss of every seed and the paired difference to the first, then
    the study's measurement of the same setting on the same corpus, and whether these seeds fall inside it."""
    by_variant = {v: sorted((r for r in rows if r["variant"] == v), key=lambda r: r["seed"]) for v in args.variants}
    base_name = args.variants[0]
    base = by_variant[base_name]
    first = rows[0]
    lines = [
        f"{args.preset} ({first['params']:,} parameters), seq_len {args.seq_len}, batch {args.batch_size}, "
        f"{first['tokens']:,} training tokens per run, lr {args.lr}, seeds {' '.join(map(str, args.seeds))}, "
        f"corpus {first.get('corpus', '?')} ({data})",
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
    lines += ["", study_reference(rows, args.variants)]
    return "\n".join(lines)


# Settings that do not change what a run computes (or only how its curve is sampled): left out when matching.
_UNCOMPARED = NOT_TRAINED + ("eval_every", "checkpoint_every", "checkpoint_keep", "log_every", "resumes")
_VARIANT_FIELDS = ("variant", "repeat_k", "window", "chunk", "naive", "attn_backend")


def _comparable(row: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    """A row's training setting apart from its variant and seed (and the fields in `ignore`): runs that answer the
    same question have the same key."""
    config = {k: v for k, v in row["config"].items() if k not in _UNCOMPARED + ignore}
    config["model"] = {k: v for k, v in config["model"].items() if k not in _VARIANT_FIELDS}
    config.setdefault("z_loss", 0.0)
    return json.dumps([config, row["tokens"]], sort_keys=True)


def _largest(groups: dict[tuple[str, str], list[float]]) -> tuple[tuple[str, str], list[float]]:
    """The study's group to cite: the one with the most paired seeds (ties: the last suite / recipes by name)."""
    return max(groups.items(), key=lambda kv: (len(kv[1]), kv[0]))


def _study_deltas(rows: list[dict[str, Any]], variant: str, base_name: str) -> dict[tuple[str, str], list[float]]:
    """{(suite, recipes): paired differences variant − base} of the study's runs, per suite."""
    groups = {}
    for suite in sorted({r["suite"] for r in rows}):
        mine = [r for r in rows if r["suite"] == suite and r["variant"] == variant]
        base = [r for r in rows if r["suite"] == suite and r["variant"] == base_name]
        if mine and base:
            groups[(suite, "+".join(sorted({r["recipe"] for r in mine})))] = paired(mine, base)
    return groups


def study_reference(own: list[dict[str, Any]], variants: list[str],
                    path: Path = REPO / "experiments" / "results.jsonl") -> str:
    """The study's paired difference for this comparison's setting and corpus (runs at equal parameters and
    tokens, role "main"; the group of one recipe set with the most seeds), its 95% interval for the mean and for
    one more seed, and where this comparison's own seeds fall."""
    corpus = own[0].get("corpus", "?")
    if not path.exists():
        return (f"(No study results here ({path} is missing: this is not a checkout of the project), so this run "
                "cannot be set beside the measured spread; see docs/RESULTS.md in the repository.)")
    key = _comparable(own[0])
    study = [r for r in run_rows(read_results(path)) if "config" in r]
    setting = [r for r in study if r.get("role", "main") == "main" and _comparable(r) == key]
    rows = [r for r in setting if r.get("corpus") == corpus]
    base_name = variants[0]
    own_base_loss = {r["seed"]: r["val_loss"] for r in own if r["variant"] == base_name}
    parts = []
    for v in variants[1:]:
        groups = _study_deltas(rows, v, base_name)
        elsewhere = _other_corpora(setting, corpus, v, base_name)
        if not groups:
            parts.append(f"- {v} − {base_name}: the study has no runs of this setting on the {corpus} corpus, so "
                         f"there is no measured spread to judge this run by.{elsewhere}")
            continue
        (suite, recipes), diffs = _largest(groups)
        s = summarize(diffs)
        own_diffs = {r["seed"]: r["val_loss"] - own_base_loss[r["seed"]]
                     for r in sorted(own, key=lambda r: r["seed"]) if r["variant"] == v and r["seed"] in own_base_loss}
        mine_text = ", ".join(f"seed {seed} {d:+.4f}" for seed, d in own_diffs.items())
        head = (f"- {v} − {base_name}, measured by the study on the {corpus} corpus (suite `{suite}`, recipe "
                f"{recipes}): {s.text()}")
        if s.sd is None:
            parts.append(f"{head}: one seed, no spread. This run: {mine_text}.")
            continue
        lo, hi = s.predict95
        outside = {seed: d for seed, d in own_diffs.items() if not lo <= d <= hi}
        verdict = "inside that range" if not outside else _outside_verdict(list(outside), len(own_diffs))
        near, far = sorted(abs(x) for x in s.ci95)
        plainly = (f"In plain words: the study finds no difference between {v} and {base_name} distinguishable "
                   "from zero at this setting" if not s.excludes_zero else
                   f"In plain words: the study finds {v} {'lower' if s.mean < 0 else 'higher'} than {base_name} at "
                   f"this setting, by {near:.3f} to {far:.3f}")
        parts.append(f"{head}, 95% CI of the mean {s.interval_text()}, lower than {base_name} in {s.wins} of {s.n} "
                     f"seeds. {plainly}. One new seed is expected within [{lo:+.3f}, {hi:+.3f}] (95%). This run: "
                     f"{mine_text}: {verdict}.{elsewhere}")
    lr_check = _lr_check(own[0], variants, study)
    return "\n".join(["How this compares with the study (docs/RESULTS.md):", "", *parts, *lr_check])


def _outside_verdict(outside: list[int], n: int) -> str:
    """What seeds outside a 95% range for one new seed mean: such a range misses about 1 seed in 20, so a miss
    alone is weak evidence; the chance of this many misses among `n` seeds if the study is right says how weak."""
    chance = sum(math.comb(n, j) * 0.05**j * 0.95 ** (n - j) for j in range(len(outside), n + 1))
    head = (f"OUTSIDE that range for seed(s) {', '.join(map(str, outside))}. A 95% range misses about 1 new seed "
            f"in 20; {len(outside)} of {n} outside happens by chance in {chance:.1%} of comparisons")
    if chance < 0.05:
        return f"{head}, so this run does not agree with the study: rerun it with other seeds; report it if it repeats"
    return f"{head}: not evidence against the study on its own; rerun with other seeds before reading anything into it"


_LR_FIELDS = ("lr", "min_lr")


def _lr_check(own: dict[str, Any], variants: list[str], study: list[dict[str, Any]]) -> list[str]:
    """The study's lr sweep of this setting (role "sweep"; the comparison's corpus if it has one there), as lines:
    each variant's lowest-loss peak lr, and whether this comparison trains at it. A difference measured at an lr
    that is not both models' good one says how the two cope with that lr, not which is better at its best."""
    key = _comparable(own, ignore=_LR_FIELDS)
    same = [r for r in study if _comparable(r, ignore=_LR_FIELDS) == key]  # this setting at every lr
    sweep = [r for r in same if r.get("role") == "sweep" and r["variant"] in variants]
    if not sweep:
        return []
    runs_on = Counter(str(r.get("corpus")) for r in sweep)
    corpus = str(own.get("corpus"))
    if corpus not in runs_on:
        corpus = max(sorted(runs_on), key=runs_on.__getitem__)
    sweep = [r for r in sweep if str(r.get("corpus")) == corpus]
    losses: dict[str, dict[float, list[float]]] = {}
    for r in sweep:
        losses.setdefault(r["variant"], {}).setdefault(r["config"]["lr"], []).append(r["val_loss"])
    if set(losses) != set(variants) or any(len(by_lr) < 2 for by_lr in losses.values()):
        return []
    best = {v: min(losses[v], key=lambda lr: summarize(losses[v][lr]).mean) for v in variants}
    lrs = sorted({lr for by_lr in losses.values() for lr in by_lr})
    seeds = len({r["seed"] for r in sweep})
    head = (f"- The study's lr check of this setting ({corpus} corpus, peak lr {', '.join(f'{x:g}' for x in lrs)}, "
            f"{seeds} seeds): lowest loss for " + ", ".join(f"{v} at {best[v]:g}" for v in variants) + ".")
    lr = own["config"]["lr"]
    if all(b == lr for b in best.values()):
        return ["", f"{head} This comparison trains at that lr ({lr:g})."]
    text = (f"{head} This comparison's lr {lr:g} is not every model's good lr, so its difference says how the "
            "models cope with that lr, not which is better at its own best setting.")
    common = set(best.values())
    if len(common) == 1:
        good = common.pop()
        at_good = [r for r in sweep if r["config"]["lr"] == good]
        base = [r for r in at_good if r["variant"] == variants[0]]
        for v in variants[1:]:
            diffs = paired([r for r in at_good if r["variant"] == v], base)
            if diffs:
                text += f" At lr {good:g} the study measured {v} − {variants[0]} {summarize(diffs).text()}."
        text += _at_good_lr(own, variants, same, good)
    return ["", text]


def _at_good_lr(own: dict[str, Any], variants: list[str], same: list[dict[str, Any]], good: float) -> str:
    """The study's headline runs (role "main") of this setting (`same`: its runs at every lr) and corpus at the
    models' common good lr, as a sentence, and the flag that trains there: the answer the sweep's few tuning seeds
    only point at."""
    corpus = own.get("corpus")
    rows = [r for r in same if r.get("role", "main") == "main" and r.get("corpus") == corpus
            and r["config"]["lr"] == good]
    texts = []
    for v in variants[1:]:
        groups = _study_deltas(rows, v, variants[0])
        if groups:
            (suite, recipes), diffs = _largest(groups)
            s = summarize(diffs)
            if s.sd is not None:
                texts.append(f"{v} − {variants[0]} {_measured(s)} (suite `{suite}`, recipe {recipes})")
    head = f" On the {corpus} corpus at lr {good:g} the study's headline seeds give {'; '.join(texts)}."
    return (head if texts else "") + f" `phd compare --lr {good:g}` trains at it."


def _measured(s: Summary) -> str:
    """A paired difference as the comparison cites the study's: mean ± sd (seeds), 95% CI, win count."""
    return f"{s.text()}, 95% CI {s.interval_text()}, lower in {s.wins} of {s.n} seeds"


def _other_corpora(setting: list[dict[str, Any]], corpus: str, variant: str, base_name: str) -> str:
    """The study's measurement of the same setting on every other corpus, as a sentence: a difference seen on one
    text and not on another is not a property of the method, and the user should see both."""
    texts = []
    for other in sorted({r.get("corpus") for r in setting} - {corpus}, key=str):
        groups = _study_deltas([r for r in setting if r.get("corpus") == other], variant, base_name)
        if not groups:
            continue
        s = summarize(_largest(groups)[1])
        if s.sd is None:
            texts.append(f"{other} corpus {s.mean:+.4f} (one seed)")
            continue
        verdict = "interval excludes zero" if s.excludes_zero else "not distinguishable from zero"
        texts.append(f"{other} corpus {_measured(s)} ({verdict})")
    return f" The same setting on other text: {'; '.join(texts)}." if texts else ""


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
