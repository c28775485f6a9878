"""Data-parallel FSDP2 with gloo on CPU, through real torchrun processes: equal losses, resume 2 -> 1 -> 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_utils import make_data, one_thread, tiny_config  # noqa: F401 (autouse fixture)

from phd.io import load_model
from phd.train import Trainer

STEPS = 4


def torchrun(nproc: int, config: Path, *overrides: str) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "phd", "train", str(config), *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def metric(run: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def rewind(run: Path, copy: Path, step: int) -> Path:
    """A copy of a run whose `latest` marker points at an earlier checkpoint (as if it had stopped there)."""
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    return copy


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = make_data(root / "data")
    kwargs = dict(max_steps=STEPS, batch_size=8, micro_batch=2, checkpoint_every=2, eval_every=2, eval_iters=1)
    single = Trainer(tiny_config(data, root / "single", **kwargs))
    single.fit()
    tiny_config(data, root / "fsdp", **kwargs).save(root / "fsdp.json")
    torchrun(2, root / "fsdp.json")
    return root, data, kwargs


def test_two_process_fsdp_equals_one_process(runs):
    root, _, _ = runs
    single, fsdp = root / "single", root / "fsdp"
    assert sorted(p.name for p in (fsdp / "checkpoints" / "step_00000004").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp",
    ]  # sharded: each rank wrote its own part
    for key in ("loss", "val_loss"):
        a, b = metric(single, key), metric(fsdp, key)
        assert list(a) == list(b) and len(a) >= 2
        torch.testing.assert_close(list(b.values()), list(a.values()), rtol=1e-5, atol=0)
    one, two = load_model(single), load_model(fsdp)
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)  # reduction order


def test_fsdp_equals_ddp(runs):
    root, data, kwargs = runs
    tiny_config(data, root / "ddp", data_parallel="ddp", **kwargs).save(root / "ddp.json")
    torchrun(2, root / "ddp.json")
    for key in ("loss", "val_loss"):
        fsdp, ddp = metric(root / "fsdp", key), metric(root / "ddp", key)
        assert list(fsdp) == list(ddp)
        torch.testing.assert_close(list(fsdp.values()), list(ddp.values()), rtol=1e-5, atol=0)


def test_resume_two_processes_on_one(runs):
    root, data, kwargs = runs
    run = rewind(root / "fsdp", root / "fsdp_to_one", 2)
    resumed = Trainer(tiny_config(data, run, **kwargs))
    assert resumed.progress.step == 2
    resumed.fit()
    expected = [v for s, v in metric(root / "single", "loss").items() if s > 2]
    torch.testing.assert_close([h["loss"] for h in resumed.progress.history], expected, rtol=1e-5, atol=0)


def test_resume_one_process_on_two(runs):
    root, data, kwargs = runs
    run = rewind(root / "single", root / "one_to_fsdp", 2)
    tiny_config(data, run, **kwargs).save(root / "one_to_fsdp.json")
    torchrun(2, root / "one_to_fsdp.json", "activation_checkpointing=true")  # recomputation changes no number
    losses = metric(run, "loss")
    assert list(losses) == list(range(1, STEPS + 1))
    expected = metric(root / "single", "loss")
    torch.testing.assert_close(list(losses.values()), list(expected.values()), rtol=1e-5, atol=0)
