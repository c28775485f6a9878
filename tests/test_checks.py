"""Bad input to the API and the commands: one clear line naming the value and what is allowed, never a
traceback or a crash (0 tokens, ids out of range, too long inputs, bad numbers, a missing GPU, NaN weights,
corrupted token shards)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_utils import make_data, one_thread, tiny_config  # noqa: F401 (autouse fixture)

from phd import ConfigError, PHDConfig, PHDTransformer
from phd.commands import main
from phd.data.shards import DataError, open_shards
from phd.errors import InputError
from phd.io import CheckpointError, load_model, save_model
from phd.train import TrainConfigError, Trainer, build_config


@pytest.fixture(scope="module")
def model() -> PHDTransformer:
    cfg = PHDConfig.from_name("PHD-CSWA-2-2-4", vocab_size=50, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                              d_ff=32, max_seq_len=16)
    return PHDTransformer(cfg).eval()


@pytest.mark.parametrize("ids, message", [
    (torch.zeros(1, 0, dtype=torch.long), r"seq_len >= 1, got \(1, 0\)"),
    (torch.tensor([[3, 50]]), r"token id 50, outside the vocabulary \[0, 50\)"),
    (torch.tensor([[-1, 3]]), r"token id -1, outside the vocabulary"),
    (torch.ones(1, 3), "must hold integer token ids"),
])
def test_model_input_is_checked(model, ids, message):
    with pytest.raises(InputError, match=message):
        model(ids)


@pytest.mark.parametrize("override, message", [
    ({"lr": "abc"}, "lr='abc' is invalid: must be a number"),
    ({"betas": 0.9}, r"betas=0.9 is invalid: must be two numbers"),
    ({"eps": -1}, "eps=-1 is invalid: must be a finite number > 0"),
    ({"seq_len": 600}, "seq_len=600 is invalid: must be <= model.max_seq_len=512"),
    ({"clip": "x"}, "clip='x' is invalid: must be a number or null"),
    ({"seed": "abc"}, r"seed='abc' is invalid: must be an integer in \[0, 4294967295\]"),
    ({"seed": -1}, r"seed=-1 is invalid: must be an integer in \[0, 4294967295\]"),
    ({"seed": True}, "seed=True is invalid: must be an integer"),
    ({"compile": "maybe"}, "compile='maybe' is invalid: must be true or false"),
    ({"progress": "abc"}, "progress='abc' is invalid: must be true or false"),
    ({"activation_checkpointing": 1}, "activation_checkpointing=1 is invalid: must be true or false"),
    ({"out": 5}, "out=5 is invalid: give the run folder"),
])
def test_bad_numbers_name_the_field(tmp_path, override, message):
    base = {"data": str(tmp_path), "max_steps": 1, "batch_size": 8, "micro_batch": 4, "model.preset": "cpu-1m"}
    with pytest.raises(TrainConfigError, match=message):
        build_config(None, {**base, **override})


def test_the_train_command_reports_bad_numbers_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "phd", "train", "--preset", "cpu-1m", f"data={tmp_path}",
                             "max_steps=1", "lr=abc"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: lr='abc' is invalid: must be a number")


def test_an_out_that_cannot_be_a_folder_is_one_line(tmp_path, capsys):
    """`out=/proc/x` (and a file) once ended in mkdir's traceback: one line naming out and what to give instead."""
    data = make_data(tmp_path / "data", train_tokens=2_000, val_tokens=500)
    (tmp_path / "afile").write_text("mine\n")
    for out in ("/proc/x", str(tmp_path / "afile")):
        argv = ["train", "--preset", "cpu-tiny", "model.vocab_size=300", f"data={data}", f"out={out}", "max_steps=1",
                "seq_len=32", "batch_size=4", "micro_batch=4", "progress=false", "device=cpu"]
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error (rank 0): out={out!r} is invalid: the run folder cannot be created ("), err
        assert err.endswith("give a folder you can write") and len(err.splitlines()) == 1
    assert (tmp_path / "afile").read_text() == "mine\n"


@pytest.mark.parametrize("kind", ["inference", "training", "scaling", "serving", "compile"])
def test_bench_refuses_bad_thread_counts(kind, capsys):
    """`phd bench inference --threads -1` once ended in torch's set_num_threads traceback."""
    with pytest.raises(SystemExit) as exit_:
        main(["bench", kind, "--threads", "-1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --threads: -1 is invalid: must be an integer >= 1" in err


@pytest.fixture
def export(tmp_path, model) -> Path:
    return save_model(model, tmp_path / "export")


@pytest.mark.parametrize("argv, message", [
    (["--threads", "-1"], "argument --threads: -1 is invalid: must be an integer >= 1"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: 0 is invalid"),
])
def test_generate_refuses_bad_numbers(export, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--checkpoint", str(export), "--prompt-ids", "1,2", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_eval_refuses_negative_max_tokens(export, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(export), "--data", str(tmp_path), "--max-tokens", "-5"])
    assert exit_.value.code == 2 and "--max-tokens: -5 is invalid: must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(export, capsys):
    assert main(["generate", "--checkpoint", str(export), "--prompt-ids", "1,2", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU is visible" in err and len(err.strip().splitlines()) == 1


def test_generate_refuses_nan_weights(tmp_path, model, capsys):
    broken = PHDTransformer(model.config)
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.norm.weight[0] = float("nan")
    with pytest.raises(Exception, match="NaN or inf weights in norm.weight"):
        save_model(broken, tmp_path / "nan")  # phd never writes such an export
    from safetensors.torch import load_file, save_file

    good = save_model(model, tmp_path / "x")
    state = load_file(good / "model.safetensors")
    state["norm.weight"][0] = float("nan")
    save_file(state, good / "model.safetensors")
    (good / "checksums.json").unlink()
    assert main(["generate", "--checkpoint", str(good), "--prompt-ids", "1,2"]) == 2
    err = capsys.readouterr().err
    assert "NaN or inf weights in norm.weight" in err and "Traceback" not in err


def edit_config(folder: Path, **changes) -> dict:
    """Change fields of a model folder's config.json, as a user editing it by hand; returns the old values."""
    config = json.loads((folder / "config.json").read_text())
    old = {k: config[k] for k in changes}
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return old


@pytest.mark.parametrize("field, value", [("repeat_k", 3), ("chunk", 2), ("window", 3), ("positions", "shared"),
                                          ("rope_theta", 500.0)])
def test_a_config_json_that_contradicts_its_weights_is_refused(model, tmp_path, capsys, field, value):
    """An edited config.json (K 2 -> 3, C 4 -> 2...) once loaded and generated as another variant, although the
    weights' metadata names the trained one: refused in one line naming the field, both values and the fix."""
    folder = save_model(model, tmp_path / "m")  # PHD-CSWA-2-2-4
    old = edit_config(folder, **{field: value})[field]
    now, was = json.dumps(value), json.dumps(old)  # as config.json spells them
    message = (f"{folder}/config.json sets {field}={now}, but model.safetensors was written as PHD-CSWA-2-2-4 "
               f"with {field}={was}: config.json was edited or belongs to another model; set {field} back to "
               f"{was} (or use the config.json written with these weights)")
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    assert str(err.value) == message
    assert main(["generate", "--checkpoint", str(folder), "--prompt-ids", "1,2"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_configs_the_weights_allow_and_an_impossible_window(model, tmp_path, capsys):
    """What does not change what the weights compute (max_seq_len, attn_backend) may be edited; exports that
    recorded only the variant name are checked on it; a window beyond max_seq_len is refused as a config error."""
    folder = save_model(model, tmp_path / "m")
    edit_config(folder, max_seq_len=32, attn_backend="dense")
    assert load_model(folder).config.max_seq_len == 32
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt", "variant": "PHD-CSWA-2-2-4"})
    (folder / "checksums.json").unlink()
    edit_config(folder, chunk=8)
    with pytest.raises(CheckpointError, match="sets chunk=8, but model.safetensors was written as PHD-CSWA-2-2-4 "
                                              "with chunk=4"):
        load_model(folder)
    edit_config(folder, chunk=4, window=4096)
    with pytest.raises(ConfigError, match=rf"^{folder}/config.json: window=4096 is invalid: W must be <= "
                                          "max_seq_len=32"):
        load_model(folder)


def test_token_shards_are_checksummed_on_open(tmp_path):
    data = make_data(tmp_path / "data", train_tokens=2_000, val_tokens=500)
    assert set(json.loads((data / "meta.json").read_text())["sha256"]) == {"train.bin", "val.bin"}
    raw = bytearray((data / "train.bin").read_bytes())
    raw[100] ^= 0x01
    (data / "train.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train.bin does not match its sha256"):
        open_shards(data)


def test_training_on_ids_outside_the_vocabulary_is_one_clear_error(tmp_path):
    data = make_data(tmp_path / "data", train_tokens=2_000, val_tokens=500)
    tokens = np.fromfile(data / "train.bin", dtype=np.uint16)
    tokens[5] = 400
    from phd.data.shards import write_meta, write_split

    write_split(data, "train", tokens)
    write_meta(data, {k: v for k, v in json.loads((data / "meta.json").read_text()).items() if k != "sha256"})
    with pytest.raises(InputError, match="token id 400, outside the vocabulary"):
        Trainer(tiny_config(data, tmp_path / "run", max_steps=1, batch_size=60, micro_batch=60)).fit()
