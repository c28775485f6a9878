"""The study report's order of variants (kept apart from tests/test_study.py, which trains runs)."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from phd.config import PHDConfig
from phd.study.report import (
    Report,
    _tpp_series,
    non_embedding_params,
    tokens_per_param,
    variant_order,
    write_report,
)

# The report's order: vanilla, PHD, PHD-SWA, PHD-CSWA, repeat; in each family by K, then W, then C, as numbers.
ORDERED = [
    "vanilla",
    "PHD-2", "PHD-3", "PHD-10",
    "PHD-SWA-2-2-inf", "PHD-SWA-2-3-inf", "PHD-SWA-2-16-inf", "PHD-SWA-3-2-inf", "PHD-SWA-12-2-inf",
    "PHD-CSWA-2-4-8", "PHD-CSWA-2-16-8", "PHD-CSWA-2-16-32", "PHD-CSWA-3-2-4", "PHD-CSWA-3-16-32",
    "repeat-2", "repeat-3", "repeat-10",
]


def test_variants_sort_by_family_then_numbers_not_strings():
    """As strings "16" < "2" and "PHD-10" < "PHD-2": the report would list PHD-SWA-2-16-inf before PHD-SWA-2-2-inf.
    Every shuffle of the names sorts back to the numeric order."""
    assert sorted(ORDERED) != ORDERED  # the list is one string order gets wrong
    rng = random.Random(0)
    for _ in range(20):
        names = ORDERED[:]
        rng.shuffle(names)
        assert sorted(names, key=variant_order) == ORDERED
    assert variant_order("PHD-SWA-2-2-inf") < variant_order("PHD-SWA-2-16-inf")
    assert variant_order("PHD-CSWA-3-2-4") < variant_order("PHD-CSWA-3-16-32") < variant_order("repeat-2")


# ----- tokens per parameter (issue 20, item 4) -----

TINY_NE = 197_184  # cpu-tiny's parameters outside the embedding: tokens = tokens per parameter x this


def tpp_row(recipe: str, variant: str, seed: int, loss: float, tpp: int, suite: str = "tpp",
            role: str = "main", warmup_steps: int = 2) -> dict:
    """A results row as collect() writes it, for a cpu-tiny run of `tpp` tokens per non-embedding parameter (only
    the fields the report reads; the numbers that are not under test are placeholders)."""
    model = PHDConfig.build(preset="cpu-tiny", variant=variant)
    tokens = tpp * TINY_NE
    return {
        "kind": "run", "suite": suite, "recipe": recipe, "variant": variant, "seed": seed, "baseline": recipe,
        "role": role, "description": "", "corpus": "project", "repeat_k": model.repeat_k,
        "params": model.num_params(), "non_embedding_params": model.num_params(embeddings=False),
        "tokens": tokens, "steps": 10, "seq_len": 256, "flops": 1e12 * tpp * model.repeat_k,
        "flops_per_token": 1e6 * model.repeat_k, "val_loss": loss, "train_loss": loss - 0.1,
        "health": {"grad_norm_max": 1.0}, "val_curve": [[tokens // 2, round(loss + 0.5, 5)], [tokens, loss]],
        "train_curve": [[tokens, loss - 0.1]], "tok_per_s": 1000.0, "train_s": 1.0, "wall_s": 60.0,
        "segments": 1, "commit": "abc", "commits": ["abc"], "threads": 1, "machine": "x",
        "config": {"seed": seed, "seq_len": 256, "batch_size": 16, "lr": 0.006, "min_lr": 0.0006,
                   "warmup_steps": warmup_steps,
                   "out": f"runs/{seed}",
                   "data": "data/default", "model": model.to_dict()},
    }


# Δ of PHD-CSWA-3 at 1 token per parameter, seeds 20-24: mean -0.1, one seed (22) the other way round for K = 2.
DELTA_K3 = [-0.10, -0.12, -0.08, -0.11, -0.09]
DELTA_K2 = [-0.05, -0.02, 0.03, -0.04, -0.02]
SEEDS = [20, 21, 22, 23, 24]


def tpp_rows() -> list[dict]:
    """tpp-1 complete (5 seeds); tpp-30 partial: one vanilla seed, so K = 3 pairs one seed and K = 2 (seed 21
    only) none; plus a learning-rate sweep at 10 tokens per parameter that must stay out of the section."""
    rows = [tpp_row("tpp-1", "vanilla", s, 5.0 + 0.01 * s, 1) for s in SEEDS]
    rows += [tpp_row("tpp-1", "PHD-CSWA-3-16-32", s, 5.0 + 0.01 * s + d, 1)
             for s, d in zip(SEEDS, DELTA_K3, strict=True)]
    rows += [tpp_row("tpp-1", "PHD-CSWA-2-16-32", s, 5.0 + 0.01 * s + d, 1)
             for s, d in zip(SEEDS, DELTA_K2, strict=True)]
    rows += [tpp_row("tpp-30", "vanilla", 20, 4.0, 30), tpp_row("tpp-30", "PHD-CSWA-3-16-32", 20, 4.05, 30),
             tpp_row("tpp-30", "PHD-CSWA-2-16-32", 21, 3.9, 30)]
    rows += [tpp_row("lr-check-10", v, 100, 4.5, 10, role="sweep") for v in ("vanilla", "PHD-CSWA-3-16-32")]
    return rows


def table_line(text: str, tpp: str, variant: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith(f"| {tpp} | ") and f"| {variant} |" in ln]
    assert len(lines) == 1, lines
    return lines[0]


def test_tpp_section_table_numbers_partial_data_and_plot(tmp_path):
    """The section pairs each variant with vanilla by seed at each budget: mean, sd, 95% t interval and wins for a
    known case (checked against the formula, not against stats.py); a budget with one paired seed shows without
    an interval, one with none shows as 0 paired; the sweep stays out; the plot is written and linked."""
    results = tmp_path / "results.jsonl"
    other = [dict(r, suite="other") for r in tpp_rows()]  # another suite before it: the section follows tpp's only
    results.write_text("".join(json.dumps(r) + "\n" for r in other + tpp_rows()))
    written = write_report(results, tmp_path / "docs")
    text = written[0].read_text()
    assert text.count("## Tokens per parameter") == 1
    assert text.index("## Suite `tpp`") < text.index("## Tokens per parameter") < text.index("## Every run")
    section = text[text.index("## Tokens per parameter"):text.index("## Every run")]

    sd = statistics.stdev(DELTA_K3)
    half = 2.776 * sd / math.sqrt(5)  # t(0.975, df 4)
    assert table_line(section, "1", "PHD-CSWA-3-16-32") == (
        f"| 1 | 197,184 | PHD-CSWA-3-16-32 | 3 | tpp-1 | 5 | -0.1000 | {sd:.4f} | "
        f"[{-0.1 - half:+.3f}, {-0.1 + half:+.3f}] | 5/5 |")
    assert "| 5 | -0.1000 | 0.0158 | [-0.120, -0.080] | 5/5 |" in section  # the same numbers, by hand
    k2 = table_line(section, "1", "PHD-CSWA-2-16-32")
    assert f"| 5 | {statistics.fmean(DELTA_K2):+.4f} | {statistics.stdev(DELTA_K2):.4f} |" in k2
    assert k2.endswith("| 4/5 |")
    assert table_line(section, "30", "PHD-CSWA-3-16-32") == (
        "| 30 | 5,915,520 | PHD-CSWA-3-16-32 | 3 | tpp-30 | 1 | +0.0500 |  |  | 0/1 |")
    assert table_line(section, "30", "PHD-CSWA-2-16-32").endswith("| tpp-30 | 0 |  |  |  |  |")
    assert "| 10 |" not in section and "lr-check" not in section
    assert "- PHD-CSWA-3-16-32: below zero at 1; one paired seed at 30 tokens per parameter." in section
    assert "- PHD-CSWA-2-16-32: includes zero at 1; no paired seed at 30 tokens per parameter." in section

    plot = tmp_path / "docs" / "results" / "tpp.png"
    assert plot in written and plot.read_bytes()[:4] == b"\x89PNG"
    assert "](results/tpp.png)" in section
    again = write_report(results, tmp_path / "docs")  # deterministic, as the rest of the report
    assert again == written and plot.read_bytes() == (tmp_path / "docs" / "results" / "tpp.png").read_bytes()


def test_tpp_section_keeps_two_schedules_of_one_budget_apart(tmp_path):
    """A budget measured at two warmups is two points of two series (findings and plot legend name the warmup),
    not one series through both; with one schedule the names stay bare (the test above)."""
    rows = tpp_rows() + [tpp_row("tpp-1-warmup50", "vanilla", s, 5.0, 1, warmup_steps=5) for s in SEEDS]
    rows += [tpp_row("tpp-1-warmup50", "PHD-CSWA-3-16-32", s, 5.0 + 0.01 * s, 1, warmup_steps=5) for s in SEEDS]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = write_report(results, tmp_path / "docs")[0].read_text().split("## Tokens per parameter")[1]
    assert "- PHD-CSWA-3-16-32, 20% warmup: below zero at 1; one paired seed at 30 tokens per parameter." in section
    assert "- PHD-CSWA-3-16-32, 50% warmup: above zero at 1 tokens per parameter." in section
    assert "| 1 | 197,184 | PHD-CSWA-3-16-32 | 3 | tpp-1-warmup50 | 5 | +0.2200 |" in section


def test_tpp_section_only_for_its_suite_and_from_the_rows_alone(tmp_path):
    """The same runs under another suite name leave the report as it was (no section, no plot); a row without
    the recorded count is placed by the count computed from its model config."""
    rows = [dict(r, suite="other") for r in tpp_rows()]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = write_report(results, tmp_path / "docs")
    assert "Tokens per parameter" not in written[0].read_text()
    assert not (tmp_path / "docs" / "results" / "tpp.png").exists()

    row = tpp_row("tpp-3", "PHD-CSWA-2-16-32", 20, 4.0, 3)
    del row["non_embedding_params"]
    assert non_embedding_params(row) == TINY_NE and tokens_per_param(row) == 3
    assert Report([], tmp_path, "results").tpp_section() == []


def test_tpp_plot_draws_the_95_interval_as_error_bars():
    """The bars span the 95% t interval of the table (not ± sd, as the other delta plots draw), and a point with
    a single paired seed gets no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in Report(tpp_rows(), None, "results").tpp_points() if p.variant == "PHD-CSWA-3-16-32"]
    assert [p.delta.n for p in points] == [5, 1]
    fig, ax = plt.subplots()
    _tpp_series(ax, points, 1.0, "K = 3")
    (bars,) = ax.containers
    segments = bars.lines[2][0].get_segments()
    plt.close(fig)
    assert len(segments) == 1  # tpp 30 (one seed): no bar
    (x, lo), (_, hi) = segments[0]
    assert x == 1 and (lo, hi) == pytest.approx(points[0].delta.ci95)
    assert (lo, hi) == pytest.approx((-0.1 - 2.776 * statistics.stdev(DELTA_K3) / math.sqrt(5),
                                      -0.1 + 2.776 * statistics.stdev(DELTA_K3) / math.sqrt(5)))


def test_forest_plot_draws_one_95_interval_per_setting_with_two_paired_seeds():
    """One bar per (variant, recipe) with 2+ paired seeds, spanning the table's 95% t interval, labelled with the
    win count; settings with one or no paired seed (tpp-30 here) and vanilla get none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = tpp_rows()
    report = Report(rows, None, "results")
    fig = report.plot_forest(plt, "tpp", [r for r in rows if r.get("role", "main") == "main"])
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    spans = sorted(x for bars in ax.containers for seg in bars.lines[2][0].get_segments() for x in seg[:, 0])
    plt.close(fig)
    assert len(labels) == 2 and all("tpp-1" in label for label in labels)
    assert any("PHD-CSWA-3-16-32" in label and "lr 0.006, warmup 20%, 5/5 lower" in label for label in labels)
    half3 = 2.776 * statistics.stdev(DELTA_K3) / math.sqrt(5)
    half2 = 2.776 * statistics.stdev(DELTA_K2) / math.sqrt(5)
    mean2 = statistics.fmean(DELTA_K2)
    assert spans == pytest.approx(sorted([-0.1 - half3, -0.1 + half3, mean2 - half2, mean2 + half2]))


def test_schedule_table_pairs_only_groups_that_differ_in_the_learning_rate_schedule():
    """Vanilla at warmup 5 and at warmup 2 (same model, corpus, tokens) pair by seed, later group first; a group
    with another model (QK-norm) or another budget is not a schedule change and pairs with nothing; PHD at one
    schedule only has no row."""
    def at(recipe: str, variant: str, seed: int, loss: float, warmup: int, lr: float = 0.006, tpp: int = 1,
           qk_norm: bool = False) -> dict:
        row = tpp_row(recipe, variant, seed, loss, tpp, suite="evidence")
        row["config"] |= {"lr": lr, "min_lr": lr / 10, "warmup_steps": warmup}
        row["config"]["model"]["qk_norm"] = qk_norm
        return row

    gains = [-0.10, -0.20, -0.15]
    rows = [at("short", "vanilla", s, 5.0 + 0.01 * s, 2) for s in SEEDS[:3]]
    rows += [at("short", "PHD-3", s, 4.9 + 0.01 * s, 2) for s in SEEDS[:3]]
    rows += [at("long", "vanilla", s, 5.0 + 0.01 * s + g, 5, lr=0.003) for s, g in zip(SEEDS[:3], gains, strict=True)]
    rows += [at("qk", "vanilla", s, 4.0, 5, qk_norm=True) for s in SEEDS[:3]]
    rows += [at("more", "vanilla", s, 4.0, 5, tpp=3) for s in SEEDS[:3]]
    table = Report(rows, None, "results").schedule_table(rows)
    body = [line for line in table if line.startswith("| ") and not line.startswith("| variant")]
    assert len(body) == 1
    cells = [c.strip() for c in body[0].strip("|").split("|")]
    assert cells[0] == "vanilla" and cells[3].startswith("long (lr 0.003, warmup 5/10 steps)")
    assert cells[4].startswith("short (lr 0.006, warmup 2/10 steps)")
    assert cells[5].startswith(f"{statistics.fmean(gains):+.4f}") and cells[7] == "3/3"
    assert Report(rows[:6], None, "results").schedule_table(rows[:6]) == []


def test_stability_table_gives_a_far_runs_delta_to_vanilla_at_its_seed():
    """A seed hard for every variant is flagged in each group but has an ordinary Δ; a run that broke alone has a
    large one. Vanilla's own far runs have no Δ."""
    losses = {20: 5.00, 21: 5.01, 22: 5.02, 23: 5.03, 24: 5.30}  # seed 24: hard for everyone
    rows = [tpp_row("r", "vanilla", s, x, 1, suite="evidence") for s, x in losses.items()]
    rows += [tpp_row("r", "PHD-CSWA-3-16-32", s, x - 0.01, 1, suite="evidence") for s, x in losses.items()]
    rows += [tpp_row("r", "PHD-3", s, 5.0 + 0.01 * (s - 20) + (0.5 if s == 22 else 0), 1, suite="evidence")
             for s in losses]
    table = Report(rows, None, "results").stability_table("evidence", rows)
    lines = {line.split("|")[1].strip(): line for line in table
             if line.startswith("| ") and not line.startswith("| variant")}
    assert "seed 24 (5.3000" in lines["vanilla"] and "Δ" not in lines["vanilla"]
    assert "seed 24 (5.2900" in lines["PHD-CSWA-3-16-32"] and "Δ -0.0100)" in lines["PHD-CSWA-3-16-32"]
    assert "seed 22 (5.5200" in lines["PHD-3"] and "Δ +0.5000)" in lines["PHD-3"]
