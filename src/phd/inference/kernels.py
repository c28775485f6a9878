"""phd's C++ kernels, compiled on first use with the machine's C++ compiler and cached; absent where they cannot be.

One kernel so far: `rows_linear` (csrc/rows_linear.cpp), y = x @ w.T + b for 1 to 4 rows of float32 on an x86
CPU with AVX2 and FMA, at about the cost of reading w once (the decode step's linears; see weights.py). It is
compiled against the running PyTorch's headers and libraries (`$CXX`, else `c++`; about 10 s, once per source,
flags and PyTorch version) into $PHD_CACHE_DIR/kernels and registered as `torch.ops.phd_kernels.rows_linear`.
Where it cannot be (no compiler, not x86, no AVX2, PHD_KERNELS=0), `rows_linear_op()` returns None, after one
warning if compiling failed, and callers use PyTorch's own kernels: results never depend on it, only speed.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..fsutil import cache_root

ROWS_LINEAR_MAX_ROWS = 4  # the kernel's register budget; more rows go to MKL's packed GEMM
_SOURCE = Path(__file__).with_name("csrc") / "rows_linear.cpp"
_FLAGS = ["-O3", "-mavx2", "-mfma", "-std=c++17", "-fPIC", "-shared",
          "-fopenmp"]  # OpenMP: ATen's parallel_for inside the kernel runs on PyTorch's own thread pool
_loaded: dict[str, Callable | None] = {}


def _cpu_supports_kernel() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _compile_command(compiler: str, out: Path) -> list[str]:
    from torch.utils import cpp_extension  # the include and library folders of the running PyTorch

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [compiler, *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *(f"-I{p}" for p in cpp_extension.include_paths()), str(_SOURCE),
            *(f"-L{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu", "-o", str(out)]


def _library_path() -> Path:
    """Where the compiled kernel lives: named by a digest of the source, the flags and the PyTorch version, so that
    any of them changing compiles anew."""
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join([*_FLAGS, torch.__version__]).encode()).hexdigest()[:16]
    return cache_root() / "kernels" / f"rows_linear-{key}.so"


def _build(lib: Path) -> None:
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} not found)")
    print(f"[phd: compiling the decode kernel into {lib} (once, about 10 s)]", file=sys.stderr, flush=True)
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_name(f".{lib.name}.{os.getpid()}.tmp")
    try:
        done = subprocess.run(_compile_command(compiler, tmp), capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{compiler} failed: {(done.stderr.strip().splitlines() or ['?'])[0]}")
        os.replace(tmp, lib)  # atomic: a process compiling at the same time never loads half a file
    finally:
        tmp.unlink(missing_ok=True)


def rows_linear_op() -> Callable | None:
    """The compiled `rows_linear(x [M, K], w [N, K], bias [N] | None) -> [M, N]` op, or None where unavailable.

    Compiled (or loaded from the cache) on the first call of a process; the answer is kept for the process.
    """
    if "rows_linear" in _loaded:
        return _loaded["rows_linear"]
    op = None
    if os.environ.get("PHD_KERNELS", "1") != "0" and _cpu_supports_kernel():
        lib = _library_path()
        try:
            if not lib.exists():
                _build(lib)
            torch.ops.load_library(str(lib))
            op = torch.ops.phd_kernels.rows_linear
            # Shapes without running it, so that torch.compile can trace through a DecodeLinear.
            torch.library.register_fake("phd_kernels::rows_linear")(
                lambda x, w, bias: x.new_empty(x.shape[0], w.shape[0]))
        except Exception as err:  # no compiler, a read-only cache, ...: PyTorch's kernels do the work
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            warnings.warn(f"phd's decode kernel is not available ({first[:300]}); decoding uses PyTorch's kernels "
                          "(slower for K > 1). Set CXX to a C++ compiler, or PHD_KERNELS=0 to silence this.",
                          RuntimeWarning, stacklevel=2)
    _loaded["rows_linear"] = op
    return op
