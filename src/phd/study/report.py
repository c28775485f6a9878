"""`phd study report`: docs/RESULTS.md and its plots, from `experiments/results.jsonl` alone.

Deterministic: the same results file gives the same bytes (rows are sorted, numbers formatted at fixed precision,
PNGs written without a timestamp or software tag). Every run of the file appears in the report: summaries in the
tables, and each run on its own line in the last section.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import PHDConfig
from .recipes import NOT_TRAINED
from .runner import read_results, run_rows
from .stats import (
    Summary,
    fmt_sd,
    mean_curve,
    outlier_chance,
    outlier_limit,
    outliers,
    paired,
    paired_curve,
    robust_sd,
    summarize,
)

FAMILIES = ("vanilla", "repeat", "PHD", "PHD-SWA", "PHD-CSWA")
TPP_SUITE = "tpp"  # issue 20, item 4: Δ against training tokens per non-embedding parameter


def family(variant: str) -> str:
    if variant == "vanilla":
        return "vanilla"
    return re.sub(r"-\d.*$", "", variant)


def variant_order(variant: str) -> tuple:
    """vanilla, then PHD, PHD-SWA, PHD-CSWA, repeat, each by K and then W / C."""
    order = {"vanilla": 0, "PHD": 1, "PHD-SWA": 2, "PHD-CSWA": 3, "repeat": 4}
    numbers = [int(x) for x in re.findall(r"\d+", variant)]
    return (order.get(family(variant), 9), numbers, variant)


def _g(x: float) -> str:
    return f"{x:.3g}"


def _setting(row: dict[str, Any]) -> str:
    """Everything a run trains with except its seed and folders (from the row alone, as the report must)."""
    config = {k: v for k, v in row.get("config", {}).items() if k not in NOT_TRAINED}
    return json.dumps([row.get("baseline", ""), row.get("role", "main"), row["tokens"], corpus(row), config],
                      sort_keys=True)


# A run's optimiser schedule, and settings that only change how its curve is sampled or saved.
_SCHEDULE = ("lr", "min_lr", "warmup_steps", "eval_every", "checkpoint_every", "checkpoint_keep", "log_every")


def _setting_but_schedule(row: dict[str, Any]) -> str:
    """What a run trains apart from its seed and learning-rate schedule (and its baseline): groups with the same
    key differ only in how the learning rate moves, so their paired difference is the schedule's effect."""
    config = {k: v for k, v in row.get("config", {}).items()
              if k not in NOT_TRAINED + _SCHEDULE}
    return json.dumps([row.get("role", "main"), row["tokens"], corpus(row), config], sort_keys=True)


def corpus(row: dict[str, Any]) -> str:
    """The corpus a run trained on: the row's own word, else the data folder's name (rows before corpora had one)."""
    return row.get("corpus") or Path(row.get("config", {}).get("data", "?")).name


def non_embedding_params(row: dict[str, Any]) -> int:
    """The run's parameters outside the embeddings: the row's own count where collect() recorded it, else
    recomputed from the model config the row carries, so a row written before the count existed still places."""
    if row.get("non_embedding_params"):
        return int(row["non_embedding_params"])
    return PHDConfig.from_dict(row["config"]["model"]).num_params(embeddings=False)


def tokens_per_param(row: dict[str, Any]) -> float:
    """Training tokens per non-embedding parameter, from the row alone (the suite's recipe names are labels, not
    data: a recipe whose tokens or model changes must move on the axis with it)."""
    return row["tokens"] / non_embedding_params(row)


@dataclass(frozen=True)
class TppPoint:
    """One variant at one training budget of the tokens-per-parameter suite, paired with its vanilla by seed."""

    variant: str
    recipe: str
    repeat_k: int
    tpp: float
    tokens: int
    delta: Summary | None  # None: no seed of the variant has a vanilla run to pair with yet
    warmup: float  # share of the steps spent warming the lr up: budgets at two schedules are two series


def _warmup_share(row: dict[str, Any]) -> float:
    """The share of a run's steps spent warming the lr up (its recipe's warmup_fraction, as rounded to steps)."""
    return row["config"]["warmup_steps"] / row["steps"]


def _side_of_zero(s: Summary | None) -> str:
    """Where the 95% interval of Δ lies, in words; a point without an interval says why."""
    if s is None:
        return "no paired seed"
    ci = s.ci95
    if ci is None:
        return "one paired seed"
    return "below zero" if ci[1] < 0 else "above zero" if ci[0] > 0 else "includes zero"


def _tpp_text(x: float) -> str:
    """3 significant figures without an exponent: 1, 3, 10, 30, 2.95, 1,000 (`.3g` alone writes 1e+03)."""
    return f"{float(f'{x:.3g}'):,g}"


def _flops(x: float) -> str:
    return f"{x / 1e12:.2f} TF" if x >= 1e12 else f"{x / 1e9:.1f} GF"


def _mean_sd(values: list[float]) -> str:
    s = summarize(values)
    if s is None:
        return ""
    return f"{s.mean:.4f}" if s.sd is None else f"{s.mean:.4f} ± {s.sd:.4f}"


def _verdict(s: Summary | None) -> str:
    """Whether the 95% interval of the mean excludes zero."""
    if s is None:
        return ""
    if s.sd is None:
        return "1 seed"
    return "yes" if s.excludes_zero else "no"


def _delta_cells(s: Summary | None) -> str:
    """`mean ± sd (n seeds) | [95% CI] | wins/n | excludes 0` table cells."""
    if s is None:
        return " | | | "
    wins = f"{s.wins}/{s.n}"
    return f"{s.text()} | {s.interval_text()} | {wins} | {_verdict(s)}"


class Report:
    def __init__(self, rows: list[dict[str, Any]], figures: Path, figure_prefix: str,
                 screens: list[dict[str, Any]] | None = None) -> None:
        self.screens = [r for r in screens or [] if r.get("kind") == "screen"]
        self.rows = run_rows(rows)
        self.costs = [r for r in rows if r.get("kind") == "cost"]
        self.figures, self.prefix = figures, figure_prefix
        self.written: list[Path] = []
        self.suites: list[str] = []
        for r in self.rows:
            if r["suite"] not in self.suites:
                self.suites.append(r["suite"])

    # ----- selection -----
    def suite_rows(self, suite: str, role: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["suite"] == suite and (role is None or r.get("role", "main") == role)]

    def vanilla_of(self, suite: str, recipe: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["suite"] == suite and r["recipe"] == recipe and r["variant"] == "vanilla"]

    def vanilla_losses(self, suite: str, recipe: str) -> dict[int, float]:
        """{seed: validation loss} of a recipe's vanilla runs: what a run is paired with."""
        return {r["seed"]: r["val_loss"] for r in self.vanilla_of(suite, recipe)}

    def paired_delta(self, suite: str, group: list[dict[str, Any]]) -> Summary | None:
        """Δ of a group of runs to the vanilla runs of its baseline recipe, paired by seed (None: no seed pairs)."""
        return summarize(paired(group, self.vanilla_of(suite, group[0]["baseline"])))

    @staticmethod
    def by_variant(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """Rows grouped by what they train: the variant and every setting but the seed. A recipe is a unit of
        scheduling, so runs of one setting split over recipes (e.g. more seeds added later under another name)
        form one group, labelled with their recipes joined by '+'."""
        groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            groups[(r["variant"], _setting(r))].append(r)
        labelled = {}
        for (variant, _), group in groups.items():
            recipes = list(dict.fromkeys(r["recipe"] for r in group))
            labelled[("+".join(recipes), variant)] = group
        return dict(sorted(labelled.items(), key=lambda kv: (variant_order(kv[0][1]), kv[0][0])))

    # ----- markdown -----
    def markdown(self) -> str:
        out = [
            "# Results: does PHD's gain reproduce with this code?",
            "",
            "Generated by `phd study report` from `experiments/results.jsonl` alone (do not edit by hand; the suites "
            "are `experiments/*.json`, run with `phd study SUITE`). Every finished run is in the file and in this "
            "report; the last section lists each one. Paired difference Δ: a variant's validation loss minus "
            "vanilla's at the same seed, where both start from the same initial weights and read the same batches; "
            "mean ± sample standard deviation over seeds, the 95% t interval of the mean, and the seeds where the "
            "variant's loss is lower (wins). \"CI excludes 0\" says whether that interval lies on one side of zero; "
            "one more seed is expected within mean ± t·sd·sqrt(1 + 1/n) (what `phd compare` prints). Training FLOPs "
            "count the work the method needs (formula in `phd.study.flops`). Throughput (tok/s) was measured while "
            "other jobs shared the machine's 2 cores: read it as a rough cost, not a benchmark.",
            "",
        ]
        for suite in self.suites:
            out += self.suite_section(suite)
            if suite == TPP_SUITE:
                out += self.tpp_section()
        if self.screens:
            out += self.screen_section()
        out += self.all_runs()
        return "\n".join(out).rstrip() + "\n"

    def setup_line(self, rows: list[dict[str, Any]]) -> str:
        """The settings every run of the suite shares; what differs between recipes is in their tables."""

        def common(get, fmt) -> str | None:
            values = {json.dumps(get(r), sort_keys=True) for r in rows}
            return fmt(get(rows[0])) if len(values) == 1 else None

        shape = common(lambda r: {k: r["config"]["model"][k] for k in ("n_layers", "d_model", "n_heads",
                                                                        "n_kv_heads", "vocab_size")} | {
                           "params": r["params"]},
                       lambda m: f"{m['n_layers']} layers, d {m['d_model']}, {m['n_heads']} q / {m['n_kv_heads']} "
                                 f"kv heads, vocab {m['vocab_size']} ({m['params']:,} parameters)")
        parts = [
            shape or "model sizes by recipe",
            common(lambda r: (r["config"]["seq_len"], r["config"]["batch_size"]),
                   lambda v: f"seq_len {v[0]}, batch {v[1]}") or "seq_len / batch by recipe",
            common(lambda r: (r["config"]["lr"], r["config"]["min_lr"]),
                   lambda v: f"lr {_g(v[0])} (cosine to {_g(v[1])})") or "learning rate by recipe",
            common(lambda r: Path(r["config"]["data"]).name, lambda v: f"data `{v}`") or "data by recipe",
        ]
        commits = sorted({x for r in rows for x in (r.get("commits") or [r["commit"]])})
        threads = sorted({r.get("threads") for r in rows if r.get("threads")})
        return (f"Setup: {'; '.join(parts)}; {', '.join(str(t) for t in threads)} thread(s) per run; "
                f"commits {', '.join(commits)}.")

    def suite_section(self, suite: str) -> list[str]:
        rows = self.suite_rows(suite)
        out = [f"## Suite `{suite}`", "", self.setup_line(rows), ""]
        sweep = self.suite_rows(suite, "sweep")
        if sweep:
            out += self.sweep_table(suite, sweep)
        main = self.suite_rows(suite, "main")
        if main:
            out += self.main_table(suite, main)
            out += self.schedule_table(main)
        flops = self.suite_rows(suite, "equal-flops")
        if flops:
            out += self.flops_table(suite, main, flops)
        ablation = self.suite_rows(suite, "ablation")
        if ablation:
            out += self.ablation_table(suite, main, ablation)
        costs = list({c["variant"]: c for c in self.costs if c["suite"] == suite}.values())  # the latest per variant
        if costs:
            out += self.cost_table(costs)
        out += self.plots(suite, sweep, main, flops)
        return out

    def sweep_table(self, suite: str, rows: list[dict[str, Any]]) -> list[str]:
        out = ["### Tuning (role sweep)", "",
               "| recipe | model | variant | lr | tokens | seeds | val loss | Δ vs the recipe's vanilla |",
               "|---|---|---|---:|---:|---:|---:|---:|"]
        for (recipe, variant), group in sorted(self.by_variant(rows).items(),
                                               key=lambda kv: (kv[1][0]["params"], kv[1][0]["config"]["lr"],
                                                               variant_order(kv[0][1]))):
            c = group[0]["config"]
            m = c["model"]
            delta = summarize(paired(group, self.vanilla_of(suite, recipe))) if variant != "vanilla" else None
            out.append(f"| {recipe} | {m['n_layers']}x{m['d_model']} ({group[0]['params'] / 1e6:.2f}M) | {variant} | "
                       f"{_g(c['lr'])} | {group[0]['tokens']:,} | {len(group)} | "
                       f"{_mean_sd([r['val_loss'] for r in group])} | {delta.text() if delta else ''} |")
        out.append("")
        shapes: dict[tuple, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            shapes[(r["params"], r["tokens"], r["variant"])][r["recipe"]].append(r)
        for (params, tokens, variant), recipes in sorted(shapes.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                        variant_order(kv[0][2]))):
            means = {rec: statistics.fmean(r["val_loss"] for r in g) for rec, g in recipes.items()}
            best = min(means, key=means.get)
            seeds = len(recipes[best])
            out.append(f"Lowest mean validation loss of {variant} at {params / 1e6:.2f}M parameters and {tokens:,} "
                       f"tokens: `{best}` (lr {_g(recipes[best][0]['config']['lr'])}, {means[best]:.4f} over "
                       f"{seeds} seed{'s' if seeds > 1 else ''}).")
        return out + [""]

    def main_table(self, suite: str, rows: list[dict[str, Any]]) -> list[str]:
        out = ["### Equal parameters, equal training tokens", "",
               "| variant | recipe | corpus | lr | seeds | tokens | train FLOPs | val loss | paired Δ vs vanilla | "
               "95% CI | wins | CI excludes 0 | tok/s | wall / run |",
               "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---:|"]
        findings = []
        for (recipe, variant), group in self.by_variant(rows).items():
            delta = self.paired_delta(suite, group) if variant != "vanilla" else None
            tok_s = [r["tok_per_s"] for r in group if r.get("tok_per_s")]
            wall = [r["wall_s"] for r in group if r.get("wall_s")]
            speed = (f"{sum(tok_s) / len(tok_s):,.0f} | {sum(wall) / len(wall) / 60:.1f} min" if tok_s and wall
                     else " | ")
            out.append(
                f"| {variant} | {recipe} | {corpus(group[0])} | {_g(group[0]['config']['lr'])} | {len(group)} | "
                f"{group[0]['tokens']:,} | "
                f"{_flops(group[0]['flops'])} | {_mean_sd([r['val_loss'] for r in group])} | {_delta_cells(delta)} | "
                f"{speed} |"
            )
            if delta is not None:
                findings.append(self.finding(f"{variant} ({recipe})", delta))
        out.append("")
        if findings:
            out += ["In words:", ""] + [f"- {f}" for f in findings] + [""]
        out += self.stability_table(suite, rows)
        return out

    def schedule_table(self, rows: list[dict[str, Any]]) -> list[str]:
        """The same variant on the same model, corpus and tokens at two learning-rate schedules (peak, warmup),
        paired by seed: whether a recipe was near its best schedule, and whether a remedy changed the loss. Each
        later group (in the results file's order) against each earlier one."""
        order = {id(r): i for i, r in enumerate(self.rows)}
        sets: dict[str, list[list[dict[str, Any]]]] = defaultdict(list)
        for group in self.by_variant(rows).values():
            sets[_setting_but_schedule(group[0])].append(group)
        pairs = []
        for groups in sets.values():
            groups.sort(key=lambda g: order[id(g[0])])
            pairs += [(a, b) for i, b in enumerate(groups) for a in groups[i + 1:]]
        pairs = [(a, b, d) for a, b in pairs if (d := summarize(paired(a, b))) is not None]
        if not pairs:
            return []

        def schedule(g: list[dict[str, Any]]) -> str:
            c = g[0]["config"]
            return f"{'+'.join(dict.fromkeys(r['recipe'] for r in g))} (lr {_g(c['lr'])}, warmup " \
                   f"{c['warmup_steps']}/{g[0]['steps']} steps)"

        out = ["### Learning-rate schedules: the same variant, model, corpus and tokens", "",
               "Δ = the first schedule's validation loss minus the second's, paired by seed (same initial weights, "
               "same batches): negative means the first schedule trains the variant to a lower loss.", "",
               "| variant | tokens | corpus | schedule | against | Δ | 95% CI | first lower | CI excludes 0 |",
               "|---|---:|---|---|---|---:|---|---:|---|"]
        for a, b, d in sorted(pairs, key=lambda p: (p[0][0]["tokens"], corpus(p[0][0]),
                                                    variant_order(p[0][0]["variant"]), order[id(p[0][0])])):
            out.append(f"| {a[0]['variant']} | {a[0]['tokens']:,} | {corpus(a[0])} | {schedule(a)} | {schedule(b)} | "
                       f"{_delta_cells(d)} |")
        return out + [""]

    def stability_table(self, suite: str, rows: list[dict[str, Any]]) -> list[str]:
        """Per group of runs: the seed spread, the robust spread, and any run far outside it (a broken run). A far
        run's paired Δ to vanilla tells a broken run (Δ far from its group's) from a seed that is hard for every
        variant (vanilla as high, Δ ordinary)."""
        groups = {k: g for k, g in self.by_variant(rows).items() if len(g) >= 4}
        if not groups:
            return []
        out = ["Stability: a run further than 3 robust sd (1.4826 x the median absolute deviation) from its group's "
               "median counts as broken; the health columns come from the runs' diagnostics (gradient norm before "
               "clipping, steps above 4x the run's median norm; runs before diagnostics existed have none). Beside a "
               "far run of a PHD or repeat group: its Δ to vanilla at the same seed; an ordinary Δ means the seed is "
               "hard for vanilla too, not that the run broke.", ""]
        for n in sorted({len(g) for g in groups.values()}):
            out.append(f"- How to read it with {n} seeds: a healthy group ({n} runs of one normal distribution, "
                       f"nothing broken) has some run beyond 3 robust sd {100 * outlier_chance(n):.0f}% of the time, "
                       f"since the median absolute deviation of {n} values is itself noisy; "
                       f"{outlier_limit(n):.1f} robust sd is exceeded by chance in 1% of such groups (simulated, "
                       "`phd.study.stats`).")
        out += ["", "| variant | recipe | seeds | median | sd | robust sd | runs beyond 3 robust sd | largest grad "
                "norm |", "|---|---|---:|---:|---:|---:|---|---:|"]
        for (recipe, variant), group in groups.items():
            values = {r["seed"]: r["val_loss"] for r in group}
            far = outliers(values)
            base = {} if variant == "vanilla" else self.vanilla_losses(suite, group[0]["baseline"])
            beyond = ", ".join(f"seed {s} ({values[s]:.4f}, {d:.1f}"
                               + (f"; Δ {values[s] - base[s]:+.4f}" if s in base else "") + ")"
                               for s, d in sorted(far.items())) or "none"
            norms = [r["health"]["grad_norm_max"] for r in group if (r.get("health") or {}).get("grad_norm_max")]
            summary = summarize(list(values.values()))
            out.append(f"| {variant} | {recipe} | {len(group)} | {statistics.median(values.values()):.4f} | "
                       f"{summary.sd:.4f} | {robust_sd(list(values.values())):.4f} | {beyond} | "
                       f"{max(norms):.2f} |" if norms else
                       f"| {variant} | {recipe} | {len(group)} | {statistics.median(values.values()):.4f} | "
                       f"{summary.sd:.4f} | {robust_sd(list(values.values())):.4f} | {beyond} | |")
        return out + [""]

    @staticmethod
    def finding(variant: str, delta: Summary) -> str:
        direction = "lower" if delta.mean < 0 else "higher"
        size = f"{abs(delta.mean):.4f}"
        if delta.sd is None:
            return f"{variant}: {direction} than vanilla by {size} (one seed: no spread to judge it by)."
        judged = ("the interval excludes zero" if delta.excludes_zero
                  else "the interval includes zero: not distinguishable from vanilla with these seeds")
        return (f"{variant}: {direction} than vanilla by {size} ± {delta.sd:.4f} over {delta.n} seeds (95% CI "
                f"{delta.interval_text()}; lower than vanilla in {delta.wins} of {delta.n} seeds); {judged}.")

    def flops_table(self, suite: str, main: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
        phd = {k: g for k, g in self.by_variant(main).items() if k[1] != "vanilla"}
        out = ["### Equal training FLOPs: PHD against spending the same compute on vanilla", "",
               "Each vanilla row is matched to the PHD variant of the main table whose training FLOPs are closest. "
               "Δ = PHD's loss minus this row's, paired by seed (same batches in the same order; the same initial "
               "weights too where the architecture is the same): negative means PHD wins.", "",
               "| vanilla run | layers | params | tokens | train FLOPs | val loss | matched PHD variant | "
               "PHD − this | 95% CI | PHD wins | CI excludes 0 |",
               "|---|---:|---:|---:|---:|---:|---|---:|---|---:|---|"]
        findings = []
        for (recipe, _variant), group in self.by_variant(rows).items():
            g0 = group[0]
            if phd:
                key = min(phd, key=lambda k: (abs(phd[k][0]["flops"] - g0["flops"]), variant_order(k[1])))
                delta = summarize(paired(phd[key], group))
                match = f"{key[1]} ({_flops(phd[key][0]['flops'])})"
            else:
                key, delta, match = None, None, ""
            out.append(
                f"| {recipe} | {g0['config']['model']['n_layers']} | {g0['params']:,} | {g0['tokens']:,} | "
                f"{_flops(g0['flops'])} | {_mean_sd([r['val_loss'] for r in group])} | {match} | "
                f"{_delta_cells(delta)} |"
            )
            if delta is not None and key is not None:
                wins = "PHD wins" if delta.mean < 0 else "vanilla wins"
                spread = "" if delta.sd is None else (
                    f" (95% CI {delta.interval_text()}, PHD lower in {delta.wins} of {delta.n} seeds)"
                    + ("" if delta.excludes_zero else ": not distinguishable"))
                findings.append(f"{key[1]} vs {recipe} at about equal training FLOPs: {wins} by "
                                f"{abs(delta.mean):.4f}{spread}.")
        out.append("")
        if findings:
            out += ["In words:", ""] + [f"- {f}" for f in findings] + [""]
        return out

    def ablation_table(self, suite: str, main: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
        ks = {r["repeat_k"] for r in rows}
        seeds = {r["seed"] for r in rows}
        refs = [r for r in main if r["repeat_k"] in ks and r["seed"] in seeds and r["variant"] != "vanilla"]
        out = ["### Ablations (one seed each: read the differences against the seed spread of the tables above)", "",
               "| variant | recipe | positions | seed | val loss | Δ vs vanilla (same seed) |",
               "|---|---|---|---:|---:|---:|"]
        for r in sorted(rows + refs, key=lambda r: (variant_order(r["variant"]), r["recipe"], r["seed"])):
            base = self.vanilla_losses(suite, r["baseline"])
            delta = f"{r['val_loss'] - base[r['seed']]:+.4f}" if r["seed"] in base else ""
            out.append(f"| {r['variant']} | {r['recipe']} | {r['config']['model']['positions']} | {r['seed']} | "
                       f"{r['val_loss']:.4f} | {delta} |")
        return out + [""]

    # ----- tokens per parameter -----
    def tpp_points(self) -> list[TppPoint]:
        """Every non-vanilla group of the tpp suite's main runs (the learning-rate sweeps stay out: they are not
        the fixed seeds), by tokens per parameter, then variant."""
        points = []
        for (recipe, variant), group in self.by_variant(self.suite_rows(TPP_SUITE, "main")).items():
            if variant == "vanilla":
                continue
            g0 = group[0]
            points.append(TppPoint(variant, recipe, g0["repeat_k"], tokens_per_param(g0), g0["tokens"],
                                   self.paired_delta(TPP_SUITE, group),
                                   round(_warmup_share(g0), 2)))  # 10/49 steps: 20%
        return sorted(points, key=lambda p: (p.tpp, variant_order(p.variant), p.recipe))

    def tpp_section(self) -> list[str]:
        """The table, a sentence per variant and the plot of Δ against tokens per parameter; nothing until a
        variant of the suite has finished a run."""
        points = self.tpp_points()
        if not points:
            return []
        out = ["## Tokens per parameter", "",
               f"Suite `{TPP_SUITE}`: Δ = a variant's validation loss minus vanilla's at the same seed and the same "
               "budget (negative: the variant is lower), against training tokens per non-embedding parameter of "
               "the model. Seeds paired: seeds where both runs have finished; with fewer than 2 there is no "
               "interval.", "",
               "| tokens per non-embedding parameter | tokens | variant | K | recipe | seeds paired | mean Δ | sd | "
               "95% CI | wins |",
               "|---:|---:|---|---:|---|---:|---:|---:|---|---:|"]
        out += [self.tpp_row(p) for p in points]
        out += ["", "In words (where the 95% interval of Δ lies, by tokens per parameter):", ""]
        out += [f"- {line}" for line in self.tpp_findings(points)] + [""]
        return out + self.tpp_plot(points)

    @staticmethod
    def tpp_row(p: TppPoint) -> str:
        s = p.delta
        cells = (["0", "", "", "", ""] if s is None else
                 [str(s.n), f"{s.mean:+.4f}", fmt_sd(s.sd), s.interval_text(), f"{s.wins}/{s.n}"])
        head = [_tpp_text(p.tpp), f"{p.tokens:,}", p.variant, str(p.repeat_k), p.recipe]
        return "| " + " | ".join(head + cells) + " |"

    @staticmethod
    def tpp_findings(points: list[TppPoint]) -> list[str]:
        """One line per variant (and schedule, where there are several) grouping its budgets by the side of zero
        their interval lies on, so the answer to "does the gain appear, vanish or reverse with more tokens" can be
        read off without the plot."""
        lines = []
        for name, series in _tpp_groups(points).items():
            sides: dict[str, list[str]] = {}
            for p in series:
                sides.setdefault(_side_of_zero(p.delta), []).append(_tpp_text(p.tpp))
            parts = "; ".join(f"{side} at {', '.join(tpps)}" for side, tpps in sides.items())
            lines.append(f"{name}: {parts} tokens per parameter.")
        return lines

    def tpp_plot(self, points: list[TppPoint]) -> list[str]:
        """results/tpp.png: Δ with its 95% interval against tokens per parameter (log), one series per variant
        (one per K in the suite) and schedule, nudged sideways so their bars do not hide each other."""
        try:
            import matplotlib
        except ImportError:
            return []  # the suite's own section already says how to get the plots
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        series = {name: drawn for name, group in _tpp_groups(points).items()
                  if (drawn := [p for p in group if p.delta is not None])}
        if not series:
            return []
        fig, ax = plt.subplots(figsize=(7, 4.5))
        names = list(series)
        for i, name in enumerate(names):
            nudge = 1.04 ** (i - (len(names) - 1) / 2)
            _tpp_series(ax, series[name], nudge, f"K = {series[name][0].repeat_k} ({name})")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ticks = sorted({p.tpp for p in points})
        ax.set_xticks(ticks, [_tpp_text(t) for t in ticks])
        ax.set_xticks([], minor=True)
        fig = _finish(fig, ax, "training tokens per non-embedding parameter",
                      "val loss − vanilla's (same seed), 95% CI")
        path = self.figures / f"{TPP_SUITE}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, metadata={"Software": None})
        plt.close(fig)
        self.written.append(path)
        return [f"![tokens per parameter: paired Δ to vanilla against training tokens per non-embedding parameter "
                f"(mean and 95% t interval over seeds)]({self.prefix}/{path.name})", ""]

    def cost_table(self, costs: list[dict[str, Any]]) -> list[str]:
        c0 = costs[0]
        out = ["### Cost beside quality", "",
               f"`phd study {c0['suite']} --costs`: `phd bench inference` on the trained shape (prompt of "
               f"{c0['prefill_len']} tokens, decode at batch 1 after it), fp32, {c0['threads']} thread, process CPU "
               "time; ratios to vanilla. At this tiny size fixed per-call overheads weigh more than on a real "
               "model: docs/bench/inference.md has the 110M-parameter figures.", "",
               "| variant | KV cache bytes | prefill | decode, batch 1 |", "|---|---:|---:|---:|"]
        for c in sorted(costs, key=lambda c: variant_order(c["variant"])):
            out.append(f"| {c['variant']} | {c['cache_ratio']:.3f}x | {c['prefill_ratio']:.2f}x | "
                       f"{c['decode_ratio']:.2f}x |")
        return out + [""]

    def screen_section(self) -> list[str]:
        """The early-instability screens (experiments/screen.jsonl): per recipe, how many seeds spiked."""
        out = ["## Stability screens", "",
               "`phd study SUITE --screen N`: each run trained only to step N of its full schedule, its health logged "
               "every step (rows in `experiments/screen.jsonl`). A spike is a step whose gradient norm (before "
               "clipping) exceeds 4x the run's median after step 5. Loss: mean training loss of steps N-4..N; the "
               "first validation loss where the schedule evaluates before step N.", ""]
        groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = defaultdict(list)
        for r in self.screens:
            groups[(r["suite"], r["recipe"], r["variant"], r["screen_steps"])].append(r)
        for suite in dict.fromkeys(r["suite"] for r in self.screens):
            out += [f"### Screen `{suite}`", "",
                    "| recipe | variant | steps | seeds | seeds with a spike | spike steps (seed: steps) | median / "
                    "largest grad norm | largest attention logit | loss at the last steps | first val loss |",
                    "|---|---|---:|---:|---:|---|---|---:|---:|---:|"]
            for (s_, recipe, variant, steps), group in groups.items():
                if s_ != suite:
                    continue
                group = sorted(group, key=lambda r: r["seed"])
                spiky = [r for r in group if r["spike_steps"]]
                where = "; ".join(f"{r['seed']}: {', '.join(map(str, r['spike_steps']))}" for r in spiky) or "none"
                medians = statistics.median(r["grad_norm_median"] for r in group)
                vals = [r["first_val_loss"] for r in group if r.get("first_val_loss") is not None]
                out.append(f"| {recipe} | {variant} | {steps} | {len(group)} | {len(spiky)} | {where} | "
                           f"{medians:.2f} / {max(r['grad_norm_max'] for r in group):.2f} | "
                           f"{max(r['attn_logit_max'] for r in group):.1f} | "
                           f"{_mean_sd([r['train_loss_last5'] for r in group])} | {_mean_sd(vals)} |")
            out.append("")
            out += self.screen_plot(suite, {k[1]: g for k, g in groups.items() if k[0] == suite})
        return out

    def screen_plot(self, suite: str, groups: dict[str, list[dict[str, Any]]]) -> list[str]:
        try:
            import matplotlib
        except ImportError:
            return []
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = min(4, len(groups))
        rows_ = -(-len(groups) // cols)
        fig, axes = plt.subplots(rows_, cols, figsize=(3.2 * cols, 2.6 * rows_), sharey=True, squeeze=False)
        for ax, (recipe, group) in zip(axes.flat, groups.items(), strict=False):
            for r in sorted(group, key=lambda r: r["seed"]):
                ax.plot(range(1, len(r["grad_norm_curve"]) + 1), r["grad_norm_curve"], linewidth=0.8)
            ax.set_title(recipe, fontsize=8)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        for ax in axes.flat[len(groups):]:
            ax.axis("off")
        fig.supxlabel("step")
        fig.supylabel("gradient norm before clipping (one line per seed)")
        fig.tight_layout()
        path = self.figures / f"screen-{suite}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, metadata={"Software": None})
        plt.close(fig)
        self.written.append(path)
        return [f"![screen {suite}: gradient norms by step]({self.prefix}/{path.name})", ""]

    def all_runs(self) -> list[str]:
        out = ["## Every run", "", "| suite | recipe | variant | seed | tokens | val loss | train loss | tok/s | "
               "wall | commit |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in sorted(self.rows, key=lambda r: (self.suites.index(r["suite"]), r["recipe"],
                                                   variant_order(r["variant"]), r["seed"])):
            out.append(f"| {r['suite']} | {r['recipe']} | {r['variant']} | {r['seed']} | {r['tokens']:,} | "
                       f"{r['val_loss']:.4f} | {r['train_loss']:.4f} | {r['tok_per_s'] or 0:,.0f} | "
                       f"{(r['wall_s'] or 0) / 60:.1f} min | {r['commit']} |")
        return out + [""]

    # ----- plots -----
    def plots(self, suite: str, sweep: list, main: list, flops: list) -> list[str]:
        try:
            import matplotlib
        except ImportError:
            return ["(plots need matplotlib: `pip install -e .[plot]`, then `phd study report` again)", ""]
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.rcParams.update({"svg.hashsalt": "phd", "font.size": 9})
        out = []
        figures = []
        if main or sweep:
            figures.append(("curves", "validation loss against training tokens (mean over seeds)",
                            self.plot_curves(plt, main + sweep)))
        if any(r["variant"] != "vanilla" for r in main + sweep):
            figures.append(("delta", "paired difference to vanilla against training tokens (mean ± sd over seeds)",
                            self.plot_delta(plt, suite, main + sweep)))
        if any(r["variant"] != "vanilla" for r in main):
            figures.append(("vs-k", "final validation loss against K (mean ± sd over seeds)",
                            self.plot_vs_k(plt, main)))
            figures.append(("forest", "paired Δ to vanilla at the end of training, mean and 95% t interval over "
                            "seeds, every setting with 2+ paired seeds", self.plot_forest(plt, suite, main)))
        if main or flops:
            figures.append(("vs-flops", "validation loss against training FLOPs (mean over seeds)",
                            self.plot_vs_flops(plt, main + flops)))
        for name, caption, fig in figures:
            if fig is None:
                continue
            path = self.figures / f"{suite}-{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=110, metadata={"Software": None})
            plt.close(fig)
            self.written.append(path)
            out += [f"![{suite}: {caption}]({self.prefix}/{path.name})", ""]
        return out

    def _label(self, recipe: str, variant: str, rows: list[dict[str, Any]]) -> str:
        recipes = {r["recipe"] for r in rows if r["variant"] == variant}
        return f"{variant} ({recipe})" if len(recipes) > 1 or variant == "vanilla" and len(
            {r["recipe"] for r in rows}) > 1 else variant

    def plot_curves(self, plt, rows):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (recipe, variant), group in self.by_variant(rows).items():
            curve = mean_curve(group)
            ax.plot([t for t, _, _ in curve], [m for _, m, _ in curve], marker=".",
                    label=self._label(recipe, variant, rows))
        return _finish(fig, ax, "training tokens", "validation loss")

    def plot_delta(self, plt, suite, rows):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = False
        for (recipe, variant), group in self.by_variant(rows).items():
            if variant == "vanilla":
                continue
            curve = paired_curve(group, self.vanilla_of(suite, group[0]["baseline"]))
            if not curve:
                continue
            xs = [t for t, _ in curve]
            means = [s.mean for _, s in curve]
            sds = [s.sd or 0.0 for _, s in curve]
            line = ax.plot(xs, means, marker=".", label=self._label(recipe, variant, rows))[0]
            lows = [m - s for m, s in zip(means, sds, strict=True)]
            highs = [m + s for m, s in zip(means, sds, strict=True)]
            ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.15)
            drawn = True
        if not drawn:
            plt.close(fig)
            return None
        ax.axhline(0, color="black", linewidth=0.8)
        return _finish(fig, ax, "training tokens", "val loss − vanilla's (same seed)")

    def plot_forest(self, plt, suite, rows):
        """The table's answer at a glance: one bar per setting (variant, recipe) with 2+ paired seeds, grouped by
        budget and corpus, so every interval is read against zero and against its neighbours."""
        bars = []
        for (recipe, variant), group in self.by_variant(rows).items():
            if variant == "vanilla":
                continue
            delta = self.paired_delta(suite, group)
            if delta is None or delta.ci95 is None:
                continue
            g0, c = group[0], group[0]["config"]
            key = (g0["tokens"], corpus(g0), variant_order(variant), recipe)
            schedule = f"lr {_g(c['lr'])}, warmup {100 * _warmup_share(g0):.0f}%"
            bars.append((key, f"{variant} · {recipe} ({corpus(g0)}, {g0['tokens'] / 1e6:.2g}M tokens, {schedule}, "
                              f"{delta.wins}/{delta.n} lower)", delta))
        if not bars:
            return None
        bars.sort(key=lambda b: b[0])
        fig, ax = plt.subplots(figsize=(11, 1.0 + 0.3 * len(bars)), layout="constrained")  # fits the long labels
        budgets = sorted({key[0] for key, _, _ in bars})
        colors = {t: f"C{i % 10}" for i, t in enumerate(budgets)}
        for y, (key, _, delta) in enumerate(bars):
            low, high = delta.ci95
            ax.errorbar([delta.mean], [y], xerr=[[delta.mean - low], [high - delta.mean]], fmt="o",
                        color=colors[key[0]], capsize=3)
        ax.set_yticks(range(len(bars)), [label for _, label, _ in bars], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel("val loss − vanilla's (same seed): below zero, the variant is better")
        ax.grid(alpha=0.3, axis="x")
        return fig

    def plot_vs_k(self, plt, rows):
        fig, ax = plt.subplots(figsize=(6, 4))
        vanilla = [r["val_loss"] for r in rows if r["variant"] == "vanilla"]
        by_family: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r["variant"] != "vanilla":
                by_family[f"{family(r['variant'])}{self._wc(r)}"][r["repeat_k"]].append(r["val_loss"])
        for name in sorted(by_family):
            points = sorted(by_family[name].items())
            if vanilla:
                points = [(1, vanilla)] + points
            xs = [k for k, _ in points]
            ms = [summarize(v).mean for _, v in points]
            sds = [summarize(v).sd or 0.0 for _, v in points]
            ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=3, label=name)
        return _finish(fig, ax, "K (copies of every token)", "final validation loss")

    @staticmethod
    def _wc(r: dict[str, Any]) -> str:
        m = r["config"]["model"]
        if m.get("window") is None:
            return ""
        return f"-W{m['window']}" + (f"-C{m['chunk']}" if m.get("chunk") else "")

    def plot_vs_flops(self, plt, rows):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (recipe, variant), group in self.by_variant(rows).items():
            curve = mean_curve(group)
            per_token = group[0]["flops_per_token"]
            style = "--" if group[0].get("role") == "equal-flops" else "-"
            ax.plot([t * per_token for t, _, _ in curve], [m for _, m, _ in curve], style, marker=".",
                    label=f"{variant} ({recipe})" if group[0].get("role") == "equal-flops" else variant)
        ax.set_xscale("log")
        return _finish(fig, ax, "training FLOPs", "validation loss", which="both")


def _tpp_groups(points: list[TppPoint]) -> dict[str, list[TppPoint]]:
    """The tokens-per-parameter series by name, in reading order (variant, then shortest warmup first), each by
    budget; the name carries the warmup only where the suite has runs at more than one schedule."""
    several = len({p.warmup for p in points}) > 1
    groups: dict[str, list[TppPoint]] = {}
    for p in sorted(points, key=lambda p: (variant_order(p.variant), p.warmup, p.tpp)):
        groups.setdefault(f"{p.variant}, {100 * p.warmup:.0f}% warmup" if several else p.variant, []).append(p)
    return groups


def _tpp_series(ax, points: list[TppPoint], nudge: float, label: str) -> None:
    """A line through the means, and error bars only where there is an interval (a single paired seed is drawn
    as a bare point rather than with a bar of zero length that would read as certainty)."""
    xs = [p.tpp * nudge for p in points]
    line = ax.plot(xs, [p.delta.mean for p in points], marker="o", label=label)[0]
    bars = [(x, p.delta.mean, p.delta.ci95) for x, p in zip(xs, points, strict=True) if p.delta.ci95]
    if bars:
        ax.errorbar([x for x, _, _ in bars], [m for _, m, _ in bars],
                    yerr=[[m - ci[0] for _, m, ci in bars], [ci[1] - m for _, m, ci in bars]],
                    fmt="none", ecolor=line.get_color(), capsize=3)


def _finish(fig, ax, xlabel: str, ylabel: str, which: str = "major"):
    """Labels, grid and legend, the same on every figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which=which)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_report(results: Path, out: Path) -> list[Path]:
    """Write OUT/RESULTS.md and OUT/results/*.png from the results file; return the paths written."""
    rows = read_results(results)
    screens = read_results(results.with_name("screen.jsonl"))
    report = Report(rows, out / "results", "results", screens)
    text = report.markdown()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "RESULTS.md"
    path.write_text(text)
    return [path, *report.written]
