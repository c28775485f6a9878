"""Tokenizers for `phd data`: train a byte-level BPE, or load an existing one, plus the document separator.

Byte-level BPE (GPT-2 style) is lossless: every byte sequence encodes, and decoding gives the text back exactly.
The end-of-text token separates documents in the token shards, so every tokenizer used here must have one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .shards import DataError

EOS = "<|endoftext|>"
# End-of-text spellings of common tokenizers, tried in order when the tokenizer does not name its own.
EOS_CANDIDATES = (EOS, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")
MIN_VOCAB = 256


@dataclass(frozen=True)
class DocTokenizer:
    """A `tokenizers.Tokenizer` and the end-of-text id that ends every document in the shards."""

    tokenizer: Tokenizer
    eos_token: str
    eos_id: int
    source: str

    @property
    def vocab_size(self) -> int:
        """The model's vocab_size: the tokenizer's size, or one more than its largest id if ids have gaps."""
        largest = max(self.tokenizer.get_vocab(with_added_tokens=True).values())
        return max(self.tokenizer.get_vocab_size(with_added_tokens=True), largest + 1)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Ids of each text, uses every core; special-token strings inside the text are encoded as plain text,
        so a document that quotes "<|endoftext|>" cannot forge a document boundary."""
        encodings = self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: Path) -> None:
        self.tokenizer.save(str(path))


def _with_literal_specials(tokenizer: Tokenizer, eos_token: str, source: str) -> DocTokenizer:
    eos_id = tokenizer.token_to_id(eos_token)
    if eos_id is None:
        raise DataError(f"{source}: the tokenizer has no token {eos_token!r}; pass --eos-token with one it has")
    tokenizer.encode_special_tokens = True
    return DocTokenizer(tokenizer, eos_token, eos_id, source)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = (EOS,),
    min_frequency: int = 2,
    show_progress: bool = False,
) -> DocTokenizer:
    """Train a byte-level BPE on `texts`; `special_tokens[0]` is the end-of-text token and gets id 0.

    The vocabulary may end smaller than `vocab_size` when the text has too few distinct merges.
    """
    if not special_tokens:
        raise DataError("a tokenizer needs an end-of-text special token; pass at least one")
    if vocab_size < MIN_VOCAB + len(special_tokens):
        raise DataError(
            f"--vocab-size {vocab_size} is too small: byte-level BPE needs {MIN_VOCAB} byte tokens plus "
            f"{len(special_tokens)} special token(s); use at least {MIN_VOCAB + len(special_tokens)}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _with_literal_specials(tokenizer, special_tokens[0], f"byte-level BPE trained to {vocab_size}")


def _named_eos(directory: Path) -> str | None:
    """The eos token a transformers tokenizer directory declares, if any."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if not path.exists():
            continue
        token = json.loads(path.read_text()).get("eos_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            return token
    return None


def _guess_eos(tokenizer: Tokenizer, source: str) -> str:
    for candidate in EOS_CANDIDATES:
        if tokenizer.token_to_id(candidate) is not None:
            return candidate
    raise DataError(f"{source}: found no end-of-text token among {EOS_CANDIDATES}; pass --eos-token")


def _gpt2_files(directory: Path) -> tuple[Path, Path] | None:
    """vocab.json + merges.txt (transformers' slow GPT-2 layout) or OpenAI's encoder.json + vocab.bpe."""
    for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
        if (directory / vocab).is_file() and (directory / merges).is_file():
            return directory / vocab, directory / merges
    return None


def _from_transformers(directory: Path) -> Tokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError(
            f"{directory} holds no tokenizer.json; loading other tokenizer files needs transformers "
            "(pip install 'phd[hf]'), or pass a tokenizer.json"
        ) from None
    try:
        loaded = AutoTokenizer.from_pretrained(str(directory), use_fast=True)
    except (OSError, ValueError) as err:
        raise DataError(f"{directory}: transformers cannot load a tokenizer from it ({err})") from None
    if not getattr(loaded, "is_fast", False):
        raise DataError(f"{directory}: transformers gave a slow tokenizer; convert it to tokenizer.json first")
    return loaded.backend_tokenizer


def load_tokenizer(path: str | Path, eos_token: str | None = None) -> DocTokenizer:
    """Load a tokenizer.json file, or a directory with tokenizer.json, GPT-2 BPE files, or any other files
    transformers can turn into a fast tokenizer. The eos token is `eos_token`, else the one the directory's
    tokenizer_config.json names, else the first known spelling the vocabulary contains."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"tokenizer {path} does not exist; pass a tokenizer.json file or a tokenizer directory")
    directory = path if path.is_dir() else path.parent
    try:
        if path.is_file():
            tokenizer = Tokenizer.from_file(str(path))
        elif (path / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        elif files := _gpt2_files(path):
            tokenizer = Tokenizer(models.BPE.from_file(str(files[0]), str(files[1])))
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tokenizer.decoder = decoders.ByteLevel()
            tokenizer.add_special_tokens([t for t in EOS_CANDIDATES[:1] if tokenizer.token_to_id(t) is not None])
        else:
            tokenizer = _from_transformers(path)
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path} is not a readable tokenizer ({err}); pass a Hugging Face tokenizer.json") from None
    eos = eos_token or _named_eos(directory) or _guess_eos(tokenizer, str(path))
    return _with_literal_specials(tokenizer, eos, str(path))
