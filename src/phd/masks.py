"""The attention rule of PHD (spec section 3), in exactly one place, and the token layouts it is applied to.

Tokens are named (n, s): position n in 0..T-1, copy s in 1..K; (n, 1) is the original token, (n, s >= 2) are
hidden decoding tokens. Every backend, the inference cache and the tests derive their masks from `allowed`.

The window W counts positions: a hidden query at position n sees the hidden copies of positions n-W .. n-1
(and, as always, copies 1..j of its own position). With a chunk C that window is clipped to the chunk
[C * (n // C), n]: positions in another chunk are never seen by hidden queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def allowed(
    q_pos: Tensor, q_copy: Tensor, k_pos: Tensor, k_copy: Tensor, window: int | None, chunk: int | None
) -> Tensor:
    """True where query (q_pos, q_copy) may attend key (k_pos, k_copy); broadcasts like arithmetic."""
    earlier_original = (k_copy == 1) & (k_pos < q_pos)
    own_group = (k_pos == q_pos) & (k_copy <= q_copy)
    rule = earlier_original | own_group
    if window is not None:
        hidden_window = (q_copy >= 2) & (k_copy >= 2) & (k_pos < q_pos) & (k_pos >= q_pos - window)
        if chunk is not None:
            hidden_window = hidden_window & (k_pos // chunk == q_pos // chunk)
        rule = rule | hidden_window
    return rule


def interleaved_index(seq_len: int, repeat_k: int, device: torch.device | str | None = None):
    """(position, copy) of every token in interleaved order: token (n, s) at index n*K + s - 1."""
    idx = torch.arange(seq_len * repeat_k, device=device)
    return idx // repeat_k, idx % repeat_k + 1


def split_index(seq_len: int, repeat_k: int, device: torch.device | str | None = None):
    """(position, copy) in the training layout [T originals | (K-1)*T hidden, position-major].

    Hidden token (n, s) sits at T + n*(K-1) + (s-2): within the hidden block, the window of a query is a
    contiguous band that ends at the query itself (spec section 5).
    """
    t, k = seq_len, repeat_k
    orig = torch.arange(t, device=device)
    hid = torch.arange(t * (k - 1), device=device)
    pos = torch.cat([orig, hid // max(k - 1, 1)])
    copy = torch.cat([torch.ones_like(orig), hid % max(k - 1, 1) + 2])
    return pos, copy


def reference_mask(
    T: int, repeat_k: int, window: int | None = None, chunk: int | None = None, device=None
) -> Tensor:
    """Bool [K*T, K*T] in interleaved order, True where the query row may attend the key column."""
    pos, copy = interleaved_index(T, repeat_k, device)
    return allowed(pos[:, None], copy[:, None], pos[None, :], copy[None, :], window, chunk)


@dataclass(frozen=True)
class AttentionLayout:
    """What an attention backend needs to know about the token sequence it is given.

    `split`: PHD tokens in the training layout (see split_index). `interleaved` with `naive`: the repeat-K
    baseline, plain causal attention over the repeated sequence.
    """

    seq_len: int
    repeat_k: int
    window: int | None = None
    chunk: int | None = None
    naive: bool = False

    @property
    def num_tokens(self) -> int:
        return self.seq_len * self.repeat_k

    @property
    def is_causal(self) -> bool:
        """Plain causal attention over the given order (vanilla, or naive repetition)."""
        return self.naive or self.repeat_k == 1

    def index(self, device=None) -> tuple[Tensor, Tensor]:
        if self.naive:
            return interleaved_index(self.seq_len, self.repeat_k, device)
        return split_index(self.seq_len, self.repeat_k, device)

    def dense_mask(self, device=None) -> Tensor:
        """Bool [N, N] for this layout's order, from the one rule (or causal for naive repetition)."""
        n = self.num_tokens
        if self.is_causal:
            return torch.ones(n, n, dtype=torch.bool, device=device).tril()
        pos, copy = self.index(device)
        return allowed(pos[:, None], copy[:, None], pos[None, :], copy[None, :], self.window, self.chunk)

    def mask_mod(self):
        """A flex_attention mask_mod over this layout, computing (position, copy) from the flat index."""
        t, k, window, chunk = self.seq_len, self.repeat_k, self.window, self.chunk
        if self.is_causal:
            return lambda b, h, q_idx, kv_idx: kv_idx <= q_idx
        hidden_width = k - 1

        def to_token(idx):
            hid = idx - t
            is_orig = idx < t
            pos = torch.where(is_orig, idx, hid // hidden_width)
            copy = torch.where(is_orig, torch.ones_like(idx), hid % hidden_width + 2)
            return pos, copy

        def mask_mod(b, h, q_idx, kv_idx):
            qp, qc = to_token(q_idx)
            kp, kc = to_token(kv_idx)
            return allowed(qp, qc, kp, kc, window, chunk)

        return mask_mod
