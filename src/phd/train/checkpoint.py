"""Training checkpoints: sharded with torch.distributed.checkpoint (DCP), committed atomically, checksummed.

    RUN/checkpoints/step_00000200/   DCP files (.metadata, __<rank>_0.distcp): model, optimizer, RNG
                                     meta.json: step, world, model config, trainer/loader/scheduler state,
                                                sha256 of every other file of the folder, and
                                                meta_sha256, the sha256 of meta.json's own content
                                     config.json, tokenizer.json: the model config and tokenizer, for export
    RUN/checkpoints/latest           the name of the newest complete checkpoint

A save writes into `.tmp-step_N/`, computes checksums, renames the folder to `step_N/` and only then rewrites
`latest` (itself atomically). A process killed at any moment, or a full disk, leaves the previous checkpoint
and marker untouched; stale `.tmp-*` folders are removed on the next start. Loading verifies the checksums
and names the damaged file: meta.json against its own digest (a flipped digit in the loader position would
otherwise resume silently from the wrong place), and the folder's listing against meta.json (a file it does
not list, or lists but lacks, is refused). A step folder or file that is a symbolic link is refused, so a run
never resumes from another run's folder. DCP reshards on load, so a run saved by N processes resumes on M.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from ..config import SHAPE_FIELDS, PHDConfig
from ..fsutil import atomic_file, fsync_dir, sha256_file
from ..io import CONFIG, TOKENIZER, CheckpointError
from .parallelize import any_rank, unwrap

LATEST = "latest"
META = "meta.json"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
STEP_NAME = re.compile(rf"{PREFIX}\d{{8}}")
META_SUM = "meta_sha256"  # meta.json's key for the digest of its own content
# The keys of every meta.json written before META_SUM existed: such a checkpoint is read with the old rules.
LEGACY_META_KEYS = frozenset({"step", "world", "time", "model", "trainer", "checksums"})


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    with atomic_file(path, tmp=path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")) as f:  # cleaned at start
        f.write(text)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _no_dist() -> bool:
    return not dist.is_initialized()


def _dcp_save(state: dict[str, Any], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=_no_dist())


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)), no_dist=_no_dist())


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd, "rng": _rng_state()}


class Checkpointer:
    """Saves and restores the training state of one run directory (every rank calls every method)."""

    def __init__(self, run_dir: str | Path, keep: int, rank: int = 0, tokenizer: Path | None = None) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep, self.rank, self.tokenizer = keep, rank, tokenizer
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        _barrier()

    # ----- discovery -----
    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def committed(self) -> list[Path]:
        """This run's own committed step folders (a symbolic link is never one: it is neither counted nor pruned)."""
        return sorted(p for p in self.root.glob(f"{PREFIX}*") if not p.is_symlink() and (p / META).exists())

    # ----- save -----
    def save(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, model_config: PHDConfig,
        trainer_state: dict[str, Any], world: int,
    ) -> Path:
        name = step_dir_name(step)
        final, tmp = self.root / name, self.root / f"{TMP_PREFIX}{name}"
        previous = self.latest()
        error: BaseException | None = None
        try:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            _barrier()
            _dcp_save(_state(model, optimizer), tmp)  # collective: a failure on any rank raises on every rank
            if self.rank == 0:
                self._commit(tmp, final, step, world, model_config, trainer_state)
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - reported below, on every rank
            error = err
        if any_rank(error is not None):
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            where = f"checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
            hint = "Fix the cause and resume."
            if error is None:
                reason = "another rank failed; see its error"
            elif _is_enospc(error):
                reason, hint = "no space left on device", "Free disk space (or lower checkpoint_keep) and resume."
            else:
                reason = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error) else ''}"
            raise CheckpointError(
                f"saving checkpoint {name} to {self.root} failed ({reason}); nothing was committed and {where}. {hint}"
            ) from error
        return final

    def _commit(
        self, tmp: Path, final: Path, step: int, world: int, model_config: PHDConfig, trainer_state: dict[str, Any]
    ) -> None:
        """Checksum the written files, add meta/config/tokenizer, rename into place, then move `latest`."""
        model_config.save(tmp / CONFIG)
        if self.tokenizer is not None and self.tokenizer.exists():
            shutil.copyfile(self.tokenizer, tmp / TOKENIZER)
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        meta = {
            "step": step, "world": world, "time": time.time(), "model": model_config.to_dict(),
            "trainer": trainer_state, "checksums": {p.name: sha256_file(p) for p in files},
        }
        _write_atomic(tmp / META, meta_text(meta))
        if final.is_symlink():  # a link someone put there: drop the link, never what it points to
            final.unlink()
        elif final.exists():  # the same step saved again after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        _write_atomic(self.root / LATEST, final.name + "\n")
        self._prune(keep=final)

    def _prune(self, keep: Path) -> None:
        done = [p for p in self.committed() if p != keep]
        for old in done[: max(len(done) - (self.keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The committed checkpoint the `latest` marker in `root` names, or None for a fresh run.

    The name must be a step_NNNNNNNN folder of `root` itself: a marker naming anything else (`../other/...`,
    an absolute path) is refused, so a run never resumes from outside its own folder."""
    marker = root / LATEST
    if not marker.exists():
        return None
    name = marker.read_text(errors="replace").strip()
    if not STEP_NAME.fullmatch(name):
        raise CheckpointError(
            f"{marker} names {name!r}, not a step_NNNNNNNN folder of {root}; write the name of one of its step_* "
            f"folders into it, or delete it to start over"
        )
    path = root / name
    check_confined(path)
    if not (path / META).exists():
        raise CheckpointError(
            f"{marker} names {path.name}, which is missing or incomplete; delete {marker} to start over or "
            "write the name of another step_* folder into it"
        )
    return path


# Model fields a resume may change: the attention backend computes the same function.
RESUME_FREE_FIELDS = ("attn_backend",)


def check_model_config(
    saved: PHDConfig, current: PHDConfig, where: Path | str, fields: tuple[str, ...] | None = SHAPE_FIELDS
) -> None:
    """Refuse to load weights into a model of another shape or PHD variant (`fields`; None: every field but
    RESUME_FREE_FIELDS, what a resume checks, since rope_theta or norm_eps change the trained function too)."""
    if fields is None:
        fields = tuple(f.name for f in dataclasses.fields(saved) if f.name not in RESUME_FREE_FIELDS)
    diff = saved.differences(current, fields)
    if diff:
        fields_text = ", ".join(f"{k}: {a!r} there vs {b!r} here" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"{where} holds a {saved.name} model that does not match this run's {current.name} model "
            f"({fields_text}); use the same model config, or start a new run directory"
        )


def meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of meta.json's content without its own digest, as canonical JSON (sorted keys, no spaces): it
    covers every value (step, loader position, scheduler, token count...) whatever the file's layout."""
    body = {k: v for k, v in meta.items() if k != META_SUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def meta_text(meta: dict[str, Any]) -> str:
    """meta.json's text, carrying META_SUM: the digest is taken over the JSON as it will be read back (integer
    keys become strings), so a reader recomputes exactly it."""
    content = json.loads(json.dumps(meta))
    content[META_SUM] = meta_digest(content)
    return json.dumps(content, indent=2) + "\n"


def _fix(path: Path) -> str:
    """The way out of a refused checkpoint, for every message of verify()."""
    return (f"resume from an earlier step: delete {path} and write the name of an earlier step_* folder into "
            f"{path.parent / LATEST} (or delete that marker to start over)")


def check_confined(path: Path) -> None:
    """Refuse a step folder that is a symbolic link or resolves outside the folder that holds it: a link into
    another run would otherwise resume (and train on) that run's state."""
    if path.is_symlink() or (path.exists() and path.resolve() != path.parent.resolve() / path.name):
        what = f"is a symbolic link to {os.readlink(path)}" if path.is_symlink() else f"resolves to {path.resolve()}"
        raise CheckpointError(
            f"{path} {what}, not a folder of {path.parent}; phd never resumes from another folder's checkpoint: copy "
            f"that checkpoint folder here instead of linking it, or {_fix(path)}"
        )


def _check_entries(path: Path) -> None:
    """Every entry of the step folder must be a plain file, not a link (which could point into another run) nor a
    folder (which DCP never writes); checked before any of them is read."""
    with os.scandir(path) as listing:
        entries = sorted(listing, key=lambda e: e.name)
    for entry in entries:
        if entry.is_symlink():
            raise CheckpointError(f"{Path(entry.path)} is a symbolic link to {os.readlink(entry.path)}; phd never "
                                  f"reads checkpoint files through links: copy the file instead, or {_fix(path)}")
        if not entry.is_file(follow_symlinks=False):
            raise CheckpointError(f"{Path(entry.path)} is not a plain file: checkpoint {path.name} was not written "
                                  f"by phd as it is; {_fix(path)}")


def _read_meta(path: Path) -> dict[str, Any]:
    """meta.json parsed, with the fields every phd checkpoint has."""
    meta_path = path / META
    if not meta_path.exists():
        raise CheckpointError(f"{path} has no {META}: the save never completed; {_fix(path)}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_path} is corrupted ({err}); {_fix(path)}") from None
    sums = meta.get("checksums") if isinstance(meta, dict) else None
    missing = [k for k in ("step", "model", "trainer", "world") if not isinstance(meta, dict) or k not in meta]
    if not isinstance(sums, dict) or not sums or missing:
        what = f"lacks {', '.join(missing)}" if missing else "has no checksums"
        raise CheckpointError(f"{meta_path} {what}: not a complete phd checkpoint; {_fix(path)}")
    return meta


def _check_meta_sum(path: Path, meta: dict[str, Any]) -> bool:
    """meta.json against its own digest; True for an older phd's meta.json without one, accepted only with exactly
    the keys those versions wrote (a digest key whose name was corrupted is not taken for an old checkpoint)."""
    meta_path = path / META
    if META_SUM in meta:
        if meta[META_SUM] != meta_digest(meta):
            raise CheckpointError(f"{meta_path} does not match its own checksum ({META_SUM}): a value in it was "
                                  f"changed or corrupted; {_fix(path)}")
        return False
    if set(meta) != LEGACY_META_KEYS:
        extra = ", ".join(sorted(set(meta) - LEGACY_META_KEYS)) or "none"
        raise CheckpointError(f"{meta_path} has no {META_SUM} and not the fields an older phd wrote (unknown: "
                              f"{extra}): it is corrupted or not phd's; {_fix(path)}")
    return True


def _check_listing(path: Path, sums: dict[Any, Any]) -> None:
    """The names meta.json lists are plain file names of the folder, and they are all of its files but meta.json:
    an unlisted file (a shard that was never checksummed) or a listed one that is gone is refused."""
    for name in sums:
        if not isinstance(name, str) or name in ("", ".", "..", META) or Path(name).name != name or "\\" in name:
            raise CheckpointError(f"{path / META} lists {name!r}, not a file name of {path}; the checkpoint is not "
                                  f"phd's; {_fix(path)}")
    for name in sums:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} is missing: checkpoint {path.name} is incomplete; {_fix(path)}")
    for name in sorted(p.name for p in path.iterdir()):
        if name != META and name not in sums:
            raise CheckpointError(f"{path / name} is not listed in {META}'s checksums: checkpoint {path.name} holds "
                                  f"a file phd did not checksum; {_fix(path)}")


def verify(path: Path) -> dict[str, Any]:
    """meta.json of a committed checkpoint, after checking it and every file of the folder.

    Refused, each with one line naming the file: a step folder or file that is a symbolic link (or a folder
    inside); a meta.json that is not JSON, lacks a field, or does not match its own digest (META_SUM); a listed
    name that is not a plain file name of the folder; a listed file that is missing or differs from its sha256;
    a file the list does not name. Only plain file names of the checkpoint's own folder are read.

    Checkpoints written before META_SUM existed (meta.json with exactly LEGACY_META_KEYS) are accepted with the
    old rules plus the listing check, and a warning: those versions listed every file of the folder, so a real
    one passes, and refusing it would strand every run in progress; a corrupted value in such a meta.json cannot
    be detected, which the warning says. A meta.json with other keys and no digest is refused.
    """
    check_confined(path)
    if path.is_dir():
        _check_entries(path)
    meta = _read_meta(path)
    legacy = _check_meta_sum(path, meta)
    sums = meta["checksums"]
    _check_listing(path, sums)
    for name, expected in sums.items():
        if sha256_file(path / name) != expected:
            raise CheckpointError(f"{path / name} does not match its sha256 in {META}: checkpoint {path.name} is "
                                  f"truncated or corrupted; {_fix(path)}")
    if legacy:
        warnings.warn(f"{path / META} was written by an older phd and carries no checksum of its own: its step, "
                      "loader and schedule state are trusted unchecked (every other file is checked); the next "
                      "checkpoint this run saves carries one", UserWarning, stacklevel=2)
    return meta


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Verify and restore a checkpoint into `model` (and, given an optimizer, it and the RNG); returns meta.json.

    Every rank calls it; `model` may be plain or FSDP-sharded, with any number of processes.
    """

    meta = verify(path)
    check_model_config(PHDConfig.from_dict(meta["model"]), unwrap(model).config, path, fields=None)
    state = _state(model, optimizer)
    _dcp_load(state, path)
    if optimizer is None:
        set_model_state_dict(model, state["model"])
        return meta
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return meta


def _is_enospc(err: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain, including the per-rank failures DCP's CheckpointException wraps."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC or "No space left" in str(err):
            return True
        failures = getattr(err, "failures", None)  # {rank: (exception, traceback summary)}
        causes = [f[0] if isinstance(f, tuple) else f for f in (failures or {}).values()]
        if any(_is_enospc(cause) for cause in causes):
            return True
        err = err.__cause__ or err.__context__
    return False
