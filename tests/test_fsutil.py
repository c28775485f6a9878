"""phd's output rule through the real commands: nothing a user owns is deleted or overwritten (`phd data`,
`phd export`, `phd convert`, `phd eval --out`), backups and temp folders are handled, finished folders have normal
permissions."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from train_utils import make_data, one_thread, tiny_config  # noqa: F401 (autouse fixture)

from phd import fsutil
from phd.commands import main
from phd.fsutil import MARKER, TMP_TAG, OutputError, output_dir
from phd.train import Trainer

DEAD_PID = 4_194_304 + 4321  # above Linux's largest pid_max: never a live process


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def user_folder(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("keep me")
    (path / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "book.txt"
    path.write_text("".join(f"Line {i} of a small book, with words and more words.\n\n" for i in range(400)))
    return path


def data_cmd(text: Path, out: Path, *extra: str) -> list[str]:
    return ["data", str(text), "--out", str(out), "--vocab-size", "300", "--quiet", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    Trainer(tiny_config(make_data(root / "data"), root / "run", max_steps=2, checkpoint_every=2)).fit()
    return root / "run"


def test_data_never_replaces_a_user_folder(text, tmp_path, capsys):
    mine = user_folder(tmp_path / "mine")
    before = tree(mine)
    for extra in ((), ("--overwrite",)):
        assert main(data_cmd(text, mine, *extra)) == 1
        err = capsys.readouterr().err
        assert "not empty and not written by phd" in err and len(err.strip().splitlines()) == 1
    assert tree(mine) == before


def test_data_replaces_its_own_output_only_with_overwrite(text, tmp_path, capsys):
    out, sibling = tmp_path / "d", user_folder(tmp_path / "d.old")
    assert main(data_cmd(text, out)) == 0
    mode = stat.S_IMODE(out.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask, f"normal permissions, not mkdtemp's 0700: {oct(mode)}"
    assert (out / MARKER).exists()
    first = tree(out)
    assert main(data_cmd(text, out, "--val-fraction", "0.2")) == 1
    assert "already holds a phd-data; pass --overwrite" in capsys.readouterr().err
    assert tree(out) == first
    assert main(data_cmd(text, out, "--val-fraction", "0.2", "--overwrite")) == 0
    assert tree(out) != first
    assert (sibling / "notes.txt").read_text() == "keep me", "a sibling <out>.old is the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "d.old"], "no backup or temp folder is left"


def test_data_refuses_a_checkpoint_and_an_out_inside_its_input(text, run, tmp_path, capsys):
    step = run / "checkpoints" / "step_00000002"
    before = tree(step)
    assert main(data_cmd(text, step, "--overwrite")) == 1
    assert "not written by phd" in capsys.readouterr().err
    assert tree(step) == before
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(text.read_text())
    assert main(["data", str(folder), "--out", str(folder / "out"), "--quiet"]) == 1
    assert "inside it" in capsys.readouterr().err and not (folder / "out").exists()


def test_export_needs_overwrite_and_never_writes_into_the_run(run, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 0
    checkpoints = tree(run / "checkpoints")
    for bad in (run / "checkpoints", run / "checkpoints" / "step_00000002"):
        assert main(["export", str(run), "--out", str(bad), "--overwrite"]) == 1
    assert tree(run / "checkpoints") == checkpoints


def test_a_folder_without_the_marker_is_the_users_whatever_it_holds(run, text, tmp_path, capsys):
    """A user's folder of only config.json + tokenizer.json (or of a data folder's file names) once passed for an
    old phd export (data folder) and `--overwrite` replaced it: without phd's marker nothing is replaced."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}\n')
    (mine / "tokenizer.json").write_text('{"my": "tokenizer"}\n')
    data = tmp_path / "mydata"
    data.mkdir()
    (data / "meta.json").write_text('{"format": "phd-tokens-v1"}\n')
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        (data / name).write_text("mine\n")
    before = tree(tmp_path)
    for argv in (["export", str(run), "--out", str(mine), "--overwrite"], data_cmd(text, data, "--overwrite")):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert f"not written by phd (no {MARKER} marker file)" in err and "delete it yourself" in err, err
        assert len(err.splitlines()) == 1
    assert tree(tmp_path) == before


def test_convert_refuses_its_source_and_another_kind(run, tmp_path):
    pytest.importorskip("transformers")
    model = run / "model"
    before = tree(model)
    for argv in (["convert", str(model), str(model), "--to", "phd-hf", "--overwrite"],
                 ["convert", str(model), str(model / "hf"), "--to", "hf"]):
        with pytest.raises(SystemExit, match="is the source"):
            main(argv)
    assert main(["convert", str(model), str(tmp_path / "hf"), "--to", "phd-hf"]) == 0
    with pytest.raises(SystemExit, match="phd phd-hf-model output, not hf-model"):
        main(["convert", str(model), str(tmp_path / "hf"), "--to", "hf", "--overwrite"])
    assert tree(model) == before


def test_leftovers_of_a_killed_command_are_cleaned_or_restored(tmp_path):
    out = tmp_path / "out"
    with output_dir(out, "phd-data") as tmp:
        (tmp / "a").write_text("old")
    stale = tmp_path / f".out.phd-tmp-{DEAD_PID}-0000"
    user_folder(stale)
    live = tmp_path / f".out.phd-tmp-{os.getpid()}-0000"  # another command of this process, still working
    live.mkdir()
    with output_dir(out, "phd-data", overwrite=True) as tmp:
        (tmp / "a").write_text("new")
    assert not stale.exists() and live.exists() and (out / "a").read_text() == "new"
    # killed between the two renames: the old folder is the backup and `out` is gone -> restored
    backup = tmp_path / f".out.phd-old-{DEAD_PID}-0000"
    os.replace(out, backup)
    with pytest.raises(OutputError, match="already holds a phd-data"):
        output_dir(out, "phd-data").__enter__()
    assert (out / "a").read_text() == "new" and not backup.exists()


def test_a_failure_keeps_the_old_folder_and_leaves_no_temp(tmp_path):
    out = tmp_path / "out"
    with output_dir(out, "phd-export") as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), output_dir(out, "phd-export", overwrite=True) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("boom")
    assert (out / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def fail_publishing_renames(monkeypatch) -> None:
    """Make every rename of a phd temporary (the publishing step) fail as a full or vanished disk would."""
    real = os.replace

    def failing(src, dst):
        if TMP_TAG in Path(src).name:
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", failing)


def test_a_failed_publishing_rename_restores_the_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with output_dir(out, "phd-export") as tmp:
        (tmp / "a").write_text("old")
    fail_publishing_renames(monkeypatch)
    with pytest.raises(OSError, match="disk gone"), output_dir(out, "phd-export", overwrite=True) as tmp:
        (tmp / "a").write_text("new")
    assert (out / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def eval_cmd(run: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", str(run / "model"), "--data", str(run.parent / "data"), "--seq-len", "32", "--out", str(out),
            *extra]


def test_eval_out_never_overwrites_a_file_phd_did_not_write(run, tmp_path, capsys):
    """`phd eval --out` once replaced a checkpoint's meta.json and a user's notes: any file it did not write (or
    phd output of another kind, a folder, a link) is refused in one line, before scoring, and left as it was."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (tmp_path / "mynotes.txt").write_text("my notes\n")
    (tmp_path / "theirs.json").write_text('{"loss": 1.0}\n')
    (tmp_path / "bench.json").write_text('{"phd_output": "phd-bench", "loss": 1.0}\n')
    (tmp_path / "link.json").symlink_to(tmp_path / "mynotes.txt")
    targets = {copy / "checkpoints" / "step_00000002" / "meta.json": "not written by phd",
               copy / "model" / "config.json": "not written by phd",
               tmp_path / "mynotes.txt": "not written by phd", tmp_path / "theirs.json": "not written by phd",
               tmp_path / "bench.json": "phd phd-bench output, not phd-eval",
               tmp_path / "link.json": "not a plain file", copy / "checkpoints": "not a plain file"}
    before = tree(tmp_path)
    for target, why in targets.items():
        assert main(eval_cmd(copy, target)) == 1, target
        captured = capsys.readouterr()
        assert captured.err.startswith(f"phd eval: error: --out {target} exists and is {why}"), captured.err
        assert len(captured.err.strip().splitlines()) == 1 and "loss" not in captured.out  # refused before scoring
    assert tree(tmp_path) == before


def test_eval_out_replaces_its_own_file_atomically(run, tmp_path, capsys, monkeypatch):
    """phd's own eval JSON (its first key says so) is replaced, through a temporary file renamed over it: a failed
    write leaves the previous file whole, and a killed eval's temporary file is cleaned by the next one."""
    out = tmp_path / "results" / "eval.json"
    assert main(eval_cmd(run, out, "--max-tokens", "32")) == 0
    first = json.loads(out.read_text())
    assert list(first)[0] == "phd_output" and first["phd_output"] == "phd-eval" and first["loss"]["windows"] == 1
    stale = out.with_name(f".eval.json{TMP_TAG}{DEAD_PID}-0000")  # the temporary file of a killed eval
    stale.write_text('{"phd_output": "phd-eval", "lo')
    assert main(eval_cmd(run, out, "--max-tokens", "64")) == 0
    assert json.loads(out.read_text())["loss"]["windows"] == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["eval.json"]
    written = out.read_bytes()
    fail_publishing_renames(monkeypatch)
    with pytest.raises(OSError, match="disk gone"):
        main(eval_cmd(run, out, "--max-tokens", "96"))
    assert out.read_bytes() == written and sorted(p.name for p in out.parent.iterdir()) == ["eval.json"]
    capsys.readouterr()


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    """The one atomic writer (eval JSON, checkpoint meta and pointer, kernel records, safetensors headers): the
    old file survives an exception in the block and no temporary file stays; success replaces it, with the asked
    permissions; a caller's temporary name is used (the checkpointer cleans its own names)."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), fsutil.atomic_file(path, "wb") as f:
        f.write(b"half")
        raise RuntimeError("boom")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    with fsutil.atomic_file(path, "wb", chmod=0o640) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o640
    seen = []
    with fsutil.atomic_file(path, tmp=tmp_path / ".tmp-f") as f:
        seen = sorted(p.name for p in tmp_path.iterdir())
        f.write("text")
    assert seen == [".tmp-f", "f.bin"] and path.read_text() == "text"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
