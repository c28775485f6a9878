"""Validation loss and perplexity of a model on a token split (the shard format of `phd.data.shards`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..model import PHDTransformer


@dataclass
class LossResult:
    loss: float  # mean next-token cross-entropy (nats per token)
    perplexity: float
    tokens: int  # predicted tokens
    windows: int
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_loss(
    model: PHDTransformer,
    tokens: np.ndarray,
    seq_len: int = 512,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> LossResult:
    """Mean loss over consecutive non-overlapping windows of seq_len + 1 tokens from the start of `tokens`.

    Each window predicts its last seq_len tokens from the ones before (documents are concatenated with their
    separator, as in training). `max_tokens` caps the number of predicted tokens (whole windows); the same
    arguments always score the same tokens, so runs are comparable.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must both be >= 1")
    windows = (len(tokens) - 1) // seq_len
    if max_tokens is not None:
        windows = min(windows, max(max_tokens // seq_len, 1))
    if windows < 1:
        raise ValueError(f"the split has {len(tokens)} tokens: too few for one window of seq_len={seq_len} + 1")
    model.eval()
    device = model.embed.weight.device
    total, count = 0.0, 0
    for start in range(0, windows, batch_size):
        rows = range(start, min(start + batch_size, windows))
        batch = np.stack([np.asarray(tokens[r * seq_len: r * seq_len + seq_len + 1], dtype=np.int64) for r in rows])
        ids = torch.from_numpy(batch).to(device)
        logits = model(ids[:, :-1]).logits.float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    loss = total / count
    return LossResult(loss=loss, perplexity=math.exp(loss), tokens=count, windows=windows, seq_len=seq_len)
