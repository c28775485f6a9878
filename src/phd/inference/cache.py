"""The PHD KV cache (spec section 6): the originals' K/V, exactly a vanilla cache, plus a small hidden window.

Physical layout, per layer, one key and one value buffer [B, Hkv, R + S, D]:

    slots [0, R)        the hidden ring: R = (W + 1) * (K - 1) slots for PHD-SWA/CSWA, K - 1 for PHD, 0 for
                        vanilla and naive repetition. Hidden token (m, i) lives in slot hidden_offset(m % (W + 1), i).
                        W positions are state (the window of the next token); the one extra position is where
                        the current step's hidden K/V are written, so that attention reads one contiguous view.
    slots [R, R + S)    the originals, written by position: (n, 1) at slot R + n (S = capacity).
                        Naive repetition keeps all K copies: (n, s) at slot interleaved_offset(n, s) (S = K * capacity).

Each slot carries logical metadata (position, copy); `slot_pos` = -1 marks an empty ring slot. Attention
masks are `masks.allowed` applied to that metadata (attention-gym's logical-to-physical translation), so the
rule stays in one place. Slots of future positions are excluded by the rule itself (they are never earlier),
which is also what keeps the padding of shorter rows out of every softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import PHDConfig
from ..masks import allowed, hidden_offset, hidden_token, interleaved_offset, interleaved_token


@dataclass(eq=False)  # identity, not tensor-wise comparison
class PHDCache:
    """Per-layer K/V buffers, slot metadata and each row's length. Built by `PHDTransformer.new_cache`."""

    config: PHDConfig
    keys: list[Tensor]
    values: list[Tensor]
    slot_pos: Tensor  # [B, R + S] position held by each slot; -1: empty
    slot_copy: Tensor  # [R + S] copy index of each slot
    ring_slots: int  # R
    capacity: int  # positions each row can hold
    lengths: Tensor  # [B] tokens held per row = the position the next token gets
    longest: int = 0  # host copy of lengths.max(): sizes the attended view without a device sync

    @classmethod
    @torch.no_grad()  # plain tensors (not inference tensors): callers may edit or reorder a cache freely
    def for_model(cls, model, batch_size: int, capacity: int | None = None, dtype: torch.dtype | None = None):
        weight = model.embed.weight
        return cls.for_config(model.config, batch_size, capacity, dtype or weight.dtype, weight.device)

    @classmethod
    @torch.no_grad()
    def for_config(cls, cfg: PHDConfig, batch_size: int, capacity: int | None = None,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> PHDCache:
        """An empty cache for any model of this config (device="meta" sizes one without allocating)."""
        capacity = cfg.max_seq_len if capacity is None else capacity
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is invalid: it must be an integer >= 1")
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity={capacity!r} is invalid: it must be an integer >= 1 (tokens per row)")
        if cfg.is_causal:
            ring = 0
            slot_pos, slot_copy = _original_slots(cfg, 0, capacity, device)
        else:
            ring = ((cfg.window or 0) + 1) * (cfg.repeat_k - 1)
            _, ring_copy = hidden_token(torch.arange(ring, device=device), cfg.repeat_k)
            orig_pos, orig_copy = _original_slots(cfg, 0, capacity, device)
            slot_pos = torch.cat([torch.full((ring,), -1, device=device), orig_pos])
            slot_copy = torch.cat([ring_copy, orig_copy])
        shape = (batch_size, cfg.n_kv_heads, slot_pos.shape[0], cfg.head_dim)
        return cls(
            config=cfg,
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)],
            slot_pos=slot_pos.expand(batch_size, -1).clone(),
            slot_copy=slot_copy,
            ring_slots=ring,
            capacity=capacity,
            lengths=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    # ----- sizes -----
    @property
    def batch_size(self) -> int:
        return self.slot_pos.shape[0]

    @property
    def window_positions(self) -> int:
        """Hidden positions kept as state between steps: W for SWA/CSWA, 0 otherwise."""
        cfg = self.config
        return 0 if cfg.is_causal or cfg.window is None else cfg.window

    @property
    def nbytes(self) -> int:
        """Bytes of state: the originals (a vanilla cache; K-fold for naive repetition) + (K-1)*W hidden entries.

        Equals the spec's formula: vanilla + L * 2 * (K-1) * W * kv_heads * head_dim elements per row.
        """
        cfg = self.config
        per_entry = 2 * cfg.n_kv_heads * cfg.head_dim * self.keys[0].element_size() * cfg.n_layers * self.batch_size
        hidden = (cfg.repeat_k - 1) * self.window_positions
        return per_entry * (self.keys[0].shape[2] - self.ring_slots + hidden)

    @property
    def allocated_nbytes(self) -> int:
        """Bytes allocated: `nbytes` plus the K-1 slots per layer the current step's hidden K/V are written to."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    # ----- bookkeeping -----
    def reset(self) -> None:
        """Forget every row (buffers are overwritten, not cleared: empty slots are excluded by metadata)."""
        self.slot_pos[:, : self.ring_slots] = -1
        self.lengths.zero_()
        self.longest = 0

    @torch.no_grad()
    def select_rows(self, index: Tensor) -> None:
        """Keep rows `index` [N] in this order (beam reordering, repeating or dropping rows); N may differ from B."""
        index = index.to(self.lengths.device)
        self.keys = [t.index_select(0, index) for t in self.keys]
        self.values = [t.index_select(0, index) for t in self.values]
        self.slot_pos = self.slot_pos.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)
        self.longest = int(self.lengths.max()) if self.lengths.numel() else 0

    @torch.no_grad()
    def grow(self, capacity: int) -> None:
        """Room for `capacity` tokens per row: more original slots appended (the slot layout is unchanged)."""
        if capacity <= self.capacity:
            return
        pos, copy = _original_slots(self.config, self.capacity, capacity, self.lengths.device)
        extra = pos.shape[0]

        def widen(t: Tensor) -> Tensor:
            return torch.cat([t, t.new_zeros(*t.shape[:2], extra, t.shape[3])], dim=2)

        self.keys = [widen(t) for t in self.keys]
        self.values = [widen(t) for t in self.values]
        self.slot_pos = torch.cat([self.slot_pos, pos.expand(self.batch_size, -1)], dim=1)
        self.slot_copy = torch.cat([self.slot_copy, copy])
        self.capacity = capacity

    def orig_slot(self, pos: Tensor, copy: Tensor | int = 1) -> Tensor:
        """Physical slot of original (pos, 1), or of (pos, copy) for naive repetition."""
        if self.config.naive:
            return interleaved_offset(pos, copy, self.config.repeat_k)
        return self.ring_slots + pos

    def ring_slot(self, pos: Tensor, copy: Tensor) -> Tensor:
        """Physical slot of hidden token (pos, copy >= 2); any integer pos maps into the ring."""
        return hidden_offset(torch.remainder(pos, (self.config.window or 0) + 1), copy, self.config.repeat_k)

    def used_slots(self, length: int) -> int:
        """Slots an attention over rows of at most `length` tokens must read (a contiguous prefix)."""
        return self.ring_slots + length * (self.config.repeat_k if self.config.is_causal else 1)

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Write k, v [B, Hkv, N, D] into slots [B, N] of `layer` (each row its own slots)."""
        if not slots.shape[1]:  # e.g. the ring of a variant without one
            return
        rows = torch.arange(self.batch_size, device=slots.device)[:, None]
        self.keys[layer][rows, :, slots] = k.transpose(1, 2)
        self.values[layer][rows, :, slots] = v.transpose(1, 2)

    def write_prefix(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Write the first N originals (slots of positions 0..N-1; naive: of interleaved tokens 0..N-1)."""
        n = k.shape[2]
        self.keys[layer][:, :, self.ring_slots : self.ring_slots + n] = k
        self.values[layer][:, :, self.ring_slots : self.ring_slots + n] = v

    def mask(self, q_pos: Tensor, q_copy: Tensor, n_slots: int) -> Tensor:
        """Bool [B, 1, Q, n_slots]: may query (q_pos [B, Q], q_copy [Q]) attend each of the first n_slots slots."""
        cfg = self.config
        kp = self.slot_pos[:, None, None, :n_slots]
        kc = self.slot_copy[:n_slots]
        qp, qc = q_pos[:, None, :, None], q_copy[:, None]
        if cfg.naive:  # plain causal attention over the interleaved sequence
            return interleaved_offset(kp, kc, cfg.repeat_k) <= interleaved_offset(qp, qc, cfg.repeat_k)
        return allowed(qp, qc, kp, kc, cfg.window, cfg.chunk) & (kp >= 0)


def _original_slots(cfg: PHDConfig, start: int, stop: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """(position, copy) of the original slots for positions start..stop-1 (naive / K = 1: all K copies)."""
    per_position = cfg.repeat_k if cfg.is_causal else 1
    return interleaved_token(torch.arange(start * per_position, stop * per_position, device=device), per_position)
