"""File-system helpers shared by data building, model export, conversion and training.

The output rule every command follows (`phd data`, `phd export`, `phd convert`, the trainer's `model/`): phd
never deletes or overwrites anything it did not write. A folder phd writes carries a marker file naming its
kind; an existing non-empty `--out` is replaced only if it carries the marker of the same kind and the caller
passed `overwrite`. The new folder is built in a temporary sibling, fsynced, and published by renames, so an
interrupted command leaves the old folder or the new one, never a mix; leftovers of a killed command are
cleaned (or restored) by the next one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import PHDError

MARKER = ".phd-output"
TMP_TAG = ".phd-tmp-"
OLD_TAG = ".phd-old-"
# Folders phd wrote before the marker existed: replaceable when they hold only these files.
LEGACY_FILES = {
    "phd-data": {"meta.json", "train.bin", "val.bin", "tokenizer.json"},
    "phd-export": {"config.json", "model.safetensors", "tokenizer.json", "checksums.json"},
}


class OutputError(PHDError, ValueError):
    """An output folder cannot be written without losing something; the message names it and the way out."""


def cache_root() -> Path:
    """phd's own cache (corpus downloads, compiled kernels): $PHD_CACHE_DIR, else $XDG_CACHE_HOME/phd, else
    ~/.cache/phd."""
    root = os.environ.get("PHD_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "phd"
    return Path(root).expanduser()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checksums that detect truncated or corrupted files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def output_kind(path: Path) -> str | None:
    """The kind of phd output `path` holds (its marker, or a legacy folder of phd's files only), else None."""
    marker = path / MARKER
    if marker.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            return json.loads(marker.read_text()).get("kind")
        return None
    names = {p.name for p in path.iterdir()}
    for kind, files in LEGACY_FILES.items():
        if names and names <= files and (kind != "phd-data" or _is_legacy_data(path)):
            return kind
    return None


def _is_legacy_data(path: Path) -> bool:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads((path / "meta.json").read_text()).get("format") == "phd-tokens-v1"
    return False


def _inside(a: Path, b: Path) -> bool:
    """True when a == b or a lies inside b (resolved, so links and `..` cannot hide it)."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def check_out(out: Path, kind: str, overwrite: bool, sources: Iterable[Path] = ()) -> None:
    """Refuse, before any work, an `out` that would cost the user something. See the module docstring."""
    out = Path(out)
    for source in sources:
        source = Path(source)
        if _inside(out, source) or _inside(source, out):
            raise OutputError(
                f"--out {out} is the source {source}, inside it or holds it; write to a separate folder"
            )
    _clean_leftovers(out)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise OutputError(f"--out {out} exists and is not a folder; pass a new or empty folder")
    if not any(out.iterdir()):
        return
    found = output_kind(out)
    if found != kind:
        what = f"phd {found} output, not {kind}" if found else "not written by phd"
        raise OutputError(
            f"--out {out} is not empty and {what}; phd never deletes what it did not write: pass a new or empty "
            "folder, or delete it yourself"
        )
    if not overwrite:
        raise OutputError(f"--out {out} already holds a {kind}; pass --overwrite to replace it, or another --out")


def new_temp_dir(out: Path) -> Path:
    """An empty sibling of `out`, unique to this process, with normal permissions (umask, not mkdtemp's 0700)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    return tmp


def publish_dir(tmp: Path, out: Path, kind: str) -> None:
    """Mark, fsync and rename the finished `tmp` to `out`; an old `out` is moved to a unique backup first and
    removed only once the new folder is in place (restored if the rename fails). The caller has run check_out."""
    (tmp / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
    for path in sorted(tmp.rglob("*"), reverse=True):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(tmp)
    if not out.exists():
        os.replace(tmp, out)
        fsync_dir(out.parent)
        return
    backup = out.with_name(f".{out.name}{OLD_TAG}{os.getpid()}-{secrets.token_hex(4)}")
    os.replace(out, backup)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(backup, out)
        raise
    fsync_dir(out.parent)
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def output_dir(out: str | Path, kind: str, overwrite: bool = False, sources: Iterable[Path] = ()) -> Iterator[Path]:
    """Check `out`, yield a temporary folder to fill, publish it as `out` on success, remove it on failure."""
    out = Path(out)
    check_out(out, kind, overwrite, sources)
    tmp = new_temp_dir(out)
    try:
        yield tmp
        publish_dir(tmp, out, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(out: Path) -> None:
    """Temp folders of killed commands are removed; a backup whose replacement never landed is restored."""
    if not out.parent.is_dir():
        return
    for path in out.parent.glob(f".{out.name}.phd-*"):
        tag = TMP_TAG if TMP_TAG in path.name else OLD_TAG if OLD_TAG in path.name else None
        if tag is None:
            continue
        pid = path.name.split(tag, 1)[1].split("-", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if tag == OLD_TAG and not out.exists():
            os.replace(path, out)
        else:
            shutil.rmtree(path, ignore_errors=True)


class DirLock:
    """An exclusive lock on a folder (flock on FOLDER/NAME, which records the holder's pid and host), so two
    processes never write one run. Released by release(), or by the kernel when the process dies."""

    def __init__(self, folder: Path, name: str = "train.lock") -> None:
        self.path = Path(folder) / name
        self._file = None

    def acquire(self) -> None:
        import fcntl

        if self._file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise LockedError(
                f"{self.path.parent} is in use by process {holder} ({self.path}); two processes on one run folder "
                "would overwrite each other's checkpoints and metrics: wait for it to finish, stop it, or choose "
                "another out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None


class LockedError(PHDError, RuntimeError):
    """Another process holds the lock of a folder; the message names its pid."""
