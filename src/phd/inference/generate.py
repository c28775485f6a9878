"""Generation: prefill once, then one decode step per token, sampling on the device.

`generate_stream` yields each step's tokens (for streaming to a terminal); `generate` collects them.
The generator owns the loop and the cache; positions advance in `decode_step`, never inside a layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from ..checks import warn_past_max_len
from ..errors import InputError
from .engine import decode_step, prefill
from .sampling import SamplingConfig, sample


def _as_batch(input_ids: Tensor | list) -> tuple[Tensor, bool]:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        return ids[None], True
    if ids.dim() != 2:
        raise InputError(f"input_ids must be [seq_len] or [batch, seq_len], got shape {tuple(ids.shape)}")
    return ids, False


def _check_lengths(model, prompt_len: int, max_new_tokens: int, max_len: int | None) -> int:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens={max_new_tokens!r} is invalid: use an integer >= 0")
    if prompt_len == 0:
        raise InputError("the prompt is empty: give at least one token (e.g. a BOS token)")
    if max_len is not None and prompt_len > max_len:  # a cache size the caller chose: a hard limit
        raise InputError(
            f"the prompt has {prompt_len} tokens, more than the maximum length max_len={max_len}; truncate the "
            "prompt or give a larger max_len"
        )
    if max_len is not None and prompt_len + max_new_tokens > max_len:
        raise InputError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the maximum length "
            f"max_len={max_len}; use max_new_tokens <= {max_len - prompt_len}"
        )
    warn_past_max_len(model.config.max_seq_len, prompt_len + max_new_tokens)  # the length rule (phd.checks)
    return prompt_len + max(max_new_tokens, 1)


@torch.inference_mode()
def generate_stream(
    model,
    input_ids: Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    stop_tokens: Iterable[int] = (),
    seed: int | None = None,
    lengths: Tensor | None = None,
    pad_id: int = 0,
    max_len: int | None = None,
    prefill_mode: str = "bounded",
) -> Iterator[Tensor]:
    """Yield the next token of every row ([B]) for up to max_new_tokens steps.

    A row that produced a stop token yields `pad_id` afterwards; the stream ends when every row has stopped.
    """
    sampling = sampling or SamplingConfig()
    ids, _ = _as_batch(input_ids)
    ids = ids.to(model.embed.weight.device)
    b, t = ids.shape
    cache = model.new_cache(b, _check_lengths(model, t, max_new_tokens, max_len))
    if max_new_tokens == 0:
        return
    generator = None
    if seed is not None:
        generator = torch.Generator(ids.device).manual_seed(seed)
    logits = prefill(model, ids, cache, lengths=lengths, mode=prefill_mode)
    real = torch.arange(t, device=ids.device) < cache.lengths[:, None]
    seen = torch.zeros(b, model.config.vocab_size, dtype=torch.bool, device=ids.device)
    seen.scatter_(1, torch.where(real, ids, ids[:, :1]), True)
    stops = torch.as_tensor(list(stop_tokens), dtype=torch.long, device=ids.device)
    done = torch.zeros(b, dtype=torch.bool, device=ids.device)
    for step in range(max_new_tokens):
        sampled = sample(logits, sampling, generator, seen)
        token = torch.where(done, pad_id, sampled)
        yield token
        if stops.numel():
            done |= torch.isin(token, stops)
            if bool(done.all()):
                return
        if step + 1 < max_new_tokens:  # finished rows keep decoding their own samples (discarded): no branch
            seen.scatter_(1, sampled[:, None], True)
            logits = decode_step(model, sampled, cache, check=False)


def generate(
    model,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_tokens: Iterable[int] = (),
    seed: int | None = None,
    lengths: Tensor | None = None,
    pad_id: int | None = None,
    max_len: int | None = None,
    prefill_mode: str = "bounded",
) -> Tensor:
    """Prompt + generated token ids: [B, T + steps] for input [B, T] ([T + steps] for input [T]).

    Row b holds its prompt (its first lengths[b] tokens), then its new tokens, then `pad_id` (default: the
    first stop token, else 0) after a stop token. Greedy by default; `seed` makes sampling reproducible.
    """
    ids, squeeze = _as_batch(input_ids)
    stop_tokens = [int(s) for s in stop_tokens]
    pad = pad_id if pad_id is not None else (stop_tokens[0] if stop_tokens else 0)
    sampling = SamplingConfig(temperature, top_k, top_p, repetition_penalty)
    steps = list(
        generate_stream(model, ids, max_new_tokens, sampling, stop_tokens, seed, lengths, pad, max_len, prefill_mode)
    )
    b, t = ids.shape
    ids = ids.to(model.embed.weight.device)
    n = torch.full((b,), t, dtype=torch.long, device=ids.device) if lengths is None else torch.as_tensor(lengths)
    n = n.to(ids.device).long()
    out = torch.full((b, t + len(steps)), pad, dtype=torch.long, device=ids.device)
    out[:, :t] = torch.where(torch.arange(t, device=ids.device) < n[:, None], ids, pad)
    if steps:
        new = torch.stack(steps, dim=1)
        out.scatter_(1, n[:, None] + torch.arange(len(steps), device=ids.device), new)
    return out[0] if squeeze else out
