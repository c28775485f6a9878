"""Memory-mapped token shards: the on-disk format every data path writes and the trainer reads.

A data directory holds:
  meta.json       {"format": "phd-tokens-v1", "dtype": "uint16"|"uint32", "vocab_size": V, "eos_id": E,
                   "splits": {"train": {"tokens": N, "documents": D}, "val": {...}}, "sources": [...]}
  train.bin       the train split: one flat array of token ids, documents separated by eos_id
  val.bin         the held-out split, same layout
  tokenizer.json  the Hugging Face `tokenizers` file that produced the ids
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "phd-tokens-v1"
SPLITS = ("train", "val")


class DataError(ValueError):
    """Bad or missing data; the message names the file and the fix."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


@dataclass
class TokenShards:
    root: Path
    meta: dict[str, Any]
    train: np.ndarray
    val: np.ndarray

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def tokenizer_path(self) -> Path:
        return self.root / "tokenizer.json"

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise DataError(f"split {name!r} is unknown: allowed {SPLITS}")
        return self.train if name == "train" else self.val


def write_split(root: Path, split: str, tokens: np.ndarray) -> None:
    """Write one split atomically (temporary file, then rename)."""
    path = root / f"{split}.bin"
    tmp = path.with_suffix(".bin.tmp")
    tokens.tofile(tmp)
    os.replace(tmp, path)


def write_meta(root: Path, meta: dict[str, Any]) -> None:
    meta = {"format": FORMAT, **meta}
    tmp = root / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, root / "meta.json")


def open_shards(root: str | Path) -> TokenShards:
    """Open a data directory written by `phd data`, read-only and memory-mapped."""
    root = Path(root)
    meta_path = root / "meta.json"
    if not meta_path.exists():
        raise DataError(f"{root} has no meta.json: it is not a phd data directory; create one with `phd data`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise DataError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}; re-run `phd data`")
    dtype = np.dtype(meta["dtype"])
    arrays = {}
    for split in SPLITS:
        path = root / f"{split}.bin"
        if not path.exists():
            raise DataError(f"{path} is missing; re-run `phd data` to rebuild {root}")
        expected = int(meta["splits"][split]["tokens"])
        size = path.stat().st_size // dtype.itemsize
        if size != expected:
            raise DataError(f"{path} holds {size} tokens but meta.json says {expected}: truncated; re-run `phd data`")
        arrays[split] = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
    return TokenShards(root, meta, arrays["train"], arrays["val"])
