"""File-system helpers shared by data building, model export, conversion and training.

The output rule every command follows (`phd data`, `phd export`, `phd convert`, the trainer's `model/`): phd
never deletes or overwrites anything it did not write. A folder phd writes carries a marker file naming its
kind; an existing non-empty `--out` is replaced only if it carries the marker of the same kind and the caller
passed `overwrite`. A folder without the marker is the user's, whatever files it holds (a folder holding only a
config.json and a tokenizer.json once passed for an old phd export and was replaced). The new folder is built in
a temporary sibling, fsynced, and published by renames, so an interrupted command leaves the old folder or the
new one, never a mix; leftovers of a killed command are cleaned (or restored) by the next one. A write the OS
refuses (a full disk) is one line naming the file (WriteError).

A single output file (`phd eval --out FILE`) follows the same rule: the JSON phd writes names its kind under
FILE_KIND_KEY, its first key; an existing FILE is replaced only if it is phd's JSON of the same kind, by a
temporary sibling renamed over it. Anything else (a user's notes, a checkpoint's meta.json) is refused.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from .errors import PHDError

MARKER = ".phd-output"
TMP_TAG = ".phd-tmp-"
OLD_TAG = ".phd-old-"


FILE_KIND_KEY = "phd_output"  # first key of a JSON file phd writes: its kind (e.g. "phd-eval")
MAX_OUTPUT_FILE = 16 << 20  # larger files are never phd's JSON output, and are not read to find out


class OutputError(PHDError, ValueError):
    """An output folder or file cannot be written without losing something; the message names it and the way out."""


WRITE_FIX = "free space (or choose a folder on another disk) and run again"


class WriteError(PHDError, OSError):
    """The OS refused a write (a full disk, a quota, a read-only file system): one line naming the file, not a
    traceback. Still an OSError, with the original errno, for callers that catch those."""

    def __init__(self, path: str | Path, reason: str, code: int | None, fix: str = WRITE_FIX) -> None:
        name = f" [{errno.errorcode[code]}]" if code in errno.errorcode else ""
        super().__init__(f"cannot write {path}: {reason}{name}; {fix}")
        self.errno, self.path, self.reason, self.fix = code, path, reason, fix

    def with_fix(self, fix: str) -> WriteError:
        """The same failure with another way out (a caller that knows more, e.g. where the trained weights are)."""
        return WriteError(self.path, self.reason, self.errno, fix)

    def moved(self, tmp: Path, out: Path) -> WriteError:
        """The same failure named at its place in `out`, for a file of the temporary folder that would become it
        (the temporary folder is gone by the time the user reads the message)."""
        path = Path(self.path)
        if path != tmp and tmp not in path.parents:
            return self
        return WriteError(out / path.relative_to(tmp), self.reason, self.errno, self.fix)


def write_error(path: str | Path, err: OSError, fix: str = WRITE_FIX) -> WriteError:
    """The WriteError of an OSError raised while writing `path`."""
    return WriteError(path, err.strerror or str(err) or type(err).__name__, err.errno, fix)


@contextlib.contextmanager
def reporting_write_errors(path: str | Path, fix: str = WRITE_FIX) -> Iterator[None]:
    """Turn an OS error of the writes inside into a WriteError naming `path`. An OSError without an errno (raised
    by code, not by the OS) passes unchanged: it is a bug or a test's fault, and its traceback is wanted."""
    try:
        yield
    except PHDError:
        raise
    except OSError as err:
        if err.errno is None:
            raise
        raise write_error(path, err, fix) from None


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
    """The kind of phd output `path` holds, read from its marker only; None (the user's folder) without one.

    File names prove nothing: a user's folder of a config.json and a tokenizer.json looks like an old export, and
    guessing from names once let `--overwrite` delete such a folder."""
    marker = path / MARKER
    if not marker.is_file() or marker.is_symlink():
        return None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        kind = json.loads(marker.read_text()).get("kind")
        return kind if isinstance(kind, str) else None
    return None


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
    _refuse_foreign(out, output_kind(out), kind, "is not empty and", "deletes", "a new or empty folder",
                    f"no {MARKER} marker file")
    if not overwrite:
        raise OutputError(f"--out {out} already holds a {kind}; pass --overwrite to replace it, or another --out")


def output_file_kind(path: Path) -> str | None:
    """The kind of phd JSON output file `path` is (its FILE_KIND_KEY), else None (any other file, unread if large)."""
    with contextlib.suppress(OSError, ValueError, RecursionError):
        if path.stat().st_size <= MAX_OUTPUT_FILE:
            data = json.loads(path.read_bytes())
            kind = data.get(FILE_KIND_KEY) if isinstance(data, dict) else None
            return kind if isinstance(kind, str) else None
    return None


def check_out_file(out: Path, kind: str) -> None:
    """Refuse, before any work, an `out` file that phd did not write as output of this kind (see the module
    docstring); a new path, or phd's own file of the same kind, passes."""
    out = Path(out)
    _clean_leftovers(out)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_file():
        raise OutputError(f"--out {out} exists and is not a plain file; pass a new file name")
    _refuse_foreign(out, output_file_kind(out), kind, "exists and is", "overwrites", "a new file name",
                    f"no {FILE_KIND_KEY!r} key")


def _refuse_foreign(out: Path, found: str | None, kind: str, state: str, verb: str, instead: str,
                    unmarked: str) -> None:
    """One message for an --out that phd did not write as output of `kind` (`found`: what phd wrote there;
    `unmarked`: what the user's folder or file lacks, so the message says how phd tells its own output apart)."""
    if found != kind:
        what = f"phd {found} output, not {kind}" if found else f"not written by phd ({unmarked})"
        raise OutputError(f"--out {out} {state} {what}; phd never {verb} what it did not write: pass {instead}, or "
                          "delete it yourself")


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w", tmp: Path | None = None, chmod: int | None = None) -> Iterator[IO]:
    """An open temporary sibling of `path` that replaces `path` when the block ends without an exception (flushed,
    fsynced, optionally chmod-ed, renamed over it, the folder fsynced), so a kill leaves the old file or the new one,
    never half of one; an exception removes the temporary file. `tmp`: its name where a caller's own clean-up must
    recognise it (default: `.NAME` + TMP_TAG + pid-token, which _clean_leftovers removes)."""
    tmp = tmp or path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if chmod is not None:
            os.chmod(tmp, chmod)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_output_file(out: str | Path, kind: str, data: dict) -> Path:
    """Write `data` as JSON marked with its kind (the first key) to `out`, a new file or phd's own of the same kind
    (checked again: a long command may have started before the file appeared); atomically (atomic_file)."""
    out = Path(out)
    check_out_file(out, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as f:
        marked = {FILE_KIND_KEY: kind, **{k: v for k, v in data.items() if k != FILE_KIND_KEY}}
        f.write(json.dumps(marked, indent=2) + "\n")
    return out


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
        with reporting_write_errors(out):
            publish_dir(tmp, out, kind)
    except WriteError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise err.moved(tmp, out) from None
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
    """Temp folders (and files) of killed commands are removed; a backup whose replacement never landed is
    restored."""
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
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:  # the temporary file of an output file (write_output_file)
            path.unlink(missing_ok=True)


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
        with reporting_write_errors(self.path):
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
        try:
            with reporting_write_errors(self.path):
                f.seek(0)
                f.truncate()
                f.write(f"{os.getpid()} on {socket.gethostname()}\n")
                f.flush()
        except BaseException:
            f.close()  # drops the lock: a holder whose pid could not be recorded does not keep the folder
            raise
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
