"""Evaluation: validation loss and perplexity on token shards (no optional extras needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import phd
from phd.eval import evaluate_loss


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
