"""phd's C++ kernels, compiled on first use with the machine's C++ compiler and cached; absent where they cannot be.

Two kernels, one library, float32 on an x86 CPU with AVX2 and FMA:
- `rows_linear` (csrc/rows_linear.cpp): y = x @ w.T + b for 1 to 8 rows, at about the cost of reading w once (the
  decode step's linears; see weights.py);
- `hidden_attention` (csrc/hidden_attention.cpp): a PHD step's hidden queries over their request's originals in a
  paged KV cache, its hidden window and the step's hidden set, read in place (the vLLM plugin; phd.vllm.model).
The library is compiled against the running PyTorch's headers and libraries (`$CXX`, else `c++`; about 13 s, once
per set of sources, flags, C++ standard and PyTorch version) into $PHD_CACHE_DIR/kernels and registered as
`torch.ops.phd_kernels.*`. Where it cannot be (no compiler, not x86, no AVX2, PHD_KERNELS=0),
`rows_linear_op()` returns None, after one warning if compiling failed, and callers use PyTorch's own kernels:
results never depend on it, only speed.

Loading a shared library runs its code, so the cache is trusted only as far as it is safe:
- a library is loaded only if it is the file that was built: its size and sha256 are recorded beside it
  (`<name>.json`, written and fsynced before the library is published by an atomic rename) and checked before
  loading; a truncated or otherwise changed file (which would crash the process with a bus error, or fail to load on
  every run) is built again;
- the folder must be the user's own and not writable by group or others, and so must the files (another user
  could plant a library there); otherwise phd says so and builds into a private folder instead;
- a failed build is remembered (`<name>.failed`, with the compiler's error), so later processes warn briefly instead
  of compiling again for ~13 s; a new key (sources, flags, standard, PyTorch version) or another compiler tries again.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..fsutil import atomic_file, cache_root, fsync_dir, sha256_file

ROWS_LINEAR_MAX_ROWS = 8  # csrc kMaxRows: from 16 rows on MKL's packed GEMM is faster (no longer weight-bound)
_SOURCES = tuple(Path(__file__).with_name("csrc") / name for name in ("rows_linear.cpp", "hidden_attention.cpp"))
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fPIC", "-shared",
          "-fopenmp"]  # OpenMP: ATen's parallel_for inside the kernel runs on PyTorch's own thread pool
# torch.utils.cpp_extension builds extensions with -std=c++20 from PyTorch 2.13 on (2.14's headers refuse anything
# older) and with -std=c++17 before; it hard-codes the flag and exposes no constant or function to ask, hence this.
CXX20_FROM = (2, 13)
_loaded: dict[str, Callable | None] = {}


def cxx_standard(version: str | None = None) -> str:
    """The C++ standard torch's own extension builder compiles with for this PyTorch version (default: the running
    one): "c++20" from 2.13 on (nightlies and local builds of 2.13 included), "c++17" before. A version that does not
    parse is taken as a new one."""
    found = re.match(r"\s*(\d+)\.(\d+)", version or torch.__version__)
    if found is None:
        return "c++20"
    return "c++20" if (int(found[1]), int(found[2])) >= CXX20_FROM else "c++17"


def _flags() -> list[str]:
    """The compiler flags, the standard of the running PyTorch included (so it is part of the cache key)."""
    return [*_FLAGS, f"-std={cxx_standard()}"]


def _cpu_supports_kernel() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _compile_command(compiler: str, out: Path) -> list[str]:
    from torch.utils import cpp_extension  # the include and library folders of the running PyTorch

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [compiler, *_flags(), f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *(f"-I{p}" for p in cpp_extension.include_paths()), *map(str, _SOURCES),
            *(f"-L{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu", "-o", str(out)]


def _library_path(folder: Path | None = None) -> Path:
    """Where the compiled kernels live (in `folder`, default the cache's kernels/): named by a digest of the sources,
    the flags (C++ standard included) and the PyTorch version, so that any of them changing compiles anew."""
    sources = b"".join(source.read_bytes() for source in _SOURCES)
    key = hashlib.sha256(sources + " ".join([*_flags(), torch.__version__]).encode()).hexdigest()[:16]
    return (folder or cache_root() / "kernels") / f"phd_kernels-{key}.so"


def _record_path(lib: Path) -> Path:
    return lib.with_suffix(".json")  # {"size", "sha256"} of the library as built


def _failure_path(lib: Path) -> Path:
    return lib.with_suffix(".failed")  # {"compiler", "error"} of a build that failed


# ----- trust: only the user's own files in the user's own folder -----


def _untrusted(path: Path, folder: bool) -> str | None:
    """Why `path` may hold another user's code (None when it cannot): a folder or file not owned by this user, or
    writable by group or others, or (a file) not a plain file. Symbolic links to a folder are judged by the link and
    the folder both."""
    try:
        link = os.lstat(path)
        info = os.stat(path) if folder else link
    except OSError as err:
        return f"cannot be examined ({err.strerror})"
    if folder and not stat.S_ISDIR(info.st_mode):
        return "is not a folder"
    if not folder and not stat.S_ISREG(info.st_mode):
        return "is not a plain file"
    getuid = getattr(os, "getuid", None)  # absent on Windows, where the kernel is not built
    uid = getuid() if getuid is not None else None
    for what in (link, info):
        if uid is not None and what.st_uid != uid:
            return f"is owned by uid {what.st_uid}, not by you (uid {uid})"
    writable = [who for who, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if info.st_mode & bit]
    if writable:
        return f"is writable by {' and '.join(writable)} (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _private_dir(root: Path) -> Path:
    """A fresh folder only this process's user can use (mode 0700), removed at exit; under `root` when it can be."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        made = Path(tempfile.mkdtemp(prefix="kernels-private-", dir=root))
    except OSError:
        made = Path(tempfile.mkdtemp(prefix="phd-kernels-"))
    atexit.register(shutil.rmtree, made, ignore_errors=True)
    return made


def _kernel_dir() -> Path:
    """The folder to load and build kernels in: the cache's kernels/ when it is the user's own and writable by no one
    else; otherwise (said in one warning) the user's own kernels-<uid>/ beside it, else a fresh private folder."""
    root = cache_root()
    preferred = root / "kernels"
    preferred.mkdir(parents=True, exist_ok=True, mode=0o700)  # an unwritable cache raises: the caller warns
    why = _untrusted(preferred, folder=True)
    if why is None:
        return preferred
    getuid = getattr(os, "getuid", None)
    fallback = root / f"kernels-{getuid() if getuid is not None else 'user'}"
    with contextlib.suppress(OSError):
        fallback.mkdir(mode=0o700, exist_ok=True)
    if _untrusted(fallback, folder=True) is not None:
        fallback = _private_dir(root)
    warnings.warn(f"phd's kernel cache {preferred} {why}: another user could plant a library there, so phd does not "
                  f"load from it and uses {fallback} instead; make it yours and not writable by others "
                  f"(chown, chmod go-w) or set PHD_CACHE_DIR to a folder of your own", RuntimeWarning, stacklevel=4)
    return fallback


# ----- the cache entry: the library, its record, a remembered failure -----


def _damage(lib: Path) -> str | None:
    """Why the cached library must not be loaded (None when it is exactly the file that was built)."""
    record_file = _record_path(lib)
    for path in (lib, record_file):
        if not path.exists():
            return "missing" if path == lib else "without the record of its build (size and sha256)"
        why = _untrusted(path, folder=False)
        if why is not None:
            return f"{'' if path == lib else 'recorded in a file that '}{why}"
    try:
        record = json.loads(record_file.read_text())
        size, digest = int(record["size"]), str(record["sha256"])
    except (OSError, ValueError, TypeError, KeyError):
        return f"recorded in an unreadable {record_file.name}"
    found = lib.stat().st_size
    if found != size:
        return f"{found} bytes where {size} were built (truncated or overwritten)"
    if sha256_file(lib) != digest:
        return "changed since it was built (its sha256 differs)"
    return None


def _write_atomic(path: Path, text: str) -> None:
    """`text` into `path` atomically (fsutil.atomic_file), readable by all, writable by the user."""
    with atomic_file(path, chmod=0o644) as f:
        f.write(text)


def _compiler() -> tuple[str, str]:
    """(the compiler as configured, its resolved path); raises when there is none."""
    compiler = os.environ.get("CXX") or "c++"
    found = shutil.which(compiler)
    if found is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} not found)")
    return compiler, str(Path(found).resolve())


def _known_failure(lib: Path, resolved_compiler: str) -> str | None:
    """The error of an earlier failed build of this entry with this compiler (None: none, or not to be believed)."""
    marker = _failure_path(lib)
    if not marker.exists() or _untrusted(marker, folder=False) is not None:
        return None
    try:
        failure = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(failure, dict) or failure.get("compiler") != resolved_compiler:
        return None
    return str(failure.get("error") or "?")


def _first_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    return next((line for line in lines if "error:" in line.lower()), lines[0] if lines else "?")


def _build(lib: Path) -> None:
    compiler, resolved = _compiler()
    known = _known_failure(lib, resolved)
    if known is not None:
        raise RuntimeError(f"it failed to build before: {known[:200]}; delete {_failure_path(lib)} to try again")
    print(f"[phd: compiling the decode kernel into {lib} (once, about 13 s)]", file=sys.stderr, flush=True)
    lib.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = lib.with_name(f".{lib.name}.{os.getpid()}.tmp")
    try:
        done = subprocess.run(_compile_command(compiler, tmp), capture_output=True, text=True)
        if done.returncode or not tmp.is_file():
            error = f"{compiler} failed: {_first_error(done.stderr)}"
            # Remembered when the compiler itself refused (exit status > 0), not when a signal (the OOM killer, ^C)
            # stopped it; a read-only cache cannot remember, and the next process tries again.
            if done.returncode > 0:
                failure = {"compiler": resolved, "error": error, "torch": torch.__version__}
                with contextlib.suppress(OSError):
                    _write_atomic(_failure_path(lib), json.dumps(failure, indent=2) + "\n")
            raise RuntimeError(error)
        os.chmod(tmp, 0o755)  # a umask of 002 would leave it group-writable, which the loader refuses
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        record = {"size": tmp.stat().st_size, "sha256": sha256_file(tmp), "torch": torch.__version__,
                  "flags": _flags()}
        _write_atomic(_record_path(lib), json.dumps(record, indent=2) + "\n")  # before the library is published
        os.replace(tmp, lib)  # atomic: a process compiling at the same time never loads half a file
        fsync_dir(lib.parent)
        _failure_path(lib).unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)


def _load(lib: Path) -> Callable:
    """Register the library's ops with PyTorch and return rows_linear (the others are then torch.ops.phd_kernels.*)."""
    torch.ops.load_library(str(lib))
    op = torch.ops.phd_kernels.rows_linear
    # Shapes without running it, so that torch.compile can trace through a DecodeLinear.
    torch.library.register_fake("phd_kernels::rows_linear")(lambda x, w, bias: x.new_empty(x.shape[0], w.shape[0]))
    torch.library.register_fake("phd_kernels::hidden_attention")(
        lambda q, *_: q.new_empty(q.shape[1], q.shape[0] * q.shape[2], q.shape[3]))
    return op


def _load_or_build() -> Callable:
    """The op from a verified cache entry, built first when there is none or it is damaged."""
    lib = _library_path(_kernel_dir())
    damage = _damage(lib)
    if damage is not None:
        if damage != "missing":
            print(f"[phd: the cached decode kernel {lib} is {damage}; building it again]", file=sys.stderr,
                  flush=True)
        _build(lib)
    return _load(lib)


def rows_linear_op() -> Callable | None:
    """The compiled `rows_linear(x [M, K], w [N, K], bias [N] | None) -> [M, N]` op, or None where unavailable.

    Compiled (or loaded from the cache) on the first call of a process; the answer is kept for the process.
    """
    if "rows_linear" in _loaded:
        return _loaded["rows_linear"]
    op = None
    if os.environ.get("PHD_KERNELS", "1") != "0" and _cpu_supports_kernel():
        try:
            op = _load_or_build()
        except Exception as err:  # no compiler, a read-only cache, ...: PyTorch's kernels do the work
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            warnings.warn(f"phd's decode kernel is not available ({first[:400]}); decoding uses PyTorch's kernels "
                          "(slower for K > 1). Set CXX to a C++ compiler, or PHD_KERNELS=0 to silence this.",
                          RuntimeWarning, stacklevel=2)
    _loaded["rows_linear"] = op
    return op


def hidden_attention_op() -> Callable | None:
    """The compiled `hidden_attention` op (csrc/hidden_attention.cpp), or None where the library is unavailable
    (it is built and loaded with rows_linear: one library, one answer per process)."""
    return None if rows_linear_op() is None else torch.ops.phd_kernels.hidden_attention
