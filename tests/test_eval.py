"""Evaluation: validation loss and perplexity on token shards (no optional extras needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import phd
from phd.commands import main
from phd.data.shards import write_meta, write_split
from phd.errors import InputError
from phd.eval import evaluate_loss
from phd.io import save_model


def tiny_model(vocab: int, variant: str = "PHD-CSWA-3-2-4", seed: int = 0) -> phd.PHDTransformer:
    torch.manual_seed(seed)
    config = phd.PHDConfig.from_name(variant, vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                     d_ff=64, tie_embeddings=True, init_std=0.1, max_seq_len=128)
    return phd.PHDTransformer(config).eval()


# ----- loss and perplexity -----


def test_evaluate_loss_is_the_mean_next_token_loss_of_consecutive_windows() -> None:
    model = tiny_model(50)
    tokens = np.random.default_rng(0).integers(0, 50, size=200).astype(np.uint16)
    result = evaluate_loss(model, tokens, seq_len=16, batch_size=3, max_tokens=100)
    assert (result.windows, result.tokens) == (6, 96)
    ids = torch.from_numpy(tokens[: 6 * 16 + 1].astype(np.int64))
    with torch.no_grad():
        losses = [model(ids[None, i * 16: i * 16 + 16], targets=ids[None, i * 16 + 1: i * 16 + 17]).loss
                  for i in range(6)]
    assert result.loss == pytest.approx(float(torch.stack(losses).mean()), abs=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))


def test_evaluate_loss_refuses_a_split_shorter_than_one_window() -> None:
    with pytest.raises(ValueError, match="too few for one window"):
        evaluate_loss(tiny_model(50), np.zeros(10, dtype=np.uint16), seq_len=16)


def test_a_cap_below_one_window_is_refused_not_rounded_up() -> None:
    """max_tokens caps the scored tokens in whole windows of seq_len: a cap below seq_len is refused (it once
    scored one whole window, 512 tokens for --max-tokens 1); a cap of one window scores exactly one."""
    model, tokens = tiny_model(50), np.random.default_rng(0).integers(0, 50, size=200).astype(np.uint16)
    for cap in (1, 15):
        with pytest.raises(InputError, match=rf"^max_tokens={cap} is less than one window: a window of "
                           r"seq_len\+1=17 tokens scores 16; pass max_tokens >= 16, or a smaller seq_len$"):
            evaluate_loss(model, tokens, seq_len=16, max_tokens=cap)
    result = evaluate_loss(model, tokens, seq_len=16, max_tokens=16)
    assert (result.windows, result.tokens) == (1, 16)
    assert evaluate_loss(model, tokens, seq_len=16, max_tokens=47).tokens == 32


def test_phd_eval_refuses_max_tokens_below_one_window(tmp_path, capsys) -> None:
    """The command says it in one line, naming its flags, before loading the model; one window's worth works."""
    data = tmp_path / "data"
    data.mkdir()
    tokens = np.random.default_rng(1).integers(0, 50, size=300).astype(np.uint16)
    write_split(data, "train", tokens[:100])
    write_split(data, "val", tokens[100:])
    write_meta(data, {"dtype": "uint16", "vocab_size": 50, "eos_id": 0,
                      "splits": {"train": {"tokens": 100, "documents": 1}, "val": {"tokens": 200, "documents": 1}}})
    save_model(tiny_model(50), tmp_path / "model")
    argv = ["eval", str(tmp_path / "model"), "--data", str(data), "--seq-len", "32"]
    assert main([*argv, "--max-tokens", "1"]) == 1
    err = capsys.readouterr().err
    assert err == ("phd eval: error: --max-tokens=1 is less than one window: a window of --seq-len+1=33 tokens "
                   "scores 32; pass --max-tokens >= 32, or a smaller --seq-len\n")
    assert main([*argv, "--max-tokens", "32"]) == 0
    assert "(32 tokens, 1 windows of 32)" in capsys.readouterr().out
