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

from ..errors import PHDError
from ..fsutil import sha256_file

FORMAT = "phd-tokens-v1"
DATA_KIND = "phd-data"  # the output-folder kind (fsutil.MARKER) of a data directory
SPLITS = ("train", "val")


class DataError(PHDError, ValueError):
    """Bad or missing data; the message names the file and the fix."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a `vocab_size` vocabulary."""
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise DataError(f"a vocabulary of {vocab_size} ids does not fit uint32 token shards; use a smaller tokenizer")


def window_count(num_tokens: int, seq_len: int) -> int:
    """How many training / evaluation windows a split of num_tokens holds: window i is tokens
    [i * seq_len, (i + 1) * seq_len] (seq_len inputs and the seq_len next-token targets), so consecutive windows
    share one token and the last token of the split is only a target."""
    return max(num_tokens - 1, 0) // seq_len


def windows(tokens: np.ndarray, seq_len: int, indices) -> np.ndarray:
    """The windows `indices` of a split as one int64 array [len(indices), seq_len + 1] (see `window_count`)."""
    return np.stack([np.asarray(tokens[int(i) * seq_len : int(i) * seq_len + seq_len + 1], dtype=np.int64)
                     for i in indices])


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


class ShardWriter:
    """Append token ids to one split on disk, so a corpus larger than memory streams through.

    Ids go to `<split>.bin.tmp`; `close()` renames it to `<split>.bin`, so a crashed run leaves no file that
    looks complete. Every id is checked against the vocabulary: a uint16 file would wrap larger ids silently.
    """

    def __init__(self, root: Path, split: str, vocab_size: int):
        if split not in SPLITS:
            raise DataError(f"split {split!r} is unknown: allowed {SPLITS}")
        self.path = Path(root) / f"{split}.bin"
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self.tokens = 0
        self._tmp = self.path.with_suffix(".bin.tmp")
        self._file = open(self._tmp, "wb")

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.size == 0:
            return
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise DataError(
                f"{self.path}: token id {int(ids.max())} is outside the vocabulary of {self.vocab_size}; "
                "the tokenizer and its reported vocab_size disagree"
            )
        self._file.write(ids.astype(self.dtype, copy=False).tobytes())
        self.tokens += int(ids.size)

    def close(self) -> None:
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def write_meta(root: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """meta.json, with the sha256 of every split file written so far (checked by open_shards)."""
    sums = {f"{s}.bin": sha256_file(root / f"{s}.bin") for s in SPLITS if (root / f"{s}.bin").exists()}
    meta = {"format": FORMAT, **meta, "sha256": sums}
    tmp = root / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, root / "meta.json")
    return meta


def open_shards(root: str | Path) -> TokenShards:
    """Open a data directory written by `phd data`, read-only and memory-mapped."""
    root = Path(root)
    meta_path = root / "meta.json"
    if not meta_path.exists():
        raise DataError(f"{root} has no meta.json: it is not a phd data directory; create one with `phd data`")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{meta_path} is corrupted ({err}); re-run `phd data`") from None
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
        expected_sum = meta.get("sha256", {}).get(path.name)  # absent in data written before checksums
        if expected_sum and sha256_file(path) != expected_sum:
            raise DataError(f"{path} does not match its sha256 in meta.json: corrupted; re-run `phd data`")
        arrays[split] = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
    return TokenShards(root, meta, arrays["train"], arrays["val"])
