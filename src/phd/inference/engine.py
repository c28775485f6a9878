"""Prefill and decode with the PHD cache (spec section 6).

Every layer is the model's own `Block.forward`; the engine only chooses its tokens, the rows whose output is
used, and an attention that writes the cache and masks by `masks.allowed`. So inference cannot drift from the
training-time forward; the tests hold every logit to it.

Prefill (`mode="bounded"`, the default) computes only what the future reads:
- the originals of every position: one causal pass, exactly vanilla;
- hidden tokens (copies 2..K) only at the positions the last token and the cache depend on. Hidden queries
  see the hidden copies of the W preceding positions, so the hidden state of position m after layer l depends
  on hidden tokens back to m - l*W. Layer l (0-based) therefore needs hidden keys from the last (L-l)*W + 1
  positions and hidden outputs only for the last (L-l-1)*W + 1; the set shrinks by W per layer (at most the
  spec's L*W + 1 positions). PHD (no window) needs one position; CSWA never more than its chunk.
- In the last layer only copy K of the last position is a query: every other token's output is unused (the
  originals' attention output and FFN there are skipped; their K/V are all the cache needs).
`mode="full"` is the paper's prefill: the training-time forward (`PHDTransformer.hidden_states`) over all K*T
tokens with an attention that also fills the cache; naive repetition always uses it (its cache holds all K*T
entries).

Decode: the K copies of each row's next token are K query rows of one forward pass against the cache.

Batches: rows are right-padded; `lengths[b]` tokens of row b are real. Each row has its own positions and
chunk phase; padding sits at future positions, which the rule never lets a real token see. An
`attention_mask` (1 = real token, left or right padded, as in Hugging Face) is accepted and converted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention import LayoutAttention, resolve_backend
from ..checks import check_token_ids
from ..masks import hidden_tokens, visible
from ..model import Attend, pick_rows
from .cache import PHDCache
from .padding import right_pad
from .weights import auto_kernel

PREFILL_MODES = ("bounded", "full")


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------


def _prompt_lengths(model, input_ids: Tensor, cache: PHDCache, lengths: Tensor | None,
                    attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    b, t = input_ids.shape
    if b != cache.batch_size:
        raise ValueError(f"input_ids has {b} rows but the cache was made for batch_size={cache.batch_size}")
    if t == 0:
        raise ValueError("the prompt is empty: prefill needs at least one token per row (e.g. a BOS token)")
    if attention_mask is not None:
        if lengths is not None:
            raise ValueError("pass either lengths or attention_mask, not both")
        input_ids, lengths = right_pad(input_ids, attention_mask.to(input_ids.device))
    if lengths is None:
        lengths = torch.full((b,), t, dtype=torch.long, device=input_ids.device)
    lengths = torch.as_tensor(lengths, device=input_ids.device).long()
    if lengths.shape != (b,):
        raise ValueError(f"lengths must have shape [{b}] (one prompt length per row), got {tuple(lengths.shape)}")
    low, high = int(lengths.min()), int(lengths.max())
    if low < 1:
        raise ValueError("a prompt is empty (length 0): every row needs at least one token (e.g. a BOS token)")
    if high > t:
        raise ValueError(f"lengths has {high} but input_ids has only {t} columns")
    if high > cache.capacity:
        raise ValueError(
            f"the prompt has {high} tokens but the cache holds at most capacity={cache.capacity}; "
            "truncate the prompt or make a larger cache (model.new_cache(batch, max_len))"
        )
    # Padding may hold anything (-100, a pad id): it is replaced by a valid id, and never attended.
    input_ids = torch.where(torch.arange(t, device=input_ids.device) < lengths[:, None], input_ids, 0)
    check_token_ids(input_ids, model.config.vocab_size, "input_ids")
    return input_ids, lengths


# ----------------------------------------------------------------------------------------------------------
# Prefill
# ----------------------------------------------------------------------------------------------------------


def hidden_widths(config, seq_len: int, span: int | None = None) -> list[tuple[int, int]]:
    """Per layer: (positions whose hidden K/V are needed, positions whose hidden outputs are needed).

    `span` bounds both by the positions a row can need at all (CSWA: last - chunk start + 1, at most C).
    """
    seq_len = min(seq_len, span or seq_len)
    n = config.n_layers
    widths = []
    for layer in range(n):
        if config.window is None:
            keys, outs = 1, 1
        else:
            keys, outs = (n - layer) * config.window + 1, (n - layer - 1) * config.window + 1
            if config.chunk is not None:
                keys, outs = min(keys, config.chunk), min(outs, config.chunk)
        widths.append((min(keys, seq_len), min(outs, seq_len)))
    return widths


def _first_needed(config, last: Tensor) -> Tensor:
    """Earliest position whose hidden tokens a row's future reads: its chunk start (CSWA), else 0."""
    if config.chunk is None:
        return torch.zeros_like(last)
    return last // config.chunk * config.chunk


def _ring_positions(config, last: Tensor, computed: int) -> tuple[Tensor, Tensor]:
    """The last W positions of each row (those the next token's window reads) and whether each is state."""
    w = min(config.window or 0, computed)
    pos = last[:, None] + torch.arange(1 - w, 1, device=last.device)
    return pos, pos >= _first_needed(config, last)[:, None]


def _set_ring_meta(cache: PHDCache, ring_pos: Tensor, ring_valid: Tensor) -> Tensor:
    """Record the ring's hidden tokens in the cache metadata; returns their slots [B, w*(K-1)] (position-major)."""
    repeat_k = cache.config.repeat_k
    pos, copy = hidden_tokens(ring_pos, repeat_k)
    slots = cache.ring_slot(pos, copy)
    cache.slot_pos.scatter_(1, slots, torch.where(ring_valid.repeat_interleave(repeat_k - 1, dim=1), pos, -1))
    return slots


@dataclass
class _Tokens:
    """A bounded prefill's tokens, [hidden tokens of each row's last P positions, position-major | T originals],
    with their (position, copy) metadata; `valid` is False for hidden positions a row does not need (before 0 or
    its chunk). Each layer reads a suffix of the previous layer's set, so a block's output is the next input."""

    pos: Tensor  # [B, M]
    copy: Tensor  # [M]
    valid: Tensor  # [B, M]
    cos: Tensor  # [B, 1, M, D]
    sin: Tensor

    def __getitem__(self, cols: slice) -> _Tokens:
        return _Tokens(self.pos[:, cols], self.copy[cols], self.valid[:, cols], self.cos[..., cols, :],
                       self.sin[..., cols, :])


def _prefill_tokens(model, last: Tensor, n_positions: int, seq_len: int) -> _Tokens:
    cfg = model.config
    hidden = last[:, None] + torch.arange(1 - n_positions, 1, device=last.device)
    hid_pos, hid_copy = hidden_tokens(hidden, cfg.repeat_k)
    orig_pos = torch.arange(seq_len, device=last.device)
    pos = torch.cat([hid_pos, orig_pos.expand(last.shape[0], -1)], dim=1)
    copy = torch.cat([hid_copy, torch.ones_like(orig_pos)])
    valid = (pos >= _first_needed(cfg, last)[:, None]) | (copy == 1)
    return _Tokens(pos, copy, valid, *model.rope_at(pos, copy))


def _rule_mask(config, keys: _Tokens, q_pos: Tensor, q_copy: Tensor, q_valid: Tensor) -> Tensor:
    """Bool [B, 1, Q, M]: `masks.visible` between queries (q_pos, q_copy, q_valid) [B, Q] and `keys`."""
    return visible(q_pos, q_copy, q_valid, keys.pos, keys.copy, keys.valid, config.window, config.chunk)[:, None]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


def _prefill_attention(cache: PHDCache, layer: int, n_hidden: int, mask: Tensor | None, originals_query: bool,
                       ring_slots: Tensor) -> Attend:
    """Layer `layer`'s attention over a token set whose first `n_hidden` rows are hidden: writes the originals' and
    the ring's K/V to the cache; the first mask.shape[2] queries attend by `mask`, the rest (`originals_query`:
    every original) in one causal pass over the originals, exactly vanilla."""
    ring = slice(n_hidden - ring_slots.shape[1], n_hidden)
    n_masked = 0 if mask is None else mask.shape[2]

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cache.write_prefix(layer, k[:, :, n_hidden:], v[:, :, n_hidden:])
        cache.write(layer, ring_slots, k[:, :, ring], v[:, :, ring])
        parts = [_sdpa(q[:, :, :n_masked], k, v, mask)] if n_masked else []
        if originals_query:
            parts.append(_sdpa(q[:, :, n_masked:], k[:, :, n_hidden:], v[:, :, n_hidden:], causal=True))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    return attend


def _prefill_bounded(model, ids: Tensor, lengths: Tensor, cache: PHDCache) -> Tensor:
    """Every layer computes K/V of its token set and queries only for the next layer's set (a suffix); the last
    layer only for copy K of each row's last position."""
    cfg = model.config
    t = ids.shape[1]
    last = lengths - 1
    span = None
    if cfg.chunk is not None:  # the chunk holding each row's last token (one host sync; prefill syncs anyway)
        span = int((last - _first_needed(cfg, last)).max()) + 1
    widths = hidden_widths(cfg, t, span)
    n_keys = [keys * (cfg.repeat_k - 1) + t for keys, _ in widths]
    tokens = _prefill_tokens(model, last, widths[0][0], t)
    ring_slots = _set_ring_meta(cache, *_ring_positions(cfg, last, widths[-1][0]))
    x = model.embed(ids.gather(1, tokens.pos.clamp(min=0)))
    for i, block in enumerate(model.layers):
        n = n_keys[i]
        keys = tokens[n_keys[0] - n :]
        if i + 1 < len(model.layers):
            rows = n_keys[i + 1]
            queries = keys[n - rows : n - t]  # the hidden ones; every original is a query too
            mask = _rule_mask(cfg, keys, queries.pos, queries.copy, queries.valid) if rows > t else None
            attend = _prefill_attention(cache, i, n - t, mask, True, ring_slots)
        else:
            rows = ((keys.pos == last[:, None]) & (keys.copy == cfg.repeat_k)).int().argmax(1, keepdim=True)
            q_copy = torch.full_like(rows, cfg.repeat_k)
            mask = _rule_mask(cfg, keys, last[:, None], q_copy, torch.ones_like(rows, dtype=torch.bool))
            attend = _prefill_attention(cache, i, n - t, mask, False, ring_slots)
        x = block(x, keys.cos, keys.sin, attend, rows)
    return model.lm_head(model.norm(x[:, 0]))


def _prefill_full(model, ids: Tensor, lengths: Tensor, cache: PHDCache, all_logits: bool = False) -> Tensor:
    """The training-time forward over all K*T tokens (the paper's prefill), its attention filling the cache.

    all_logits: logits [B, T, vocab] of every position (copy K of each), else [B, vocab] of each row's last."""
    cfg = model.config
    t = ids.shape[1]
    last = lengths - 1
    layout = model.layout(t)
    ring_pos, ring_valid = _ring_positions(cfg, last, t)
    ring_slots = _set_ring_meta(cache, ring_pos, ring_valid)
    ring_index = layout.hidden_index(*hidden_tokens(ring_pos.clamp(min=0), cfg.repeat_k))  # [B, w*(K-1)]
    train = LayoutAttention(layout, resolve_backend(cfg.attn_backend, ids.device, needs_grad=False))

    def attention(layer: int) -> Attend:
        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            cache.write_prefix(layer, k[:, :, : layout.cached_tokens], v[:, :, : layout.cached_tokens])
            if ring_slots.shape[1]:
                gather = ring_index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
                cache.write(layer, ring_slots, k.gather(2, gather), v.gather(2, gather))
            return train(q, k, v)

        return attend

    h = model.hidden_states(ids, attention=attention)
    if all_logits:
        return model.lm_head(model.norm(layout.final_copies(h)))
    return model.lm_head(model.norm(pick_rows(h, layout.final_index(last)[:, None])[:, 0]))


@torch.inference_mode()
def prefill(model, input_ids: Tensor, cache: PHDCache, lengths: Tensor | None = None,
            attention_mask: Tensor | None = None, mode: str = "bounded", all_logits: bool = False) -> Tensor:
    """Fill an (emptied) cache with the prompts; logits [B, vocab] for the token after each prompt.

    input_ids [B, T], right-padded when `lengths` [B] is given; or any padding side with `attention_mask`.
    mode: "bounded" (hidden tokens only where the future needs them) or "full" (the paper's K-fold prefill).
    all_logits: logits [B, T, vocab] of every position instead, rows moved to the right (as `lengths` says);
    it needs the full prefill, which then computes them at no extra cost.
    """
    if mode not in PREFILL_MODES:
        raise ValueError(f"mode={mode!r} is unknown: use 'bounded' (default) or 'full' (the paper's prefill)")
    if cache.config != model.config:
        raise ValueError("the cache was made for another model config; make it with model.new_cache(...)")
    ids, lengths = _prompt_lengths(model, input_ids, cache, lengths, attention_mask)
    cache.reset()
    if mode == "full" or all_logits or model.config.naive:
        logits = _prefill_full(model, ids, lengths, cache, all_logits)
    else:
        logits = _prefill_bounded(model, ids, lengths, cache)
    cache.lengths.copy_(lengths)
    cache.longest = int(lengths.max())
    return logits


# ----------------------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def decode_step(model, token_ids: Tensor, cache: PHDCache, check: bool = True) -> Tensor:
    """Append token_ids [B] at each row's next position; logits [B, vocab] for the token after it.

    The K copies of each token are K query rows of one pass. (n, 1)'s K/V go to the originals (for naive
    repetition all K copies do), (n, 2..K)'s to the ring slot of position n; in the last layer only copy K
    is a query. `check=False` skips the token-id range check (a host sync) for callers that sampled the ids.
    """
    cfg = model.config
    if token_ids.dim() != 1 or token_ids.shape[0] != cache.batch_size:
        raise ValueError(
            f"token_ids must be [batch_size={cache.batch_size}] (one new token per row), got {tuple(token_ids.shape)}"
        )
    if cache.config is not cfg and cache.config != cfg:
        raise ValueError("the cache was made for another model config; make it with model.new_cache(...)")
    if cache.longest == 0:
        raise ValueError("the cache is empty: call prefill(input_ids, cache) before decode_step")
    if cache.longest >= cache.capacity:
        raise ValueError(
            f"the cache is full (capacity={cache.capacity} tokens per row): make a larger cache with "
            "model.new_cache(batch_size, max_len)"
        )
    if check:
        check_token_ids(token_ids, cfg.vocab_size, "token_ids")
    auto_kernel(model)  # once per model: the K copies at about one row's cost on CPU (a no-op elsewhere)
    repeat_k = cfg.repeat_k
    pos = cache.lengths
    copies = torch.arange(1, repeat_k + 1, device=token_ids.device)
    q_pos = pos[:, None].expand(-1, repeat_k)
    if cfg.is_causal:
        slots = cache.orig_slot(q_pos, copies)
    else:
        ring = cache.ring_slot(q_pos[:, 1:], copies[1:])
        if cfg.chunk is not None:  # CSWA: a row entering a new chunk starts with an empty window
            starts = (pos % cfg.chunk == 0)[:, None]
            cache.slot_pos[:, : cache.ring_slots].masked_fill_(starts, -1)
        cache.slot_pos.scatter_(1, ring, q_pos[:, 1:])
        slots = torch.cat([cache.orig_slot(pos)[:, None], ring], dim=1)
    n_slots = cache.used_slots(cache.longest + 1)
    mask = cache.mask(q_pos, copies, n_slots)
    cos, sin = model.rope_at(q_pos, copies)

    def attention(layer: int) -> Attend:
        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            cache.write(layer, slots, k, v.expand(-1, -1, repeat_k, -1))
            keys, values = cache.keys[layer][:, :, :n_slots], cache.values[layer][:, :, :n_slots]
            return _sdpa(q, keys, values, mask[:, :, mask.shape[2] - q.shape[2] :])

        return attend

    x = decode_layers(model, model.embed(token_ids)[:, None], cos, sin, attention)
    cache.lengths += 1
    cache.longest += 1
    return model.lm_head(x)


def decode_layers(model, x: Tensor, cos: Tensor, sin: Tensor, attention: Callable[[int], Attend]) -> Tensor:
    """A decode step's layers (this engine's and the vLLM plugin's): x [B, 1, d] stands for each row's K copies,
    which share one input, so layer 0 projects it once and RoPE (cos / sin [B, 1, K, D]) spreads it over the K
    positions; in the last layer only copy K is a query (the other copies' outputs there are never read).
    attention(i): layer i's. Returns copy K's final hidden state [B, d] after the final norm."""
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):
        x = block(x, cos, sin, attention(i), 1 if i == last else None)
    return model.norm(x[:, -1])
