"""Checks of user input shared by the API and the commands: token ids, sequence lengths and devices.

Each failure is an InputError whose message names the value, what is allowed and the fix (one line, no
traceback at the command line).

Length rule (one for every path: the training-time forward, the transformers forward with and without a cache,
transformers' generate(), `phd.generate` and `phd generate`): a sequence may run past the model's max_seq_len
(transformers' max_position_embeddings). RoPE is computed for any position and the caches grow, so nothing
breaks there, as with Llama; but the model never saw such positions in training, so `warn_past_max_len` says so
with a LengthWarning (Python shows it once per place it is raised from). Only a cache the caller sized
(`max_len` / capacity) and a training run's seq_len (train config) have hard limits.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .errors import InputError


class LengthWarning(UserWarning):
    """A sequence runs past the max_seq_len (max_position_embeddings) the model was built and trained for."""


def warn_past_max_len(max_seq_len: int, length: int) -> None:
    """The length rule (module docstring): `length` positions past `max_seq_len` run, with a LengthWarning."""
    if length > max_seq_len:
        warnings.warn(
            f"the sequence runs past max_seq_len={max_seq_len} (max_position_embeddings), the length this model was "
            "built and trained for: later positions are computed (RoPE has no table to run out of) but the model "
            "never saw them in training, so expect worse predictions there",
            LengthWarning, stacklevel=3,
        )


def check_token_ids(token_ids: Tensor, vocab_size: int, what: str) -> None:
    """Integer ids inside [0, vocab_size) (one host sync; inside a compiled graph a device-side assert instead):
    an id outside would index past the embedding."""
    if token_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"{what} must hold integer token ids (int64), got dtype {token_ids.dtype}")
    outside = (token_ids < 0) | (token_ids >= vocab_size)
    if torch.compiler.is_compiling():  # in a compiled graph a host sync would break it: the device asserts
        torch._assert_async(~outside.any(), f"{what} holds a token id outside the vocabulary [0, {vocab_size})")
        return
    if token_ids.numel() and bool(outside.any()):
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

