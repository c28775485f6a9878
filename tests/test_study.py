"""`phd study`: suites, resume after a kill, one results row per run, status, the report, the FLOPs formula."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_utils import VOCAB, make_data, one_thread  # noqa: F401

from phd.commands import main
from phd.config import PHDConfig
from phd.masks import AttentionLayout
from phd.study import flops
from phd.study.recipes import StudyError, load_suite
from phd.study.report import write_report
from phd.study.runner import append_result, read_results, run_dir, run_lock, run_suite
from phd.study.stats import paired, summarize
from phd.study.status import status_text

TINY = {"vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64}
KEYS = ("suite", "recipe", "variant", "seed", "params", "tokens", "flops", "val_loss", "train_loss", "tok_per_s",
        "wall_s", "commit", "config")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def write_suite(folder: Path, data: Path, name: str = "tiny") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    suite = {
        "description": "tiny",
        "defaults": {"preset": None, "model": TINY, "data": str(data), "seq_len": 32, "batch_size": 4,
                     "tokens": 1024, "lr": 0.01, "evals": 2, "eval_sequences": 8, "checkpoint_every": 2},
        "recipes": {
            "sweep": {"role": "sweep", "lr": 0.003, "variants": ["vanilla"], "seeds": [0]},
            "core": {"variants": ["vanilla", "PHD-CSWA-2-4-8"], "seeds": [0, 1]},
            "more-tokens": {"role": "equal-flops", "tokens": 2048, "variants": ["vanilla"], "seeds": [0, 1],
                            "baseline": "core"},
            "ablation": {"role": "ablation", "variants": ["PHD-SWA-2-2-inf"], "seeds": [0], "baseline": "core"},
        },
    }
    (folder / f"{name}.json").write_text(json.dumps(suite))
    return folder


def test_suite_kill_resume_rows_status_and_report(data, tmp_path):
    experiments = write_suite(tmp_path / "experiments", data)
    results, runs = experiments / "results.jsonl", tmp_path / "runs"
    suite = load_suite(experiments, "tiny")
    assert [r.name for r in suite.runs][:3] == ["sweep/vanilla/seed0", "core/vanilla/seed0",
                                                "core/PHD-CSWA-2-4-8/seed0"]
    logs: list[str] = []
    # a kill after step 3 of every run: checkpoints at 2, no row yet
    run_suite(suite, results, runs, progress=False, log=logs.append, stop_after_steps=3, commit="test")
    assert read_results(results) == []
    assert "interrupted (step 3/8)" in status_text(suite, results, runs)
    counts = run_suite(suite, results, runs, progress=False, log=logs.append, commit="test")
    assert counts["trained"] == len(suite.runs)
    rows = read_results(results)
    assert len(rows) == len(suite.runs)
    assert sum("resuming at step_00000002" in line for line in logs) == len(suite.runs)
    for row in rows:
        assert all(row.get(k) is not None for k in KEYS), row
        assert row["tokens"] == (2048 if row["recipe"] == "more-tokens" else 1024)
    # the resumed run equals an uninterrupted one: same init and batches make the first pair bit-identical
    fresh = tmp_path / "fresh"
    again = run_suite(load_suite(experiments, "tiny"), fresh / "results.jsonl", fresh / "runs", progress=False,
                      log=lambda _: None, commit="test")
    assert again["trained"] == len(suite.runs)
    fresh_rows = {(r["recipe"], r["variant"], r["seed"]): r["val_loss"] for r in read_results(fresh / "results.jsonl")}
    assert fresh_rows == {(r["recipe"], r["variant"], r["seed"]): r["val_loss"] for r in rows}
    # a finished run is never redone
    counts = run_suite(suite, results, runs, progress=False, log=logs.append, commit="test")
    assert counts == {"done": len(suite.runs), "trained": 0, "locked": 0}
    assert len(read_results(results)) == len(suite.runs)
    assert f"{len(suite.runs)} of {len(suite.runs)} runs done" in status_text(suite, results, runs)
    # the report is a function of the results file: the same bytes twice
    written = write_report(results, tmp_path / "docs")
    first = {p: p.read_bytes() for p in written}
    assert write_report(results, tmp_path / "docs") == written
    assert {p: p.read_bytes() for p in written} == first
    text = (tmp_path / "docs" / "RESULTS.md").read_text()
    for needle in ("PHD-CSWA-2-4-8", "paired Δ vs vanilla", "Equal training FLOPs", "Ablations", "### Tuning",
                   "Every run"):
        assert needle in text
    assert any(p.suffix == ".png" for p in written)
    assert text.count("| tiny |") == len(suite.runs)  # every run listed


def test_same_seed_means_same_initial_weights_and_batches(data, tmp_path):
    experiments = write_suite(tmp_path / "experiments", data)
    suite = load_suite(experiments, "tiny")
    vanilla, phd = suite.run("core", "vanilla", 0), suite.run("core", "PHD-CSWA-2-4-8", 0)
    from phd.train.trainer import Trainer

    a = Trainer(vanilla.train_config(str(data), str(tmp_path / "a"), progress=False))
    b = Trainer(phd.train_config(str(data), str(tmp_path / "b"), progress=False))
    for (name, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    for _ in range(3):
        assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a.loader.next_step(), b.loader.next_step(), strict=True))
    other = Trainer(suite.run("core", "vanilla", 1).train_config(str(data), str(tmp_path / "c"), progress=False))
    assert not torch.equal(other.model.embed.weight, a.model.embed.weight)


def test_locked_run_is_skipped_and_torn_results_line_tolerated(data, tmp_path):
    experiments = write_suite(tmp_path / "experiments", data)
    suite = load_suite(experiments, "tiny")
    results, runs = experiments / "results.jsonl", tmp_path / "runs"
    results.write_text('{"suite": "tiny", "recipe": "x"')  # a kill mid-append
    assert read_results(results) == []
    append_result(results, {"suite": "other", "recipe": "r", "variant": "vanilla", "seed": 0})
    assert read_results(results) == [{"suite": "other", "recipe": "r", "variant": "vanilla", "seed": 0}]
    first = suite.runs[0]
    import subprocess
    import sys

    # another process holds the first run's lock
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from phd.study.runner import run_lock\n"
        f"with run_lock(Path({str(run_dir(runs, first))!r})) as mine:\n"
        "    print(mine, flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        with run_lock(run_dir(runs, first)) as mine:
            assert not mine
        logs: list[str] = []
        one = type(suite)(suite.name, suite.path, suite.description, [first], suite.recipes)
        counts = run_suite(one, results, runs, progress=False, log=logs.append, commit="test")
        assert counts["locked"] == 1 and "another process" in logs[0]
    finally:
        holder.kill()
        holder.wait()


def test_bad_suites_name_the_problem(data, tmp_path):
    experiments = write_suite(tmp_path / "e", data)
    with pytest.raises(StudyError, match="no suite 'nope'.*tiny"):
        load_suite(experiments, "nope")
    suite = json.loads((experiments / "tiny.json").read_text())
    suite["recipes"]["core"]["variants"] = ["PHD-CSWA-2-x"]
    (experiments / "bad.json").write_text(json.dumps(suite))
    with pytest.raises(StudyError, match="bad.json: recipe 'core', variant 'PHD-CSWA-2-x'"):
        load_suite(experiments, "bad")
    suite["recipes"]["core"] = {"variants": ["vanilla"], "seeds": [0], "lr_typo": 1}
    (experiments / "bad.json").write_text(json.dumps(suite))
    with pytest.raises(StudyError, match="unknown keys \\['lr_typo'\\]"):
        load_suite(experiments, "bad")
    assert main(["study", "nope", "--experiments", str(experiments)]) == 2


@pytest.mark.parametrize("variant", ["vanilla", "repeat-3", "PHD-3", "PHD-SWA-3-2-inf", "PHD-CSWA-3-3-4",
                                     "PHD-CSWA-4-16-32", "PHD-SWA-2-1-inf"])
@pytest.mark.parametrize("seq_len", [1, 7, 40])
def test_attention_pairs_count_the_reference_mask(variant, seq_len):
    cfg = PHDConfig.from_name(variant, preset="cpu-1m")
    layout = AttentionLayout(seq_len, cfg.repeat_k, cfg.window, cfg.chunk, cfg.naive)
    assert flops.attention_pairs(cfg, seq_len) == int(layout.dense_mask().sum())


def test_training_flops_formula_by_hand():
    cfg = PHDConfig.from_name("PHD-2", vocab_size=10, d_model=4, n_layers=3, n_heads=2, n_kv_heads=1, d_ff=6)
    # per layer: q 4x4, o 4x4, k and v 4x2 each, SwiGLU 3 x 4x6 = 16 + 16 + 8 + 8 + 72 = 120 weights
    assert flops.layer_matmul_params(cfg) == 120
    # T = 3, K = 2: pairs = 2 copies x (0+1+2) earlier originals + 3 positions x (1+2) own group = 6 + 9 = 15
    assert flops.attention_pairs(cfg, 3) == 15
    per_sequence = 6 * 3 * (2 * 3 * 120 + 4 * 10) + 12 * 3 * 2 * 2 * 15
    assert flops.flops_per_sequence(cfg, 3) == per_sequence
    assert flops.training_flops(cfg, 3, 30) == 10 * per_sequence
    vanilla = cfg.with_variant("vanilla")
    assert flops.flops_per_sequence(vanilla, 3) == 6 * 3 * (3 * 120 + 40) + 12 * 3 * 2 * 2 * 6


def test_paired_statistics():
    base = [{"seed": 0, "val_loss": 5.0}, {"seed": 1, "val_loss": 5.2}, {"seed": 2, "val_loss": 4.9}]
    rows = [{"seed": 2, "val_loss": 4.8}, {"seed": 0, "val_loss": 4.9}, {"seed": 1, "val_loss": 5.1}, ]
    diffs = paired(rows, base)
    assert diffs == pytest.approx([-0.1, -0.1, -0.1])
    s = summarize(diffs)
    assert s.n == 3 and s.mean == pytest.approx(-0.1) and s.sd == pytest.approx(0, abs=1e-12)
    assert s.outside_2sd
    s = summarize([-0.1, 0.1, -0.05])
    assert not s.outside_2sd
    assert summarize([0.3]).outside_2sd is None


def test_how_often_a_healthy_group_has_a_run_beyond_3_robust_sd():
    """The stability test's false alarms: 8 runs of one normal distribution have some run beyond 3 robust sd about
    1 time in 5 (the median absolute deviation of 8 values is noisy; the sample sd would almost never flag), and 1%
    of such groups have one beyond about 8. Fewer than 4 runs are not judged."""
    from phd.study.stats import outlier_chance, outlier_limit

    assert 0.18 < outlier_chance(8) < 0.23
    assert 6.5 < outlier_limit(8) < 9.5
    assert outlier_chance(8, outlier_limit(8)) == pytest.approx(0.01, abs=0.002)
    assert outlier_chance(3) == 0.0 and outlier_limit(3) == float("inf")


def test_intervals_wins_and_robust_outliers():
    """The 95% t interval of the mean, the interval for one more seed, win counts and the MAD outlier rule, checked
    against values computed by hand (t with 7 degrees of freedom: 2.365)."""
    diffs = [0.1, -0.2, 0.05, 0.0, -0.1, 0.03, 0.02, -0.05]
    s = summarize(diffs)
    import statistics

    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    assert s.sd == pytest.approx(sd) and s.sd != pytest.approx(sd / len(diffs) ** 0.5)  # sd, not standard error
    assert s.ci95 == pytest.approx((mean - 2.365 * sd / 8 ** 0.5, mean + 2.365 * sd / 8 ** 0.5))
    half = 2.365 * sd * (1 + 1 / 8) ** 0.5
    assert s.predict95 == pytest.approx((mean - half, mean + half))
    assert s.wins == 3 and s.excludes_zero is False
    assert summarize([-0.1, -0.12, -0.09, -0.11]).excludes_zero is True
    assert summarize([0.3]).ci95 is None and summarize([0.3]).predict95 is None
    from phd.study.stats import outliers, robust_sd, t95

    assert t95(1) == 12.706 and t95(35) == 2.042 and t95(500) == 1.96
    losses = {0: 5.40, 1: 5.41, 2: 5.39, 3: 5.62, 4: 5.40, 5: 5.405}
    assert robust_sd(list(losses.values())) == pytest.approx(1.4826 * 0.005)
    assert set(outliers(losses)) == {3}  # 0.22 away: about 30 robust sd
    assert outliers({0: 1.0, 1: 9.0, 2: 1.0}) == {}  # fewer than 4 runs: no judgement


def test_recipe_values_are_checked_when_the_suite_is_read(data, tmp_path):
    experiments = write_suite(tmp_path / "e", data)
    suite = json.loads((experiments / "tiny.json").read_text())
    for key, value in [("tokens", -5), ("tokens", 0), ("tokens", "abc"), ("evals", -3), ("evals", 0),
                       ("warmup_fraction", 5), ("eval_sequences", 0), ("model", 5), ("data", 7),
                       ("data", {"corpus": "nope"}), ("compile", "maybe"), ("z_loss", -1), ("lr", 0)]:
        bad = json.loads(json.dumps(suite))
        bad["recipes"]["core"][key] = value
        (experiments / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(StudyError, match=f"recipe 'core': {key}="):
            load_suite(experiments, "bad")
    bad = json.loads(json.dumps(suite))
    bad["recipes"]["core"]["variants"] = [5]
    (experiments / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(StudyError, match="variant names"):
        load_suite(experiments, "bad")


def test_screen_trains_the_first_steps_of_the_full_schedule(data, tmp_path):
    """A screen row per run: the first N steps of the run's own schedule, health every step, never redone."""
    from phd.study.screen import screen_suite

    experiments = write_suite(tmp_path / "e", data)
    suite = load_suite(experiments, "tiny")
    one = type(suite)(suite.name, suite.path, suite.description, suite.runs[1:3], suite.recipes)
    results, logs = tmp_path / "screen.jsonl", []
    assert screen_suite(one, results, tmp_path / "runs", 3, log=logs.append) == 2
    rows = read_results(results)
    assert [(r["variant"], r["screen_steps"], len(r["loss_curve"])) for r in rows] == [
        ("vanilla", 3, 3), ("PHD-CSWA-2-4-8", 3, 3)]
    assert all(r["attn_logit_max"] > 0 and r["grad_norm_max"] >= r["grad_norm_median"] for r in rows)
    full = run_suite(one, tmp_path / "full.jsonl", tmp_path / "full-runs", progress=False, log=lambda _: None,
                     stop_after_steps=3, commit="test")
    assert full["trained"] == 2
    from phd.train.trainer import read_metrics

    same = [r["loss"] for r in read_metrics(run_dir(tmp_path / "full-runs", one.runs[0])) if "loss" in r]
    assert rows[0]["loss_curve"] == [round(x, 4) for x in same]  # the full run's first steps, same schedule
    assert screen_suite(one, results, tmp_path / "runs", 3, log=logs.append) == 0


def test_compare_sets_its_seeds_beside_the_study_interval(tmp_path):
    """`phd compare` finds the study's runs of its own setting and corpus (any suite, role main), prints their
    interval for one more seed, says plainly when its own seed falls outside it, and gives the same setting's
    measurement on the other corpora beside it."""
    from phd.study.compare import study_reference

    def row(variant, seed, loss, corpus="pypi", role="main", lr=0.003, suite="s"):
        return {"suite": suite, "recipe": "r", "variant": variant, "seed": seed, "val_loss": loss, "tokens": 1000,
                "role": role, "corpus": corpus,
                "config": {"lr": lr, "seq_len": 8, "seed": seed, "compile": True, "out": f"x{seed}",
                           "model": {"vocab_size": 10, "variant": variant,  # as the runs' saved configs have it
                                     "repeat_k": 2 if variant != "vanilla" else 1}}}

    study = [row("vanilla", s, 5.0) for s in range(6)] + [row("PHD-2", s, 5.0 + d) for s, d in
                                                          enumerate([-0.10, -0.12, -0.08, -0.11, -0.09, -0.10])]
    study += [row("vanilla", 0, 9.0, role="equal-flops"), row("PHD-2", 0, 1.0, corpus="project"),
              row("vanilla", 0, 1.0, corpus="project"), row("PHD-2", 1, 9.0, lr=0.1)]
    study += [row("PHD-2", 1, 1.05, corpus="project"), row("vanilla", 1, 1.0, corpus="project")]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in study))
    own = [row("vanilla", 40, 5.0, suite="compare"), row("PHD-2", 40, 4.9, suite="compare")]
    own[0]["config"]["compile"] = False  # how it computes does not matter; what it computes does
    text = study_reference(own, ["vanilla", "PHD-2"], path)
    assert "pypi corpus" in text and "-0.1000 ± 0.0141 (6 seeds)" in text and "inside that range" in text
    assert "lower than vanilla in 6 of 6 seeds" in text
    assert "In plain words: the study finds PHD-2 lower than vanilla at this setting, by 0.085 to 0.115" in text
    # the same setting on the other corpus is said too (its two seeds; not mixed into this corpus's interval)
    assert text.endswith("The same setting on other text: project corpus +0.0250 ± 0.0354 (2 seeds), 95% CI "
                         "[-0.293, +0.343], lower in 0 of 2 seeds (not distinguishable from zero).")
    study[6:12] = [row("PHD-2", s, 5.0 + d) for s, d in enumerate([-0.10, 0.12, -0.08, 0.11, -0.09, 0.04])]
    path.write_text("".join(json.dumps(r) + "\n" for r in study))
    assert "the study finds no difference between PHD-2 and vanilla distinguishable from zero" in \
        study_reference(own, ["vanilla", "PHD-2"], path)
    own[1]["val_loss"] = 5.6
    text = study_reference(own, ["vanilla", "PHD-2"], path)
    # a 95% range misses 1 new seed in 20: one miss is said, with its chance, not called a disagreement
    assert "OUTSIDE that range for seed(s) 40. A 95% range misses about 1 new seed in 20; 1 of 1 outside happens " \
        "by chance in 5.0% of comparisons: not evidence against the study on its own" in text
    own += [row("vanilla", 41, 5.0, suite="compare"), row("PHD-2", 41, 5.7, suite="compare")]
    text = study_reference(own, ["vanilla", "PHD-2"], path)
    assert "seed(s) 40, 41" in text and "2 of 2 outside happens by chance in 0.3% of comparisons, so this run " \
        "does not agree with the study" in text
    own[3]["val_loss"] = 5.0  # one of two: 9.8%
    assert "1 of 2 outside happens by chance in 9.8%" in study_reference(own, ["vanilla", "PHD-2"], path)
    own[2:] = []
    for r in own:
        r["corpus"] = "elsewhere"
    assert "no runs of this setting on the elsewhere corpus" in study_reference(own, ["vanilla", "PHD-2"], path)


def test_compare_says_when_the_study_found_a_better_lr_for_its_setting(tmp_path):
    """The study's lr sweep of the comparison's setting (role sweep, same setting but the lr) is read: each model's
    lowest-loss lr is named, and a comparison below both models' good lr is told that its difference is not the
    method's at its best, with the study's difference at that lr; sweep rows never enter the main interval."""
    from phd.study.compare import study_reference

    def row(variant, seed, loss, role="main", lr=0.003):
        return {"suite": "s", "recipe": f"r{lr}", "variant": variant, "seed": seed, "val_loss": loss, "tokens": 1000,
                "role": role, "corpus": "pypi",
                "config": {"lr": lr, "min_lr": lr / 10, "seq_len": 8, "seed": seed, "out": f"x{seed}",
                           "model": {"vocab_size": 10, "variant": variant,
                                     "repeat_k": 2 if variant != "vanilla" else 1}}}

    study = [row("vanilla", s, 5.0) for s in range(4)] + [row("PHD-2", s, 4.9) for s in range(4)]
    for lr, base, gain in ((0.003, 5.0, -0.1), (0.006, 4.8, -0.01), (0.012, 4.9, -0.02)):
        study += [row("vanilla", 100 + s, base + s / 100, "sweep", lr) for s in range(3)]
        study += [row("PHD-2", 100 + s, base + s / 100 + gain, "sweep", lr) for s in range(3)]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in study))
    own = [row("vanilla", 40, 5.0), row("PHD-2", 40, 4.9)]
    text = study_reference(own, ["vanilla", "PHD-2"], path)
    assert "-0.1000 ± 0.0000 (4 seeds)" in text  # the main interval: sweep rows left out
    assert ("lr check of this setting (pypi corpus, peak lr 0.003, 0.006, 0.012, 3 seeds): lowest loss for "
            "vanilla at 0.006, PHD-2 at 0.006. This comparison's lr 0.003 is not every model's good lr") in text
    assert "At lr 0.006 the study measured PHD-2 − vanilla -0.0100 ± 0.0000 (3 seeds)." in text
    assert text.endswith("`phd compare --lr 0.006` trains at it.") and "headline seeds" not in text
    # the headline seeds at the good lr, once the study has them, are cited beside the sweep's few
    study += [row("vanilla", s, 4.8, lr=0.006) for s in range(4)]
    study += [row("PHD-2", s, 4.8 - 0.02 + s / 1000, lr=0.006) for s in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in study))
    text = study_reference(own, ["vanilla", "PHD-2"], path)
    assert ("On the pypi corpus at lr 0.006 the study's headline seeds give PHD-2 − vanilla -0.0185 ± 0.0013 "
            "(4 seeds), 95% CI [-0.021, -0.016], lower in 4 of 4 seeds (suite `s`, recipe r0.006). "
            "`phd compare --lr 0.006` trains at it.") in text
    assert "-0.1000 ± 0.0000 (4 seeds)" in text  # the comparison's own setting (lr 0.003) is still its interval
    for r in own:
        r["config"].update(lr=0.006, min_lr=0.0006)
    assert "This comparison trains at that lr (0.006)." in study_reference(own, ["vanilla", "PHD-2"], path)
    for r in own:
        r["corpus"] = "elsewhere"  # no sweep on this text: the study's sweep of the same setting on another is said
    assert "lr check of this setting (pypi corpus" in study_reference(own, ["vanilla", "PHD-2"], path)
    own[0]["config"]["seq_len"] = 16  # another setting: no sweep of it
    assert "lr check" not in study_reference(own, ["vanilla", "PHD-2"], path)


def test_costs_rows_price_the_trained_shape(tmp_path):
    from phd.study.costs import measure_costs

    experiments = tmp_path / "e"
    experiments.mkdir()
    suite = {"defaults": {"preset": "cpu-1m", "seq_len": 32, "tokens": 1000},
             "recipes": {"core": {"variants": ["vanilla", "PHD-CSWA-2-4-8", "PHD-2"], "seeds": [0]}}}
    (experiments / "s.json").write_text(json.dumps(suite))
    results = experiments / "results.jsonl"
    rows = measure_costs(load_suite(experiments, "s"), results)
    assert {r["variant"] for r in rows} == {"vanilla", "PHD-CSWA-2-4-8", "PHD-2"}
    by = {r["variant"]: r for r in rows}
    assert by["vanilla"]["cache_ratio"] == 1.0 and by["PHD-2"]["cache_ratio"] == 1.0
    cfg = PHDConfig.from_name("PHD-CSWA-2-4-8", preset="cpu-1m")
    extra = cfg.n_layers * 2 * (cfg.repeat_k - 1) * 4 * cfg.n_kv_heads * cfg.head_dim * 4  # fp32 hidden window
    assert by["PHD-CSWA-2-4-8"]["cache_bytes"] == by["vanilla"]["cache_bytes"] + extra
    assert read_results(results) == rows
    text = (write_report(results, tmp_path / "docs")[0]).read_text()
    assert "Cost beside quality" not in text  # cost rows alone make no suite section


def test_report_joins_runs_of_one_setting_across_recipes():
    """More seeds of a setting may be added later under another recipe name (a recipe is a scheduling unit):
    the report counts them as one group; a different setting (here: tokens) stays apart."""
    from phd.study.report import Report

    def row(recipe, seed, tokens=1024, lr=0.01):
        return {"recipe": recipe, "variant": "PHD-2", "seed": seed, "tokens": tokens, "baseline": "core",
                "role": "main", "config": {"lr": lr, "seed": seed, "out": f"runs/{recipe}/{seed}", "model": {}}}

    groups = Report.by_variant([row("headline", 0), row("more-seeds", 1), row("more-seeds", 2), row("longer", 0, 2048)])
    assert {k: [r["seed"] for r in g] for k, g in groups.items()} == {
        ("headline+more-seeds", "PHD-2"): [0, 1, 2], ("longer", "PHD-2"): [0]}
