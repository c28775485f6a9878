"""Checks of user input shared by the API and the commands: token ids and devices.

Each failure is an InputError whose message names the value, what is allowed and the fix (one line, no
traceback at the command line).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import InputError


def check_token_ids(token_ids: Tensor, vocab_size: int, what: str) -> None:
    """Integer ids inside [0, vocab_size) (one host sync): an id outside would index past the embedding."""
    if token_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"{what} must hold integer token ids (int64), got dtype {token_ids.dtype}")
    if token_ids.numel() and bool(((token_ids < 0) | (token_ids >= vocab_size)).any()):
        low, high = int(token_ids.min()), int(token_ids.max())
        bad = low if low < 0 else high
        raise InputError(
            f"{what} holds token id {bad}, outside the vocabulary [0, {vocab_size}); encode with the model's own "
            "tokenizer"
        )


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when visible), `cpu`, `cuda` or `cuda:N`, refused when that device is not there."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"device={name!r} is not a torch device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={name} but no CUDA GPU is visible (torch.cuda.is_available() is False); use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"device={name} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device

