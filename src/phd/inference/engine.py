"""Prefill and decode with the PHD cache (spec section 6), built from the model's own modules.

Every layer runs the model's Block pieces (attn_input, Attention.project_q / project_kv / output,
attn_residual, mlp_residual) and every mask comes from `masks.allowed`, so inference cannot drift from the
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
`mode="full"` is the paper's prefill: the training-time forward over all K*T tokens; naive repetition always
uses it (its cache holds all K*T entries).

Decode: the K copies of each row's next token are K query rows of one forward pass against the cache.

Batches: rows are right-padded; `lengths[b]` tokens of row b are real. Each row has its own positions and
chunk phase; padding sits at future positions, which the rule never lets a real token see. An
`attention_mask` (1 = real token, left or right padded, as in Hugging Face) is accepted and converted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention import attention
from ..checks import check_token_ids
from ..masks import allowed
from .cache import PHDCache

PREFILL_MODES = ("bounded", "full")


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


def _rope(model, pos: Tensor, copy: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin for tokens (pos, copy): [N, D] for 1-D positions, [B, 1, N, D] for per-row [B, N]."""
    cos, sin = model.rope(model.token_positions(pos, copy))
    if pos.dim() == 2:
        cos, sin = cos[:, None], sin[:, None]
    return cos, sin


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------


def _right_pad(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Rows with one contiguous run of real tokens (left or right padded) -> right-padded rows, lengths."""
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}: "
            "they must match"
        )
    real = attention_mask.bool()
    lengths = real.sum(1)
    first = torch.where(real.any(1), real.int().argmax(1), torch.zeros_like(lengths))
    col = torch.arange(input_ids.shape[1], device=input_ids.device)
    contiguous = (real == ((col >= first[:, None]) & (col < (first + lengths)[:, None]))).all()
    if not bool(contiguous):
        raise ValueError("attention_mask must mark one contiguous run of real tokens per row (left or right padding)")
    index = (first[:, None] + col).clamp(max=input_ids.shape[1] - 1)
    return input_ids.gather(1, index), lengths


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
        input_ids, lengths = _right_pad(input_ids, attention_mask.to(input_ids.device))
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


def _set_ring_meta(cache: PHDCache, ring_pos: Tensor, ring_valid: Tensor, k1: int) -> Tensor:
    """Record the ring's positions in the cache metadata; returns the slots [B, w*(K-1)] to write."""
    copies = torch.arange(2, k1 + 2, device=ring_pos.device)
    pos = ring_pos.repeat_interleave(k1, dim=1)
    copy = copies.repeat(ring_pos.shape[1])
    slots = cache.ring_slot(pos, copy)
    cache.slot_pos.scatter_(1, slots, torch.where(ring_valid.repeat_interleave(k1, dim=1), pos, -1))
    return slots


@dataclass
class _HiddenSet:
    """The hidden tokens a bounded prefill carries from layer to layer, position-major, each row ending at its
    last prompt position; `valid` is False for positions a row does not need (before 0 or its chunk)."""

    x: Tensor  # [B, N, d]
    pos: Tensor  # [B, N]
    copy: Tensor  # [N]
    valid: Tensor  # [B, N]
    cos: Tensor  # [B, 1, N, D]
    sin: Tensor

    def last(self, n: int) -> _HiddenSet:
        return _HiddenSet(self.x[:, -n:], self.pos[:, -n:], self.copy[-n:], self.valid[:, -n:],
                          self.cos[..., -n:, :], self.sin[..., -n:, :])


def _hidden_set(model, ids: Tensor, last: Tensor, width: int) -> _HiddenSet:
    cfg = model.config
    k1 = cfg.repeat_k - 1
    hid_pos = last[:, None] + torch.arange(1 - width, 1, device=ids.device)  # [B, P]
    pos = hid_pos.repeat_interleave(k1, dim=1)  # (m, 2), ..., (m, K), (m+1, 2), ...
    copy = torch.arange(2, k1 + 2, device=ids.device).repeat(width)
    valid = (hid_pos >= _first_needed(cfg, last)[:, None]).repeat_interleave(k1, dim=1)
    x = model.embed(ids.gather(1, hid_pos.clamp(min=0))).repeat_interleave(k1, dim=1)
    return _HiddenSet(x, pos, copy, valid, *_rope(model, pos, copy))


def _prefill_bounded(model, ids: Tensor, lengths: Tensor, cache: PHDCache) -> Tensor:
    cfg = model.config
    b, t = ids.shape
    k1 = cfg.repeat_k - 1
    n_layers = len(model.layers)
    last = lengths - 1
    pos_o = torch.arange(t, device=ids.device)
    copy_o = torch.ones_like(pos_o)
    cos_o, sin_o = _rope(model, pos_o, copy_o)
    x = model.embed(ids)

    if k1:
        span = None
        if cfg.chunk is not None:  # the chunk holding each row's last token (one host sync; prefill syncs anyway)
            span = int((last - _first_needed(cfg, last)).max()) + 1
        widths = hidden_widths(cfg, t, span)
        hidden = _hidden_set(model, ids, last, widths[0][0])
        ring_slots = _set_ring_meta(cache, *_ring_positions(cfg, last, widths[-1][0]), k1)
        n_ring = ring_slots.shape[1]
        # Keys of a hidden query: all originals, then the hidden set (validity: see the mask below).
        key_pos_o, key_valid_o = pos_o.expand(b, -1), torch.ones(b, t, dtype=torch.bool, device=ids.device)

    for i, block in enumerate(model.layers):
        final = i == n_layers - 1
        # Originals: exactly vanilla. In the last layer only their K/V are needed (vanilla: its last query).
        a = block.attn_input(x)
        k_o, v_o = block.attn.project_kv(a, cos_o, sin_o)
        cache.write_prefix(i, k_o, v_o)
        if not final:
            o = _sdpa(block.attn.project_q(a, cos_o, sin_o), k_o, v_o, causal=True)
            x_next = block.mlp_residual(block.attn_residual(x, block.attn.output(o)))
        elif not k1:
            x_last = x.gather(1, last[:, None, None].expand(-1, 1, x.shape[-1]))
            q = block.attn.project_q(block.attn_input(x_last), *_rope(model, last[:, None], copy_o[:1]))
            mask = allowed(last[:, None, None, None], 1, pos_o, 1, None, None)
            o = _sdpa(q, k_o, v_o, mask)
            h_final = block.mlp_residual(block.attn_residual(x_last, block.attn.output(o)))[:, 0]
        if k1:
            # Hidden: K/V for the whole set, queries only for the tokens the next layer (or the logits) reads.
            n_out = 1 if final else widths[i][1] * k1
            a_h = block.attn_input(hidden.x)
            k_h, v_h = block.attn.project_kv(a_h, hidden.cos, hidden.sin)
            if n_ring:
                cache.write(i, ring_slots, k_h[:, :, -n_ring:], v_h[:, :, -n_ring:])
            out = hidden.last(n_out)
            q_h = block.attn.project_q(a_h[:, -n_out:], out.cos, out.sin)
            key_pos = torch.cat([key_pos_o, hidden.pos], dim=1)[:, None]
            key_copy = torch.cat([copy_o, hidden.copy])
            key_valid = torch.cat([key_valid_o, hidden.valid], dim=1)[:, None]
            # Padding queries (positions a row does not need) may see anything the rule allows, so no softmax
            # row is empty; real queries see only real keys.
            mask = allowed(out.pos[..., None], out.copy[:, None], key_pos, key_copy, cfg.window, cfg.chunk)
            mask = mask & (key_valid | ~out.valid[..., None])
            o = _sdpa(q_h, torch.cat([k_o, k_h], 2), torch.cat([v_o, v_h], 2), mask[:, None])
            out.x = block.mlp_residual(block.attn_residual(out.x, block.attn.output(o)))
            if final:
                h_final = out.x[:, -1]
            else:
                hidden = out.last(widths[i + 1][0] * k1)
        if not final:
            x = x_next
    return model.lm_head(model.norm(h_final))


def _prefill_full(model, ids: Tensor, lengths: Tensor, cache: PHDCache, all_logits: bool = False) -> Tensor:
    """The training-time forward over all K*T tokens (the paper's prefill), filling the cache on the way.

    all_logits: logits [B, T, vocab] of every position (copy K of each), else [B, vocab] of each row's last."""
    cfg = model.config
    b, t = ids.shape
    k = cfg.repeat_k
    last = lengths - 1
    layout = model.layout(t)
    pos, copy = layout.index(ids.device)
    cos, sin = model.rope(model.token_positions(pos, copy))
    h = model.expand_tokens(model.embed(ids), layout)
    if layout.is_causal:
        n_orig = t * k  # naive repetition caches every copy
        final_index = last * k + k - 1
    else:
        n_orig = t
        final_index = t + last * (k - 1) + k - 2
        ring_pos, ring_valid = _ring_positions(cfg, last, t)
        ring_slots = _set_ring_meta(cache, ring_pos, ring_valid, k - 1)
        copies = torch.arange(k - 1, device=ids.device)
        ring_index = t + (ring_pos.clamp(min=0)[:, :, None] * (k - 1) + copies).flatten(1)  # [B, w*(K-1)]
    backend = model.config.attn_backend
    for i, block in enumerate(model.layers):
        a = block.attn_input(h)
        q, k_all, v_all = block.attn.project(a, cos, sin)
        cache.write_prefix(i, k_all[:, :, :n_orig], v_all[:, :, :n_orig])
        if not layout.is_causal and ring_slots.shape[1]:
            gather = ring_index[:, None, :, None].expand(-1, k_all.shape[1], -1, k_all.shape[-1])
            cache.write(i, ring_slots, k_all.gather(2, gather), v_all.gather(2, gather))
        h = block.mlp_residual(block.attn_residual(h, block.attn.output(attention(q, k_all, v_all, layout, backend))))
    if all_logits:
        return model.lm_head(model.norm(model.final_copies(h, layout)))
    h_final = h.gather(1, final_index[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0]
    return model.lm_head(model.norm(h_final))


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
    if mode == "full" or all_logits or (model.config.naive and model.config.repeat_k > 1):
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
    k = cfg.repeat_k
    b = token_ids.shape[0]
    device = token_ids.device
    pos = cache.lengths
    copies = torch.arange(1, k + 1, device=device)
    q_pos = pos[:, None].expand(-1, k)
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
    cos, sin = _rope(model, q_pos, copies)
    x = model.embed(token_ids)[:, None].expand(b, k, -1)
    n_layers = len(model.layers)
    for i, block in enumerate(model.layers):
        # Layer 0: the K copies share one input, so project it once; RoPE then broadcasts it to the K positions.
        a = block.attn_input(x[:, :1] if i == 0 else x)
        k_new, v_new = block.attn.project_kv(a, cos, sin)
        cache.write(i, slots, k_new, v_new.expand(-1, -1, k, -1))
        if i == n_layers - 1:  # only copy K predicts; the other copies' outputs here are never read
            x, a, cos, sin, mask = x[:, -1:], a[:, -1:], cos[..., -1:, :], sin[..., -1:, :], mask[:, :, -1:]
        q = block.attn.project_q(a, cos, sin)
        o = _sdpa(q, cache.keys[i][:, :, :n_slots], cache.values[i][:, :, :n_slots], mask)
        x = block.mlp_residual(block.attn_residual(x, block.attn.output(o)))
    cache.lengths += 1
    cache.longest += 1
    return model.lm_head(model.norm(x[:, -1]))
