"""Where `phd data` reads text: text files, folders, JSON Lines, and Hugging Face datasets.

Documents: a text or Markdown file is one document; a JSON Lines record (its "text" field) is one document; a
dataset row is one document. A folder is one source whose documents are its files (sorted, recursive).
Documents end with the end-of-text token in the shards.

Chunks: every document is read and tokenized in chunks of about `CHUNK_CHARS` characters, so a 10 GB book
never sits in memory whole and a single long file still keeps every core busy. A chunk ends just before a run of
whitespace, at a paragraph break when there is one: with GPT-2 style byte-level BPE such a point is always a
pre-tokenizer boundary, so the ids equal those of encoding the document in one piece. (With other tokenizers a
few ids at chunk edges may differ; the decoded text is the same.)

Each source is read twice: `scan()` checks it (empty, binary, undecodable, malformed) and counts characters before
any work starts, so a bad file fails in seconds and the held-out split can be placed; `chunks()` streams it.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from .shards import DataError

CHUNK_CHARS = 16_384
READ_BYTES = 1 << 20
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class Source(Protocol):
    name: str
    kind: str

    def scan(self) -> int:
        """Validate the source and return its number of characters (a DataError names the problem)."""
        ...

    def chunks(self) -> Iterator[tuple[str, bool]]:
        """(text, ends_document) pieces in order; joined per document they are the documents exactly."""
        ...


# Chunk ends, best first: after the last non-space character before a paragraph break, a line break, any space.
_BREAKS = tuple(
    re.compile(p) for p in (r"\S(?=[^\S\n]*\n[^\S\n]*\n)", r"\S(?=[^\S\n]*\n)", r"\S(?=\s)")
)


def _chunk_end(text: str, pos: int, target: int) -> int:
    """End of the chunk starting at `pos`: the first good break at least `target` characters on."""
    for pattern in _BREAKS:
        match = pattern.search(text, pos + target, pos + 4 * target)
        if match:
            return match.end()
    return pos + 2 * target  # no whitespace at all: cut anywhere, decoding is still exact


# A cut followed by more text (paragraph break preferred), so both sides of a held-out split hold words.
_SPLIT_BREAKS = tuple(re.compile(p) for p in (r"\S(?=[^\S\n]*\n[^\S\n]*\n\s*\S)", r"\S(?=\s+\S)"))


def split_point(text: str, start: int) -> int | None:
    """The first cut at or after `start` that leaves words on both sides, or None."""
    for pattern in _SPLIT_BREAKS:
        match = pattern.search(text, max(start - 1, 0))
        if match:
            return match.end()
    return None


def split_chunks(text: str, target: int = CHUNK_CHARS) -> Iterator[str]:
    """Pieces of `text` of at least `target` characters (the last may be shorter), cut before whitespace."""
    pos = 0
    while len(text) - pos > 2 * target:
        end = _chunk_end(text, pos, target)
        yield text[pos:end]
        pos = end
    if pos < len(text):
        yield text[pos:]


def _document_chunks(text: str, target: int) -> Iterator[tuple[str, bool]]:
    pieces = list(split_chunks(text, target))
    for i, piece in enumerate(pieces):
        yield piece, i == len(pieces) - 1


class TextFile:
    """A UTF-8 text file as one document (a leading byte-order mark is dropped)."""

    kind = "text"

    def __init__(self, path: Path, chunk_chars: int = CHUNK_CHARS):
        self.path = Path(path)
        self.name = str(path)
        self.chunk_chars = chunk_chars

    def _blocks(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="strict")
        offset = 0
        with open(self.path, "rb") as f:
            while raw := f.read(READ_BYTES):
                if b"\x00" in raw:
                    at = offset + raw.index(b"\x00")
                    raise DataError(f"{self.path} is binary (NUL byte at offset {at}); pass UTF-8 text files only")
                try:
                    yield decoder.decode(raw)
                except UnicodeDecodeError as err:
                    raise DataError(
                        f"{self.path} is not UTF-8 (bad byte at offset {offset + err.start}); "
                        "convert it, e.g. `iconv -f latin1 -t utf-8`"
                    ) from None
                offset += len(raw)
            try:
                yield decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise DataError(f"{self.path} is not UTF-8 (truncated character at its end)") from None

    def scan(self) -> int:
        if not self.path.is_file():
            raise DataError(f"{self.path} does not exist or is not a file")
        chars = 0
        blank = True
        for block in self._blocks():
            chars += len(block)
            blank = blank and not block.strip()
        if blank:
            raise DataError(f"{self.path} is empty (no text); remove it from the inputs")
        return chars

    def chunks(self) -> Iterator[tuple[str, bool]]:
        target = self.chunk_chars
        buf, pos = "", 0
        for block in self._blocks():
            buf = buf[pos:] + block
            pos = 0
            while len(buf) - pos > 5 * target:  # the whole search window of _chunk_end is in buf
                end = _chunk_end(buf, pos, target)
                yield buf[pos:end], False
                pos = end
        yield from _document_chunks(buf[pos:], target)


class JsonlFile:
    """JSON Lines, one document per record: the string in `field` (blank records are skipped)."""

    kind = "jsonl"

    def __init__(self, path: Path, field: str = "text", chunk_chars: int = CHUNK_CHARS):
        self.path = Path(path)
        self.name = str(path)
        self.field = field
        self.chunk_chars = chunk_chars

    def _texts(self) -> Iterator[str]:
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{self.path}:{number}"
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise DataError(f"{where} is not UTF-8; JSON Lines files must be UTF-8 text") from None
                except json.JSONDecodeError as err:
                    raise DataError(f"{where} is not JSON ({err.msg}); each line must be one JSON object") from None
                if not isinstance(record, dict) or not isinstance(record.get(self.field), str):
                    raise DataError(f'{where} has no string field "{self.field}"; pass --text-field NAME')
                if record[self.field].strip():
                    yield record[self.field]

    def scan(self) -> int:
        if not self.path.is_file():
            raise DataError(f"{self.path} does not exist or is not a file")
        chars = sum(len(text) for text in self._texts())
        if not chars:
            raise DataError(f"{self.path} is empty (no record with text); remove it from the inputs")
        return chars

    def chunks(self) -> Iterator[tuple[str, bool]]:
        for text in self._texts():
            yield from _document_chunks(text, self.chunk_chars)


class Folder:
    """Every *.txt, *.md and *.jsonl file below a folder (sorted, hidden files skipped), one source."""

    kind = "folder"

    def __init__(self, path: Path, field: str = "text", chunk_chars: int = CHUNK_CHARS):
        self.path = Path(path)
        self.name = str(path)
        files = sorted(
            p
            for p in self.path.rglob("*")
            if p.is_file()
            and p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(self.path).parts)
        )
        if not files:
            raise DataError(f"{self.path} holds no *.txt, *.md or *.jsonl file; point to files with text")
        self.files: list[Source] = [
            JsonlFile(p, field, chunk_chars) if p.suffix in JSONL_SUFFIXES else TextFile(p, chunk_chars) for p in files
        ]

    def scan(self) -> int:
        return sum(f.scan() for f in self.files)

    def chunks(self) -> Iterator[tuple[str, bool]]:
        for f in self.files:
            yield from f.chunks()


class HFDataset:
    """A Hugging Face dataset: a directory written by `save_to_disk`, or a hub name (`hf:NAME`) when reachable.

    Needs the optional `datasets` package. One row is one document (its `field` column; null/blank rows skipped).
    """

    kind = "hf"

    def __init__(
        self, spec: str, split: str = "train", field: str = "text", config: str | None = None,
        chunk_chars: int = CHUNK_CHARS,
    ):
        self.spec = spec
        self.split = split
        self.field = field
        self.config = config
        self.chunk_chars = chunk_chars
        self.name = f"{spec} [{split}]"
        self._dataset: Any = None

    def _load(self) -> Any:
        """The dataset, loaded once (`datasets.Dataset`, only the text column)."""
        if self._dataset is not None:
            return self._dataset
        try:
            import datasets
        except ImportError:
            raise DataError(
                f"{self.spec}: reading Hugging Face datasets needs the `datasets` package; "
                "pip install datasets (or phd[eval])"
            ) from None
        try:
            if self.spec.startswith("hf:"):
                data = datasets.load_dataset(self.spec.removeprefix("hf:"), self.config, split=self.split)
            else:
                data = datasets.load_from_disk(self.spec)
                if isinstance(data, datasets.DatasetDict):
                    if self.split not in data:
                        raise DataError(f"{self.spec} has splits {list(data)}, not {self.split!r}; pass --hf-split")
                    data = data[self.split]
        except DataError:
            raise
        except Exception as err:  # datasets raises many types (hub offline, missing split, bad files)
            raise DataError(f"{self.spec}: the dataset cannot be loaded ({type(err).__name__}: {err})") from None
        if self.field not in data.column_names:
            raise DataError(f"{self.spec} has columns {data.column_names}, no {self.field!r}; pass --text-field")
        self._dataset = data.select_columns([self.field])
        return self._dataset

    def _texts(self) -> Iterator[str]:
        for batch in self._load().iter(batch_size=1000):
            for text in batch[self.field]:
                if isinstance(text, str) and text.strip():
                    yield text
                elif text is not None and not isinstance(text, str):
                    raise DataError(f"{self.spec}: column {self.field!r} holds {type(text).__name__}, not text")

    def scan(self) -> int:
        chars = sum(len(text) for text in self._texts())
        if not chars:
            raise DataError(f"{self.name} is empty (no row with text in {self.field!r})")
        return chars

    def chunks(self) -> Iterator[tuple[str, bool]]:
        for text in self._texts():
            yield from _document_chunks(text, self.chunk_chars)


def resolve_input(
    spec: str, field: str = "text", hf_split: str = "train", hf_config: str | None = None,
    chunk_chars: int = CHUNK_CHARS,
) -> Source:
    """One command-line input: `hf:NAME`, a saved dataset directory, a folder, a .jsonl file or a text file."""
    if spec.startswith("hf:"):
        return HFDataset(spec, hf_split, field, hf_config, chunk_chars)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"input {spec} does not exist; pass text/Markdown/JSON Lines files, folders, a saved Hugging Face "
            "dataset directory, or hf:NAME"
        )
    if path.is_dir():
        if any((path / marker).exists() for marker in HF_MARKERS):
            return HFDataset(str(path), hf_split, field, hf_config, chunk_chars)
        return Folder(path, field, chunk_chars)
    if path.suffix in JSONL_SUFFIXES:
        return JsonlFile(path, field, chunk_chars)
    return TextFile(path, chunk_chars)
