"""Padded prompts: where each row's real tokens are, and moving rows so that they start at column 0.

One helper for the native engine (a batch of prompts given with an attention mask) and the transformers adapter
(left-padded batches, logits moved back to the input's layout).
"""

from __future__ import annotations

import torch
from torch import Tensor


def padding_offsets(attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Start and length of the real tokens of every row; raises unless each row is one contiguous run of 1s."""
    mask = attention_mask.to(torch.bool)
    lengths = mask.sum(dim=1)
    starts = torch.where(lengths > 0, mask.int().argmax(dim=1), torch.zeros_like(lengths))
    cols = torch.arange(mask.shape[1], device=mask.device)
    expected = (cols >= starts[:, None]) & (cols < (starts + lengths)[:, None])
    message = ("attention_mask must mark one contiguous run of tokens per row (left or right padding); masks with "
               "holes (packed sequences) are not supported by PHD models")
    if torch.compiler.is_compiling():  # a host sync would break a compiled graph (torch.compile): the device asserts
        torch._assert_async((expected == mask).all(), message)
    elif not torch.equal(expected, mask):
        raise ValueError(message)
    return starts, lengths


def shift_rows(x: Tensor, shifts: Tensor, fill: int | float = 0) -> Tensor:
    """out[b, t] = x[b, t + shifts[b]] where that index is in range, else `fill` ([B, T, ...] tensors)."""
    t = x.shape[1]
    src = torch.arange(t, device=x.device)[None, :] + shifts[:, None]
    valid = (src >= 0) & (src < t)
    index = src.clamp(0, t - 1)
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    out = torch.gather(x, 1, index)
    return out.masked_fill(~valid.view(*valid.shape, *([1] * (x.dim() - 2))), fill)


def right_pad(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Rows with one contiguous run of real tokens (left or right padded) -> right-padded rows, lengths."""
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}: "
            "they must match"
        )
    starts, lengths = padding_offsets(attention_mask)
    return shift_rows(input_ids, starts), lengths
