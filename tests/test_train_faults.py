"""Faults and bad input: NaN/inf losses, SIGKILL during a save, full disk, corrupted checkpoints, mismatches."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_utils import make_data, one_thread, tiny_config  # noqa: F401 (autouse fixture)

from phd.commands import main
from phd.commands.train import EXIT_STOPPED
from phd.data.shards import DataError
from phd.io import CheckpointError
from phd.model import PHDTransformer
from phd.train import Trainer, TrainingError
from phd.train import checkpoint as ckpt
from phd.train.checkpoint import load_checkpoint, verify
from phd.train.trainer import StopSignal


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("faults") / "data")


def poison(trainer: Trainer, at_steps: set[int], value: float = float("nan")) -> None:
    """Make the loss of the given steps non-finite (through the trainer's forward seam)."""
    forward = trainer.forward_loss

    def faulty(inputs, targets):
        loss = forward(inputs, targets)
        return loss * value if trainer.progress.step + 1 in at_steps else loss

    trainer.forward_loss = faulty


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_nan_skip_leaves_parameters_and_continues(data, tmp_path, capsys):
    trainer = Trainer(tiny_config(data, tmp_path, max_steps=5, nan_policy="skip"))
    poison(trainer, {3}, float("inf"))
    trainer.fit(stop_after=2)
    before = params(trainer)
    trainer.fit(stop_after=3)
    for name, value in params(trainer).items():
        assert torch.equal(value, before[name]), name
    trainer.fit()
    history = trainer.progress.history
    assert [h.get("skipped", False) for h in history] == [False, False, True, False, False]
    assert trainer.progress.skipped == 1 and all(h["loss"] is not None for i, h in enumerate(history) if i != 2)
    assert "step skipped (nan_policy=skip)" in capsys.readouterr().err


def test_nan_stop_names_the_last_good_checkpoint(data, tmp_path):
    trainer = Trainer(tiny_config(data, tmp_path, max_steps=6, nan_policy="stop", checkpoint_every=2))
    poison(trainer, {4})
    with pytest.raises(TrainingError, match=r"non-finite loss=nan .*step 4.*step_00000002"):
        trainer.fit()
    assert verify(tmp_path / "checkpoints" / "step_00000002")["step"] == 2


def test_too_many_consecutive_skips_stop(data, tmp_path):
    trainer = Trainer(tiny_config(data, tmp_path, max_steps=8, max_skipped_steps=2))
    poison(trainer, {2, 3, 4, 5})
    with pytest.raises(TrainingError, match="3 steps in a row skipped, more than max_skipped_steps=2"):
        trainer.fit()


def test_resume_with_another_variant_names_the_fields(data, tmp_path):
    Trainer(tiny_config(data, tmp_path, variant="PHD-CSWA-2-4-8", max_steps=2, checkpoint_every=2)).fit()
    with pytest.raises(CheckpointError, match=r"repeat_k: 2 there vs 3 here.*window: 4 there vs 2 here"):
        Trainer(tiny_config(data, tmp_path, variant="PHD-CSWA-3-2-8", max_steps=4))


def test_vocab_mismatches_fail_before_training(tmp_path):
    data = make_data(tmp_path / "data", train_tokens=2_000, val_tokens=500)
    with pytest.raises(DataError, match="model vocab_size=256 .* vocab_size=300; set model.vocab_size=300"):
        Trainer(tiny_config(data, tmp_path / "run", model={"preset": "cpu-1m", "vocab_size": 256}))
    bad = make_data(tmp_path / "bad", train_tokens=2_000, val_tokens=500, tokenizer_vocab=310)
    with pytest.raises(DataError, match="tokenizer.json has 310 tokens but .* vocab_size=300"):
        Trainer(tiny_config(bad, tmp_path / "run2"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


DAMAGES = {  # what a disk or a hand does to a committed checkpoint -> the error that names it
    "flip": r"__0_0.distcp does not match its sha256", "truncate": r"__0_0.distcp does not match its sha256",
    "delete": r"__0_0.distcp is missing", "meta-flip": r"meta.json is corrupted",
    "meta-no-checksums": r"meta.json has no checksums", "meta-not-json": r"meta.json lacks step",
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_corrupted_checkpoint_is_detected_and_named(data, tmp_path, damage):
    Trainer(tiny_config(data, tmp_path, max_steps=2, checkpoint_every=2)).fit()
    step = tmp_path / "checkpoints" / "step_00000002"
    path = step / ("meta.json" if damage.startswith("meta") else "__0_0.distcp")
    raw = bytearray(path.read_bytes())
    if damage in ("flip", "meta-flip"):
        raw[len(raw) // 2 if damage == "flip" else 5] ^= 0xFF  # meta: invalid UTF-8 inside the JSON
        path.write_bytes(bytes(raw))
    elif damage == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 3]))
    elif damage == "delete":
        path.unlink()
    elif damage == "meta-no-checksums":
        path.write_text(json.dumps({k: v for k, v in json.loads(raw).items() if k != "checksums"}))
    else:
        path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=DAMAGES[damage]):
        Trainer(tiny_config(data, tmp_path, max_steps=4))


def test_full_disk_during_save_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    """A real ENOSPC inside DCP's own writer (its shard file is /dev/full), so the real CheckpointException, a
    BaseException, travels the real path."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    trainer = Trainer(tiny_config(data, tmp_path, max_steps=6, checkpoint_every=2))
    real_save = ckpt._dcp_save

    def full_disk(state, path):
        if trainer.progress.step == 4:
            (path / "__0_0.distcp").symlink_to("/dev/full")
        real_save(state, path)

    monkeypatch.setattr(ckpt, "_dcp_save", full_disk)
    with pytest.raises(CheckpointError, match="no space left on device.*checkpoint step_00000002 is intact") as err:
        trainer.fit()
    assert type(err.value.__cause__).__name__ == "CheckpointException"
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    monkeypatch.setattr(ckpt, "_dcp_save", real_save)
    resumed = Trainer(tiny_config(data, tmp_path, max_steps=6, checkpoint_every=2))
    assert resumed.progress.step == 2
    resumed.fit()
    assert resumed.progress.step == 6


# `phd train` whose step-4 save sleeps after the DCP files are written and before the commit (the test seam is
# the checkpoint module's `_dcp_save`), so the test can SIGKILL it there deterministically.
SLEEPY_SAVE = """
import sys, time
from phd.commands import main
from phd.train import checkpoint

real_save = checkpoint._dcp_save

def sleepy_save(state, path):
    real_save(state, path)
    if path.name.endswith("step_00000004"):
        print("[test hook] sleeping in the save of step 4", file=sys.stderr, flush=True)
        time.sleep(120)

checkpoint._dcp_save = sleepy_save
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_save_leaves_the_previous_checkpoint(data, tmp_path):
    """A real process killed with SIGKILL while its step-4 save is half done (DCP files written, not committed)."""
    config = tiny_config(data, tmp_path / "run", max_steps=6, checkpoint_every=2)
    config.save(tmp_path / "run.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLEEPY_SAVE, "train", str(tmp_path / "run.json")], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        for line in proc.stderr:
            if "[test hook] sleeping" in line:
                break
        else:
            pytest.fail(f"training exited with {proc.wait()} before the save of step 4")
        assert (tmp_path / "run" / "checkpoints" / ".tmp-step_00000004" / ".metadata").exists()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    model = PHDTransformer(config.model.build())
    assert load_checkpoint(root / "step_00000002", model)["step"] == 2

    straight = Trainer(tiny_config(data, tmp_path / "straight", max_steps=6))
    straight.fit()
    resumed = Trainer(config)
    assert resumed.progress.step == 2 and not (root / ".tmp-step_00000004").exists()
    resumed.fit()
    expected = [h["loss"] for h in straight.progress.history][2:]
    torch.testing.assert_close([h["loss"] for h in resumed.progress.history], expected, rtol=1e-6, atol=0)




def test_resume_with_another_data_order_warns(data, tmp_path, capsys):
    Trainer(tiny_config(data, tmp_path, max_steps=2, checkpoint_every=2)).fit()
    resumed = Trainer(tiny_config(data, tmp_path, max_steps=4, seed=1, seq_len=16))
    assert resumed.progress.step == 2
    err = capsys.readouterr().err
    assert "warning: the data order differs" in err and "seq_len: 32 then, 16 now, seed: 0 then, 1 now" in err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_ctrl_c_save_a_checkpoint_and_stop(data, tmp_path, signum):
    """What a scheduler does before preempting a job (SIGTERM), or a user's Ctrl-C: the run stops after the
    current step with a checkpoint, exits 75 (not 0: `phd train && next` must not go on), and resumes from it."""
    config = tiny_config(data, tmp_path / "run", max_steps=5_000, checkpoint_every=0)
    config.save(tmp_path / "run.json")
    proc, out, err = _interrupt(tmp_path, [signum])
    assert proc.returncode == EXIT_STOPPED == 75, err
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    step = verify(tmp_path / "run" / "checkpoints" / latest)["step"]
    assert 3 <= step < 5_000 and f"stopped: PHD-CSWA-2-4-8 step {step}" in out
    assert f"{signum.name}: stopped after step" in err
    assert Trainer(config).progress.step == step


def test_phd_train_exits_75_only_when_stopped_before_the_end(data, tmp_path, capsys, monkeypatch):
    """The command's status: a run a stop request ends early exits 75 and says so; resuming it to the end exits
    0 with the export. `phd train --help` documents both."""
    config = tiny_config(data, tmp_path / "run", max_steps=3, checkpoint_every=0)
    config.save(tmp_path / "run.json")
    with monkeypatch.context() as m:
        m.setattr(StopSignal, "requested", lambda self: True)  # as if SIGTERM came during step 1
        assert main(["train", str(tmp_path / "run.json")]) == 75
    out = capsys.readouterr().out
    assert "stopped: PHD-CSWA-2-4-8 step 1" in out and "(exit status 75)" in out
    assert verify(tmp_path / "run" / "checkpoints" / "step_00000001")["step"] == 1
    assert not (tmp_path / "run" / "model").exists()
    assert main(["train", str(tmp_path / "run.json")]) == 0
    assert "done: PHD-CSWA-2-4-8 step 3" in capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    assert "75 stopped before the end by SIGTERM or Ctrl-C" in capsys.readouterr().out


def test_a_second_ctrl_c_aborts():
    """The first Ctrl-C asks for a stop with a checkpoint; a second one raises KeyboardInterrupt at once (the
    `phd` command turns it into "interrupted", exit 130); the previous handlers come back afterwards."""
    before = signal.getsignal(signal.SIGINT)
    messages: list[str] = []
    with pytest.raises(KeyboardInterrupt), StopSignal(distributed=False, log=messages.append) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.requested() and stop.name == "SIGINT" and "Ctrl-C again to abort" in messages[0]
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
        pytest.fail("the second Ctrl-C did not abort")
    assert signal.getsignal(signal.SIGINT) is before


def _interrupt(tmp_path: Path, signals: list[signal.Signals]) -> tuple[subprocess.Popen, str, str]:
    """Start `phd train run.json`, send `signals` (back to back) once 3 steps are logged, wait for the end."""
    metrics = tmp_path / "run" / "metrics.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "phd", "train", str(tmp_path / "run.json")],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        while proc.poll() is None and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
            time.sleep(0.05)
        for signum in signals:
            proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc, out, err


def test_latest_moves_only_after_the_step_folder_is_in_place(data, tmp_path, monkeypatch):
    """The commit order: a failure of the step folder's rename leaves `latest` on the previous checkpoint."""
    trainer = Trainer(tiny_config(data, tmp_path, max_steps=4, checkpoint_every=2))
    trainer.fit(stop_after=2)
    real = os.replace

    def failing(src, dst):
        if Path(dst).name == "step_00000004":
            raise OSError(errno.EIO, "rename failed")
        real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", failing)
    with pytest.raises(CheckpointError, match="checkpoint step_00000002 is intact"):
        trainer.fit()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"
