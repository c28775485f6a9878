"""Training: config parsing, the sharded loader, loss going down, bitwise resume, export and init_from."""

from __future__ import annotations

import builtins
import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from train_utils import make_data, one_thread, tiny_config  # noqa: F401 (autouse fixture)

from phd.commands import main
from phd.eval.perplexity import eval_batches
from phd.io import eos_id, load_model, model_dir, save_model
from phd.study.runner import read_results
from phd.train import TrainConfigError, Trainer, build_config
from phd.train.checkpoint import verify
from phd.train.config import TrainConfig, parse_overrides
from phd.train.loader import TokenLoader
from phd.train.optim import lr_at


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("train") / "data")


def losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.progress.history]


# ----- config -----


def test_overrides_file_and_dotted_keys(tmp_path, data):
    path = tmp_path / "run.toml"
    path.write_text(
        f'data = "{data}"\nmax_steps = 10\nbatch_size = 8\nmicro_batch = 4\n'
        '[model]\npreset = "cpu-1m"\nvariant = "PHD-CSWA-3-16-32"\n'
    )
    overrides = parse_overrides(["--lr", "1e-3", "--model.repeat_k=2", "nan_policy=stop", "--compile", "clip=null"])
    assert overrides == {"lr": 1e-3, "model.repeat_k": 2, "nan_policy": "stop", "compile": True, "clip": None}
    cfg = build_config(path, overrides)
    model = cfg.model.build()
    assert (model.repeat_k, model.window, model.chunk, model.d_model) == (2, 16, 32, 128)
    assert cfg.lr == 1e-3 and cfg.compile and cfg.clip is None
    cfg.save(tmp_path / "saved.json")
    assert TrainConfig.from_dict(json.loads((tmp_path / "saved.json").read_text())) == cfg


def test_command_line_variant_overrides_win_over_the_file(tmp_path, data):
    path = tmp_path / "run.json"
    model = {"preset": "cpu-1m", "variant": "PHD-SWA-3-16-inf"}
    path.write_text(json.dumps({"data": str(data), "max_steps": 1, "model": model}))
    assert build_config(path, {"model.window": 4}).model.build().name == "PHD-SWA-3-4-inf"
    assert build_config(path, {"model.variant": "PHD-2"}).model.build().name == "PHD-2"
    path.write_text(json.dumps({"data": str(data), "max_steps": 1, "model": {**model, "window": 4}}))
    with pytest.raises(TrainConfigError, match="window=4 contradicts variant 'PHD-SWA-3-16-inf'"):
        build_config(path, {})
    assert build_config(path, {"model.variant": "PHD-CSWA-2-8-16"}).model.build().name == "PHD-CSWA-2-8-16"


@pytest.mark.parametrize(
    "override, field",
    [({"micro_batch": 3}, "micro_batch"), ({"nan_policy": "ignore"}, "nan_policy"), ({"min_lr": 1.0}, "min_lr"),
     ({"lrr": 1.0}, "lrr"), ({"model.windoww": 3}, "windoww"), ({"model.n_heads": 5}, "n_heads")],
)
def test_bad_config_names_the_field(data, override, field):
    base = {"data": str(data), "max_steps": 1, "batch_size": 8, "micro_batch": 4, "model.preset": "cpu-1m"}
    with pytest.raises(TrainConfigError, match=field):
        build_config(None, {**base, **override})


def test_schedule_warmup_then_cosine(data, tmp_path):
    cfg = tiny_config(data, tmp_path, max_steps=12, warmup_steps=2, lr=1.0, min_lr=0.1)
    assert [lr_at(s, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, cfg) == 1.0 and lr_at(11, cfg) == pytest.approx(0.1)
    assert lr_at(6, cfg) + lr_at(7, cfg) == pytest.approx(1.1)  # cosine: symmetric around the midpoint
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(1, 11))


# ----- loader -----


def _step_windows(loader: TokenLoader) -> list[tuple[int, ...]]:
    """The first token of every window this rank reads in the next step (identifies the window)."""
    return [tuple(x[:, 0].tolist()) + tuple(x[:, 1].tolist()) for x, _ in loader.next_step()]


def test_loader_ranks_partition_the_global_batch():
    tokens = np.arange(10_000, dtype=np.int64)  # window i starts with token i * seq_len: ids are recoverable
    seq_len, batch = 16, 8
    single = TokenLoader(tokens, seq_len, batch, micro_batch=4, seed=3)
    ranks = [TokenLoader(tokens, seq_len, batch, micro_batch=2, rank=r, world=2, seed=3) for r in range(2)]
    for _ in range(200):  # crosses epoch boundaries (624 windows / 8 per step)
        (x1, y1), (x2, y2) = single.next_step()
        reference = sorted(torch.cat([x1, x2])[:, 0].tolist())
        parts = [torch.cat([x for x, _ in r.next_step()])[:, 0].tolist() for r in ranks]
        assert not set(parts[0]) & set(parts[1])
        assert sorted(parts[0] + parts[1]) == reference
        assert torch.equal(y1[:, :-1], x1[:, 1:])
    assert single.state.epoch == 2


def test_every_epoch_visits_every_window_once_in_a_new_order():
    """24 windows, 3 full batches of 8 per epoch: none dropped, and each epoch shuffled differently."""
    seq_len = 4
    loader = TokenLoader(np.arange(24 * seq_len + 1, dtype=np.int64), seq_len, 8, 4, seed=5)
    epochs = []
    for _ in range(3):
        order = [int(x[0]) // seq_len for _ in range(3) for x, _ in loader.next_step() for x in x]
        assert sorted(order) == list(range(24)), "every full batch of the epoch, each window once"
        epochs.append(order)
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]


def test_weight_decay_only_on_matrices():
    from phd.model import PHDTransformer
    from phd.train.optim import build_optimizer

    cfg = tiny_config(Path("unused"), Path("unused"), model={
        "preset": "cpu-1m", "variant": "PHD-CSWA-2-4-8", "qk_norm": True, "norm": "post"})
    model = PHDTransformer(cfg.model.build())
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in build_optimizer(model, cfg).param_groups}
    gains = {n for n, p in model.named_parameters() if "norm" in n}
    assert gains and len(gains) == sum(p.dim() == 1 for p in model.parameters())
    assert decay[0.0] == gains and decay[cfg.weight_decay] == set(names.values()) - gains


def test_accumulated_micro_batches_equal_one_big_batch(data, tmp_path):
    """The same 8 sequences as 1 x 8 or 4 x 2 micro-batches: the same mean loss and the same gradient norm."""
    big = Trainer(tiny_config(data, tmp_path / "a", micro_batch=8, max_steps=1, clip=None))
    small = Trainer(tiny_config(data, tmp_path / "b", micro_batch=2, max_steps=1, clip=None))
    a, b = big.train_step(), small.train_step()
    assert a.loss == pytest.approx(b.loss, rel=1e-5) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)


def test_loader_state_restores_the_exact_batches():
    tokens = np.random.default_rng(0).integers(0, 300, 5_000)
    a = TokenLoader(tokens, 32, 8, 4, seed=1)
    for _ in range(25):
        a.next_step()
    b = TokenLoader(tokens, 32, 8, 4, seed=1)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(30):
        for (xa, ya), (xb, yb) in zip(a.next_step(), b.next_step(), strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_eval_batches_cover_the_same_windows_at_any_world_size():
    tokens = np.arange(2_000, dtype=np.int64)
    one = eval_batches(tokens, 16, 11, 4, rank=0, world=1)
    two = [eval_batches(tokens, 16, 11, 4, rank=r, world=2) for r in range(2)]
    assert len(two[0]) == len(two[1])  # every rank runs the same number of forwards (FSDP collectives)

    def weighted(batches):
        return sorted(int(x[0]) for b in batches for x, w in zip(b[0], b[2], strict=True) if w > 0)

    available = (2_000 - 1) // 16  # windows spread evenly over the whole split, not the first 11
    assert weighted(one) == weighted(two[0] + two[1]) == [16 * (i * available // 11) for i in range(11)]
    everything = eval_batches(tokens, 16, 10_000, 4, rank=0, world=1)  # more asked than held: all of them, once
    assert weighted(everything) == [16 * i for i in range(available)]



def test_phd_eval_prints_the_val_loss_phd_train_reported(data, tmp_path, capsys):
    """One validation-loss function: `phd eval --sequences eval_iters*batch_size` on the export of a run scores the
    windows the trainer scored, and reports its final val loss."""
    cfg = tiny_config(data, tmp_path / "run", max_steps=4, eval_every=2, eval_iters=2)
    summary = Trainer(cfg).fit()
    sequences = cfg.eval_iters * cfg.batch_size
    args = ["eval", str(tmp_path / "run" / "model"), "--data", str(data), "--seq-len", str(cfg.seq_len),
            "--sequences", str(sequences), "--batch-size", "5", "--out", str(tmp_path / "eval.json")]
    assert main(args) == 0
    loss = json.loads((tmp_path / "eval.json").read_text())["loss"]
    assert (loss["windows"], loss["tokens"]) == (sequences, sequences * cfg.seq_len)
    assert loss["loss"] == pytest.approx(summary["val_loss"], abs=1e-5)
    assert f"val loss {summary['val_loss']:.4f}" in capsys.readouterr().out

# ----- the loop -----


def test_loss_decreases_and_run_dir_is_complete(data, tmp_path):
    cfg = tiny_config(data, tmp_path / "run", max_steps=30, eval_every=15, eval_iters=2, checkpoint_every=15)
    trainer = Trainer(cfg)
    summary = trainer.fit()
    curve = losses(trainer)
    assert np.mean(curve[-5:]) < np.mean(curve[:5]) - 1.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0] and summary["val_loss"] == val[1]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 31))
    latest = tmp_path / "run" / "checkpoints" / "step_00000030"
    assert verify(latest)["trainer"]["step"] == 30
    model = load_model(tmp_path / "run")  # RUN/model/, the export inference reads
    assert model.config == cfg.model.build()
    torch.testing.assert_close(model.state_dict()["embed.weight"], trainer.model.state_dict()["embed.weight"])


@pytest.mark.parametrize("variant", ["vanilla", "PHD-CSWA-2-4-8"])
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(data, tmp_path, variant):
    kwargs = dict(variant=variant, max_steps=6, checkpoint_every=3, batch_size=8, micro_batch=2)
    straight = Trainer(tiny_config(data, tmp_path / "a", **kwargs))
    straight.fit()
    first = Trainer(tiny_config(data, tmp_path / "b", **kwargs))
    first.fit(stop_after=4)  # steps 1-4 run, checkpoint at 3; step 4 is lost as in a crash
    resumed = Trainer(tiny_config(data, tmp_path / "b", **kwargs))
    assert resumed.progress.step == 3 and resumed.resumed_from.name == "step_00000003"
    resumed.fit()
    assert losses(resumed) == losses(straight)[3:]  # bitwise
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))  # the lost step 4 is logged once


def test_activation_checkpointing_changes_nothing_but_memory(data, tmp_path):
    plain = Trainer(tiny_config(data, tmp_path / "plain", max_steps=3))
    plain.fit()
    config = tiny_config(data, tmp_path / "ac", max_steps=3, checkpoint_every=2, activation_checkpointing=True)
    recomputed = Trainer(config)
    recomputed.fit(stop_after=2)
    assert list(recomputed.model.state_dict()) == list(plain.model.state_dict())  # checkpoint names unchanged
    resumed = Trainer(tiny_config(data, tmp_path / "ac", max_steps=3))  # resumes without recomputation
    resumed.fit()
    assert losses(recomputed) + losses(resumed) == losses(plain)


def test_keep_last_n_checkpoints(data, tmp_path):
    Trainer(tiny_config(data, tmp_path, max_steps=5, checkpoint_every=1, checkpoint_keep=2)).fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000004", "step_00000005"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000005"


def test_export_command_and_init_from(data, tmp_path):
    cfg = tiny_config(data, tmp_path / "run", max_steps=3, checkpoint_every=3)
    trained = Trainer(cfg)
    trained.fit()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    exported = load_model(tmp_path / "export")
    assert (tmp_path / "export" / "tokenizer.json").exists()
    for (name, a), b in zip(trained.model.state_dict().items(), exported.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    start = Trainer(tiny_config(data, tmp_path / "warm", max_steps=3, init_from=str(tmp_path / "export")))
    for (name, a), b in zip(exported.state_dict().items(), start.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    other = tiny_config(data, tmp_path / "bad", variant="PHD-CSWA-3-4-8", init_from=str(tmp_path / "export"))
    with pytest.raises(Exception, match="repeat_k: 2 there vs 3 here"):
        Trainer(other)


def test_cli_trains_from_file_with_overrides(data, tmp_path, capsys):
    cfg = tiny_config(data, tmp_path / "run", max_steps=2)
    cfg.save(tmp_path / "run.json")
    assert main(["train", str(tmp_path / "run.json"), "--max_steps", "3", "model.variant=PHD-SWA-2-4-inf"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["max_steps"] == 3 and saved["model"]["variant"] == "PHD-SWA-2-4-inf"
    assert model_dir(tmp_path / "run").name == "model"
    assert "done: PHD-SWA-2-4-inf step 3" in capsys.readouterr().out
    assert main(["train", "--preset", "cpu-1m", f"data={data}", "max_steps=1", "micro_batch=3"]) == 2
    assert "micro_batch=3 is invalid" in capsys.readouterr().err


def test_save_model_roundtrip_is_what_train_writes(data, tmp_path):
    trainer = Trainer(tiny_config(data, tmp_path / "run", max_steps=1))
    trainer.fit()
    save_model(load_model(tmp_path / "run"), tmp_path / "copy")
    assert load_model(tmp_path / "copy").config.name == "PHD-CSWA-2-4-8"


def test_compare_prints_the_variants_side_by_side(tmp_path, capsys):
    data = make_data(tmp_path / "data", train_tokens=6_000, val_tokens=1_000, vocab=2048)  # cpu-1m's vocabulary
    out = tmp_path / "compare"
    argv = ["compare", "--data", str(data), "--variants", "vanilla", "PHD-CSWA-2-4-8", "--seq-len", "32",
            "--batch-size", "4", "--steps", "2", "--evals", "1", "--eval-sequences", "4", "--out", str(out),
            "--quiet", "--seeds", "0", "1", "--no-compile"]
    assert main(argv + ["--jobs", "1"]) == 0
    table = capsys.readouterr().out
    assert "| vanilla |" in table and "| PHD-CSWA-2-4-8 |" in table and "(2 seeds)" in table
    rows = read_results(out / "results.jsonl")
    assert sorted((r["variant"], r["seed"]) for r in rows) == [
        ("PHD-CSWA-2-4-8", 0), ("PHD-CSWA-2-4-8", 1), ("vanilla", 0), ("vanilla", 1)]
    assert rows[0]["val_loss"] != rows[1]["val_loss"] and all(np.isfinite(r["val_loss"]) for r in rows)
    # the same command again: nothing retrained, the same table
    assert main(argv + ["--jobs", "1"]) == 0
    again = capsys.readouterr().out
    assert "[study" not in again and table.endswith(again)
    assert len(read_results(out / "results.jsonl")) == 4
    # two worker processes give the same losses (same seeds, same batches)
    assert main(argv + ["--jobs", "2", "--out", str(tmp_path / "parallel")]) == 0
    par = {(r["variant"], r["seed"]): r["val_loss"] for r in read_results(tmp_path / "parallel" / "results.jsonl")}
    assert par == {(r["variant"], r["seed"]): r["val_loss"] for r in rows}
    assert main(argv[:4] + ["PHD-CSWA-x"]) == 2
    assert "variant name 'PHD-CSWA-x' is unknown" in capsys.readouterr().err


@pytest.mark.parametrize("corpus, recipes", [
    ("default", {"vanilla": "project-750k-warmup50-lr6e-3", "PHD-CSWA-3-16-32": "project-750k-warmup50-lr6e-3"}),
    ("pypi", {"vanilla": "pypi-750k-warmup50-lr6e-3", "PHD-CSWA-3-16-32": "pypi-750k-warmup50-lr6e-3"}),
])
def test_compare_defaults_are_the_study_suite_it_cites(tmp_path, corpus, recipes):
    """The main job is judged against the study's runs of its own setting: the `evidence` suite's recipes for each
    corpus must train exactly what `phd compare` trains at its defaults (same variants, same TrainConfig, same
    data), or the printed interval would be of something else."""
    import argparse
    import dataclasses
    import json

    from phd.study import compare
    from phd.study.recipes import load_suite

    d = compare.DEFAULTS
    args = argparse.Namespace(**{k: v for k, v in d.items()}, steps=None, seeds=[0])
    name, mine = compare.suite_for(args, {"corpus": corpus})
    (tmp_path / "mine.json").write_text(json.dumps(mine))
    mine = load_suite(tmp_path, "mine")
    study = load_suite(compare.REPO / "experiments", "evidence")
    for variant in d["variants"]:
        ours, theirs = mine.run(name, variant, 0), study.run(recipes[variant], variant, 20)
        assert theirs is not None, f"evidence/{recipes[variant]} lacks {variant} at seed 20"
        assert ours.settings["data"] == theirs.settings["data"]
        assert ours.train_config("D", "O") == dataclasses.replace(theirs.train_config("D", "O"), seed=0)


def test_model_folder_records_the_eos_id_of_its_data(tmp_path):
    """`phd generate`, `phd eval` and `phd convert` read the end-of-text id from the model folder (phd.io.eos_id),
    which records the one the data was made with, not a guess from the vocabulary."""
    data = make_data(tmp_path / "data")
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "eos_id": 7}))
    Trainer(tiny_config(data, tmp_path / "run", max_steps=1)).fit()
    folder = model_dir(tmp_path / "run")
    assert json.loads((folder / "special_tokens.json").read_text()) == {"eos_id": 7} and eos_id(folder) == 7
    (folder / "special_tokens.json").unlink()  # a folder written before the id was recorded
    assert eos_id(folder) == 0  # "<eos>", the first usual spelling in its vocabulary
    save_model(load_model(folder), tmp_path / "no-tokenizer")
    assert eos_id(tmp_path / "no-tokenizer") is None


# ----- a full disk: one line naming the file, never a traceback -----

NO_SPACE = OSError(errno.ENOSPC, "No space left on device")


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    """`phd train` of tiny_config's model for 2 steps (the command, so the printed line is what is checked)."""
    model = {"vocab_size": 300, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64,
             "max_seq_len": 64}
    return ["train", "--variant", "PHD-CSWA-2-4-8", *(f"model.{k}={v}" for k, v in model.items()), f"data={data}",
            f"out={out}", "seq_len=32", "batch_size=4", "micro_batch=4", "max_steps=2", "eval_every=0",
            "progress=false", "device=cpu", *extra]


def full_disk_for(name: str, mode: str):
    """A stand-in for `open` that fails with ENOSPC on file `name` opened with `mode`, as a full disk does."""

    def fake_open(file, *args, **kwargs):
        opened = (args[0] if args else kwargs.get("mode", "r"))
        if Path(file).name == name and opened == mode:
            raise NO_SPACE
        return builtins.open(file, *args, **kwargs)

    return fake_open


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_full_disk_during_the_final_export_is_one_line(data, tmp_path, capsys, monkeypatch):
    """safetensors reports ENOSPC as its own SafetensorError: one line naming the model file (not the temporary
    folder) and where the trained weights are; no half-written model/ is left."""
    from safetensors import SafetensorError

    import phd.io

    def full(state, path, metadata=None):
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path '
                              f'"{Path(path).parent}/.tmpXYZ"')

    monkeypatch.setattr(phd.io, "save_file", full)
    run = tmp_path / "run"
    assert main(train_argv(data, run, "checkpoint_every=2")) == 1
    err = one_error_line(capsys)
    assert err == (f"error (rank 0): cannot write {run}/model/model.safetensors: No space left on device [ENOSPC]; "
                   f"free space, then export the last checkpoint: phd export {run} --out {run}/model --overwrite")
    assert not (run / "model").exists() and not list(run.glob(".model*"))
    assert main(train_argv(data, tmp_path / "nockpt", "checkpoint_every=0")) == 1
    assert "free space and train again (checkpoint_every=0" in one_error_line(capsys)


def test_a_full_disk_on_the_metrics_or_the_lock_is_one_line(data, tmp_path, capsys, monkeypatch):
    """The metrics append and the lock's pid record, each failing with ENOSPC: one line naming the file; a lock
    that could not be recorded is not kept (the next run takes it)."""
    import phd.fsutil
    import phd.train.trainer

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(phd.train.trainer, "open", full_disk_for("metrics.jsonl", "a"), raising=False)
        assert main(train_argv(data, run)) == 1
    assert one_error_line(capsys) == (f"error (rank 0): cannot write {run}/metrics.jsonl: No space left on device "
                                      "[ENOSPC]; free space (or choose a folder on another disk) and run again")

    class FullFile:
        """A real file (flock needs its descriptor) whose writes fail as on a full disk."""

        def __init__(self, file) -> None:
            self.file = file

        def __getattr__(self, name: str):
            return getattr(self.file, name)

        def write(self, text: str) -> int:
            raise NO_SPACE

    def lock_on_full_disk(file, *args, **kwargs):
        opened = builtins.open(file, *args, **kwargs)
        return FullFile(opened) if Path(file).name == "train.lock" else opened

    with monkeypatch.context() as m:
        m.setattr(phd.fsutil, "open", lock_on_full_disk, raising=False)
        assert main(train_argv(data, run)) == 1
    assert one_error_line(capsys) == (f"error (rank 0): cannot write {run}/train.lock: No space left on device "
                                      "[ENOSPC]; free space (or choose a folder on another disk) and run again")
    assert main(train_argv(data, run)) == 0, "the failed lock was released"
