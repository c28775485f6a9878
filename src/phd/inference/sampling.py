"""Next-token choice from logits: greedy, temperature, top-k, top-p (nucleus) and repetition penalty.

Everything stays on the logits' device (no host sync), so a decode loop can sample without stalling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy (argmax); top_k / top_p restrict the support before sampling;
    repetition_penalty > 1 discourages tokens already in the prompt or the output (the CTRL / HF rule:
    a seen token's positive logit is divided by it, a negative one multiplied)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise InputError(f"temperature={self.temperature!r} is invalid: use 0 (greedy) or a positive number")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise InputError(f"top_k={self.top_k!r} is invalid: use None (off) or an integer >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"top_p={self.top_p!r} is invalid: use None (off) or a number in (0, 1]")
        if not self.repetition_penalty > 0:
            raise InputError(
                f"repetition_penalty={self.repetition_penalty!r} is invalid: use a number > 0 (1 = off)"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """logits [B, V]; seen bool [B, V] marks tokens already in the row's context."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def restrict_support(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set holding top_p of the mass."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # the most likely token always stays (its mass_before is 0)
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: Tensor, config: SamplingConfig, generator: torch.Generator | None = None,
           seen: Tensor | None = None) -> Tensor:
    """Token ids [B] from logits [B, V]."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.greedy:
        return logits.argmax(-1)
    logits = restrict_support(logits / config.temperature, config.top_k, config.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
