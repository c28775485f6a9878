"""Validation loss and perplexity of a model on a token split (the shard format of `phd.data.shards`).

One implementation for `phd train` (its val loss, at any process count) and `phd eval`, so the two report the
same number for the same model, windows and seq_len.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.shards import DataError, window_count, windows
from ..errors import InputError
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


def eval_batches(
    tokens: np.ndarray, seq_len: int, num_sequences: int, micro_batch: int, rank: int, world: int
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """This rank's share of `num_sequences` windows spread evenly over the validation split (all of them when it
    holds no more), as (inputs, targets, weight). Spread, not the first ones: the split is the tail of every source
    in turn, and the loss should weigh them all.

    Windows are dealt to ranks round-robin; a rank short of windows pads with weight-0 copies so that every
    rank runs the same number of forward passes (FSDP's collectives need it). The weighted mean over all
    ranks is therefore the same at any process count.
    """
    available = window_count(len(tokens), seq_len)
    n = min(num_sequences, available)
    if n == 0:
        raise DataError(f"the val split holds {len(tokens)} tokens, not one sequence of {seq_len + 1}")
    chosen = [i * available // n for i in range(n)]
    mine = chosen[rank::world]
    per_rank = -(-n // world)
    steps = -(-per_rank // micro_batch)
    weights = [1.0] * len(mine) + [0.0] * (steps * micro_batch - len(mine))
    mine = mine + [0] * (steps * micro_batch - len(mine))
    out = []
    for s in range(steps):
        idx = mine[s * micro_batch : (s + 1) * micro_batch]
        batch = torch.from_numpy(windows(tokens, seq_len, idx))
        out.append((batch[:, :-1], batch[:, 1:], torch.tensor(weights[s * micro_batch : (s + 1) * micro_batch])))
    return out


@torch.no_grad()
def loss_sums(
    model: nn.Module, batches: list[tuple[Tensor, Tensor, Tensor]], device: torch.device, autocast: bool = False
) -> Tensor:
    """[sum of weight * mean next-token loss of each window, sum of weights] in float64: one rank's share of the
    validation loss (sum the shares over ranks, then divide). `autocast` runs the forward in bfloat16."""
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for inputs, targets, weight in batches:
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            logits = model(inputs.to(device)).logits
        per_token = F.cross_entropy(logits.float().transpose(1, 2), targets.to(device), reduction="none")  # [B, T]
        w = weight.to(device, torch.float64)
        sums[0] += (per_token.double().mean(1) * w).sum()
        sums[1] += w.sum()
    return sums


def max_tokens_message(max_tokens: int, seq_len: int, max_name: str, seq_name: str) -> str:
    """Why a cap on the scored tokens below one window is refused (a window of seq_len+1 tokens scores seq_len)."""
    return (f"{max_name}={max_tokens} is less than one window: a window of {seq_name}+1={seq_len + 1} tokens scores "
            f"{seq_len}; pass {max_name} >= {seq_len}, or a smaller {seq_name}")


@torch.no_grad()
def evaluate_loss(
    model: PHDTransformer,
    tokens: np.ndarray,
    seq_len: int = 512,
    batch_size: int = 8,
    max_tokens: int | None = None,
    num_sequences: int | None = None,
) -> LossResult:
    """Mean loss over non-overlapping windows of seq_len + 1 tokens of `tokens`.

    Each window predicts its last seq_len tokens from the ones before (documents are concatenated with their
    separator, as in training). `max_tokens` keeps the first windows (whole ones) up to that many predicted
    tokens (at least one window's seq_len: a smaller cap is refused, not rounded up to a window); `num_sequences`
    scores that many windows spread evenly over what is kept, as `phd train` does for its val loss
    (eval_iters * batch_size). The same arguments always score the same tokens.
    """
    if seq_len < 1 or batch_size < 1:
        raise InputError(f"seq_len={seq_len} and batch_size={batch_size} must both be >= 1")
    if max_tokens is not None and max_tokens < seq_len:  # not even one window: never round up to one silently
        raise InputError(max_tokens_message(max_tokens, seq_len, "max_tokens", "seq_len"))
    available = window_count(len(tokens), seq_len)
    if max_tokens is not None:
        available = min(available, max_tokens // seq_len)
    if available < 1:
        raise InputError(f"the split has {len(tokens)} tokens: too few for one window of seq_len={seq_len} + 1")
    count = available if num_sequences is None else min(available, num_sequences)
    model.eval()
    batches = eval_batches(tokens[: available * seq_len + 1], seq_len, count, batch_size, rank=0, world=1)
    sums = loss_sums(model, batches, model.embed.weight.device)
    loss = float(sums[0] / sums[1])
    return LossResult(loss=loss, perplexity=math.exp(loss), tokens=count * seq_len, windows=count, seq_len=seq_len)
