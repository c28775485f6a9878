"""Tiny data directories and configs for the training tests (a 300-token word-level tokenizer, seq_len 32)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from phd.data.shards import token_dtype, write_meta, write_split
from phd.train.config import TrainConfig

VOCAB = 300


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and spinning threads crawl on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
EOS = 0


def make_tokenizer(path: Path, vocab: int = VOCAB) -> None:
    """A word-level tokenizer with exactly `vocab` tokens ("<eos>", "w1" .. "w{vocab-1}")."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<eos>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def make_data(root: Path, train_tokens: int = 20_000, val_tokens: int = 4_000, vocab: int = VOCAB,
              tokenizer_vocab: int | None = None, seed: int = 0) -> Path:
    """Learnable synthetic text: a fixed random bigram chain (each token mostly predicts the next)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    successor = rng.integers(1, vocab, size=vocab)

    def stream(n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        out[0] = 1
        noise = rng.random(n)
        rand = rng.integers(1, vocab, size=n)
        for i in range(1, n):
            out[i] = successor[out[i - 1]] if noise[i] < 0.8 else rand[i]
        out[rng.integers(0, n, size=n // 100)] = EOS
        return out

    dtype = token_dtype(vocab)
    splits = {}
    for name, n in (("train", train_tokens), ("val", val_tokens)):
        write_split(root, name, stream(n).astype(dtype))
        splits[name] = {"tokens": n, "documents": n // 100}
    write_meta(root, {"dtype": dtype.name, "vocab_size": vocab, "eos_id": EOS, "splits": splits, "sources": []})
    make_tokenizer(root / "tokenizer.json", tokenizer_vocab or vocab)
    return root


def tiny_config(data: Path, out: Path, variant: str = "PHD-CSWA-2-4-8", **overrides: Any) -> TrainConfig:
    fields = dict(
        model={"variant": variant, "vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
               "d_ff": 64, "max_seq_len": 64},
        data=str(data), out=str(out), seq_len=32, batch_size=8, micro_batch=4, max_steps=6, lr=1e-2, min_lr=1e-3,
        warmup_steps=2, eval_every=0, eval_iters=1, checkpoint_every=0, log_every=1, progress=False,
    )
    fields.update(overrides)
    return TrainConfig.from_dict(fields)
