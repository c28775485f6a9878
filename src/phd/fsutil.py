"""File-system helpers shared by data building, model export and training checkpoints."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checksums that detect truncated or corrupted files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def swap_in_dir(tmp: Path, out: Path) -> None:
    """Replace directory `out` by the completed directory `tmp` with renames only: `out` is either the old or the
    new complete directory (a crash in between leaves `out.old`, which the next swap removes)."""
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
