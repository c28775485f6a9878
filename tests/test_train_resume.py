"""Honest resume and a run folder's integrity: every model field compared, optimiser/schedule changes applied
exactly and recorded, truthful end, one process per run folder, paths from checkpoint files confined."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_utils import make_data, one_thread, tiny_config  # noqa: F401 (autouse fixture)

from phd.commands import main
from phd.fsutil import LockedError
from phd.io import CheckpointError
from phd.train import Trainer, TrainingError, build_config
from phd.train.checkpoint import META_SUM, latest_checkpoint, meta_text
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
    meta_path.write_text(meta_text(meta))  # with a valid digest of its own: the names are checked on their own
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


STEP = "step_00000002"


def step_folder(run: Path) -> Path:
    return run / "checkpoints" / STEP


def make_legacy(meta_path: Path, **changes) -> None:
    """meta.json as phd wrote it before meta.json carried its own checksum (META_SUM), with `changes` applied."""
    meta = json.loads(meta_path.read_text())
    del meta[META_SUM]
    meta_path.write_text(json.dumps({**meta, **changes}, indent=2))


@pytest.mark.parametrize("key", ["position", "last_epoch", "tokens"])
def test_a_flipped_digit_in_meta_json_is_refused(data, tmp_path, key):
    """meta.json holds what no other checksum covers (the loader position, the scheduler's step, the token count):
    one changed digit would resume from the wrong place without a word, so meta.json carries its own digest."""
    first_run(data, tmp_path)
    meta_path = step_folder(tmp_path) / "meta.json"
    text = meta_path.read_text()
    flipped, count = re.subn(rf'("{key}": )(\d)', lambda m: m[1] + str((int(m[2]) + 4) % 10), text, count=1)
    assert count == 1 and json.loads(flipped) != json.loads(text)
    meta_path.write_text(flipped)
    with pytest.raises(CheckpointError, match=rf"{STEP}/meta.json does not match its own checksum .*delete .*{STEP}"):
        Trainer(tiny_config(data, tmp_path, max_steps=4))


@pytest.mark.parametrize("extra", ["notes.txt", "__1_0.distcp", "sub/"])
def test_a_file_meta_json_does_not_list_is_refused(data, tmp_path, extra):
    first_run(data, tmp_path)
    step = step_folder(tmp_path)
    if extra.endswith("/"):
        (step / extra).mkdir()
        expected = "sub is not a plain file"
    else:
        (step / extra).write_bytes(b"x" * 100)
        expected = rf"{re.escape(extra)} is not listed in meta.json's checksums"
    with pytest.raises(CheckpointError, match=expected):
        Trainer(tiny_config(data, tmp_path, max_steps=4))


def test_an_old_meta_json_listing_only_config_cannot_load_a_corrupted_shard(data, tmp_path):
    """The issue's case: an old-format meta.json whose checksums name only config.json, beside a corrupted shard,
    loaded it, trained NaN steps and saved a NaN checkpoint as `latest`."""
    first_run(data, tmp_path)
    step = step_folder(tmp_path)
    config_sum = json.loads((step / "meta.json").read_text())["checksums"]["config.json"]
    make_legacy(step / "meta.json", checksums={"config.json": config_sum})
    shard = step / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = b"\xff" * 64
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"\.metadata is not listed in meta.json's checksums"):
        Trainer(tiny_config(data, tmp_path, max_steps=4))
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == STEP
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", STEP]


def test_an_old_checkpoint_resumes_with_a_warning_and_the_next_carries_a_checksum(data, tmp_path):
    """Checkpoints of runs in progress, written before META_SUM existed, still resume (every file listed and
    checked), with a warning that meta.json itself is unchecked; the next save carries the digest."""
    first_run(data, tmp_path)
    make_legacy(step_folder(tmp_path) / "meta.json")
    with pytest.warns(UserWarning, match="written by an older phd and carries no checksum of its own"):
        trainer = Trainer(tiny_config(data, tmp_path, max_steps=4, checkpoint_every=2))
    assert trainer.progress.step == 2
    trainer.fit()
    assert META_SUM in json.loads((tmp_path / "checkpoints" / "step_00000004" / "meta.json").read_text())


def test_an_old_checkpoint_must_still_list_every_file_and_have_only_old_fields(data, tmp_path):
    """A digest key whose name was corrupted does not pass as an old checkpoint, nor does an old meta.json that
    leaves a file out."""
    first_run(data, tmp_path)
    meta_path = step_folder(tmp_path) / "meta.json"
    original = meta_path.read_text()
    meta = json.loads(original)
    make_legacy(meta_path, meta_sha257=meta[META_SUM])
    with pytest.raises(CheckpointError, match=r"has no meta_sha256 and not the fields an older phd wrote .*"
                                              r"meta_sha257"):
        Trainer(tiny_config(data, tmp_path, max_steps=4))
    meta_path.write_text(original)
    make_legacy(meta_path, checksums={k: v for k, v in meta["checksums"].items() if k != "tokenizer.json"})
    with pytest.raises(CheckpointError, match="tokenizer.json is not listed"):
        Trainer(tiny_config(data, tmp_path, max_steps=4))


def test_a_linked_step_folder_is_refused(data, tmp_path, capsys):
    """A step folder that is a link into another run (the one `latest` names, or one `phd export` is given by
    --step or by path) is never resumed from or exported."""
    first_run(data, tmp_path / "other")
    Trainer(tiny_config(data, tmp_path / "other", max_steps=4, checkpoint_every=2)).fit()
    first_run(data, tmp_path / "run")
    step = step_folder(tmp_path / "run")
    shutil.rmtree(step)
    step.symlink_to(step_folder(tmp_path / "other"), target_is_directory=True)
    with pytest.raises(CheckpointError, match=rf"{STEP} is a symbolic link to .*other.*; phd never resumes from"):
        Trainer(tiny_config(data, tmp_path / "run", max_steps=4))
    linked = tmp_path / "run" / "checkpoints" / "step_00000004"
    linked.symlink_to(tmp_path / "other" / "checkpoints" / "step_00000004", target_is_directory=True)
    capsys.readouterr()
    for how in (["--step", "4"], []):
        run_or_step = str(tmp_path / "run") if how else str(linked)
        assert main(["export", run_or_step, *how, "--out", str(tmp_path / "export")]) == 1
        err = capsys.readouterr().err.strip()
        assert "step_00000004 is a symbolic link" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("name", ["__0_0.distcp", "meta.json"])
def test_a_linked_file_in_a_step_folder_is_refused(data, tmp_path, name):
    """Even a link to an identical copy: a file of a checkpoint is read from the checkpoint's own folder only."""
    first_run(data, tmp_path)
    file = step_folder(tmp_path) / name
    copy = tmp_path / "elsewhere" / name
    copy.parent.mkdir()
    shutil.copyfile(file, copy)
    file.unlink()
    file.symlink_to(copy)
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)} is a symbolic link to .*elsewhere"):
        Trainer(tiny_config(data, tmp_path, max_steps=4))
