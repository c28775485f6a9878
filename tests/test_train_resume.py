"""Honest resume and a run folder's integrity: every model field compared, optimiser/schedule changes applied
exactly and recorded, truthful end, one process per run folder, paths from checkpoint files confined."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_utils import make_data, one_thread, tiny_config  # noqa: F401 (autouse fixture)

from phd.commands import main
from phd.fsutil import LockedError
from phd.io import CheckpointError
from phd.train import Trainer, TrainingError, build_config
from phd.train.checkpoint import latest_checkpoint
from phd.train.config import TrainConfig
from phd.train.optim import lr_at


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("resume") / "data")


def first_run(data: Path, out: Path, **overrides) -> None:
    Trainer(tiny_config(data, out, max_steps=4, checkpoint_every=2, **overrides)).fit(stop_after=2)


@pytest.mark.parametrize("field, value", [("rope_theta", 500.0), ("norm_eps", 1e-3), ("init_std", 0.05)])
def test_resume_refuses_any_model_field_change(data, tmp_path, field, value):
    first_run(data, tmp_path)
    cfg = tiny_config(data, tmp_path, max_steps=4)
    cfg.model.fields[field] = value
    with pytest.raises(CheckpointError, match=rf"{field}: .* there vs {value!r} here"):
        Trainer(cfg)


def test_resume_applies_a_new_schedule_exactly_and_records_it(data, tmp_path):
    first_run(data, tmp_path)
    new = tiny_config(data, tmp_path, max_steps=6, checkpoint_every=2, lr=5e-3, min_lr=5e-5, warmup_steps=1,
                      betas=[0.8, 0.9], eps=1e-6, weight_decay=0.2)
    trainer = Trainer(new)
    settings = [(g["betas"], g["eps"], g["weight_decay"]) for g in trainer.optimizer.param_groups]
    assert settings == [((0.8, 0.9), 1e-6, 0.2), ((0.8, 0.9), 1e-6, 0.0)]
    trainer.fit()
    fresh = Trainer(TrainConfig.from_dict({**new.to_dict(), "out": str(tmp_path / "fresh")}))
    fresh.fit()
    lrs = [h["lr"] for h in trainer.progress.history]
    assert lrs == [h["lr"] for h in fresh.progress.history][2:], "the lr a run with the new config has at each step"
    assert lrs == pytest.approx([lr_at(s, new) for s in range(2, 6)], rel=1e-12)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["lr"] == 5e-3 and [r["step"] for r in saved["resumes"]] == [2]
    changed = saved["resumes"][0]["changed"]
    assert changed["lr"] == [1e-2, 5e-3] and changed["max_steps"] == [4, 6] and changed["betas"] == [[0.9, 0.95],
                                                                                                       [0.8, 0.9]]
    assert build_config(tmp_path / "config.json", {}) == new  # the run's config.json is still a config file
    Trainer(new)  # a second resume appends
    assert [r["step"] for r in json.loads((tmp_path / "config.json").read_text())["resumes"]] == [2, 6]


def test_resume_past_the_end_is_refused_and_nothing_claims_an_export(data, tmp_path, capsys):
    first_run(data, tmp_path / "run")
    with pytest.raises(TrainingError, match=r"at step 2, past this config's end at step 1"):
        Trainer(tiny_config(data, tmp_path / "run", max_steps=1))
    cfg = tiny_config(data, tmp_path / "run", max_steps=1)
    cfg.save(tmp_path / "run.json")
    assert main(["train", str(tmp_path / "run.json")]) == 1
    out, err = capsys.readouterr()
    assert "exported" not in out and "past this config's end" in err
    assert not (tmp_path / "run" / "model").exists()


def test_a_torn_metrics_line_is_dropped_on_resume(data, tmp_path):
    first_run(data, tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    trainer = Trainer(tiny_config(data, tmp_path, max_steps=4))
    trainer.fit()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_one_process_per_run_folder(data, tmp_path, capsys):
    holder = Trainer(tiny_config(data, tmp_path, max_steps=2))
    with pytest.raises(LockedError, match=rf"in use by process {os.getpid()} on "):
        Trainer(tiny_config(data, tmp_path, max_steps=2))
    code = f"import sys, phd.commands; sys.exit(phd.commands.main(['train', '{tmp_path / 'config.json'}']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={
        **os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and f"in use by process {os.getpid()}" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    holder.fit()  # releases the lock when done
    assert Trainer(tiny_config(data, tmp_path, max_steps=2)).progress.step == 0


def test_a_refused_trainer_leaves_the_holders_run_untouched(data, tmp_path):
    """The lock comes before anything touches the run folder: a second Trainer on a run another process holds
    refuses without removing the holder's in-flight save (`.tmp-step_*`, which a starting Trainer otherwise
    clears as stale) or rewriting its config and metrics."""
    first_run(data, tmp_path)
    in_flight = tmp_path / "checkpoints" / ".tmp-step_00000003"
    in_flight.mkdir()
    (in_flight / "__0_0.distcp").write_bytes(b"half of a shard being written")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 5.0}\n')  # after the checkpoint: a starting Trainer would cut it
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "train.lock"}
    code = ("import sys; from pathlib import Path; from phd.fsutil import DirLock\n"
            "lock = DirLock(Path(sys.argv[1])); lock.acquire(); print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=rf"in use by process {holder.pid} on "):
            Trainer(tiny_config(data, tmp_path, max_steps=4))
        after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "train.lock"}
        assert after == files, "a refused Trainer changed the run folder"
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert Trainer(tiny_config(data, tmp_path, max_steps=4)).progress.step == 2  # free again: it resumes
    assert not in_flight.exists()  # and now clears the stale save


@pytest.mark.parametrize("name", ["../../other/checkpoints/step_00000002", "/tmp/step_00000002", "step_2"])
def test_the_latest_marker_cannot_leave_the_run(data, tmp_path, name):
    first_run(data, tmp_path / "other")
    first_run(data, tmp_path / "run" / "a" / "b")
    (tmp_path / "run" / "a" / "b" / "checkpoints" / "latest").write_text(name + "\n")
    with pytest.raises(CheckpointError, match="not a step_NNNNNNNN folder"):
        Trainer(tiny_config(data, tmp_path / "run" / "a" / "b", max_steps=4))


@pytest.mark.parametrize("name", ["step_00000002/../../../other/checkpoints/step_00000007", "step_00000002/",
                                  "step_000000021", "step_00000002.old", "step_00000002\n\nstep_00000007",
                                  " step_00000002/../step_00000007", "xstep_00000002"])
def test_the_latest_marker_is_a_whole_step_name(tmp_path, name):
    """The whole marker must be one step_NNNNNNNN name: one that merely starts (or ends) with such a name is
    refused, even where the path it spells holds a complete checkpoint (here: another run's)."""
    root = tmp_path / "run" / "checkpoints"
    for step in ("step_00000002", "step_00000007", "step_000000021", "step_00000002.old"):
        (root / step).mkdir(parents=True)
        (root / step / "meta.json").write_text("{}")
    (tmp_path / "other" / "checkpoints" / "step_00000007").mkdir(parents=True)
    (tmp_path / "other" / "checkpoints" / "step_00000007" / "meta.json").write_text("{}")
    (root / "latest").write_text(name + "\n")
    with pytest.raises(CheckpointError, match=r"not a step_NNNNNNNN folder of .*; write the name of one of its"):
        latest_checkpoint(root)
    (root / "latest").write_text("step_00000002\n")
    assert latest_checkpoint(root) == root / "step_00000002"


@pytest.mark.parametrize("name", ["../../../config.json", "/etc/hostname", "sub/x"])
def test_checksum_names_are_confined_to_the_checkpoint(data, tmp_path, name):
    first_run(data, tmp_path)
    meta_path = tmp_path / "checkpoints" / "step_00000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["checksums"][name] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a file name of"):
        Trainer(tiny_config(data, tmp_path, max_steps=4))


def test_init_from_nan_weights_is_refused(data, tmp_path):
    Trainer(tiny_config(data, tmp_path / "a", max_steps=1)).fit()
    weights = tmp_path / "a" / "model" / "model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    state["norm.weight"][0] = float("nan")
    save_file(state, weights)
    (tmp_path / "a" / "model" / "checksums.json").unlink()
    with pytest.raises(CheckpointError, match="NaN or inf weights in norm.weight"):
        Trainer(tiny_config(data, tmp_path / "b", init_from=str(tmp_path / "a"), max_steps=1))
    assert not (tmp_path / "b" / "checkpoints").exists() or not any((tmp_path / "b" / "checkpoints").iterdir())
