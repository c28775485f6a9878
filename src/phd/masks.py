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


def visible(q_pos: Tensor, q_copy: Tensor, q_valid: Tensor, k_pos: Tensor, k_copy: Tensor, k_valid: Tensor,
            window: int | None, chunk: int | None) -> Tensor:
    """Bool [..., Q, N]: `allowed` between queries (q_pos, q_copy, q_valid [..., Q]) and keys (k_pos, k_copy,
    k_valid [..., N]), broadcasting. Inference pads rows to a common width: a padding query (q_valid False) may see
    any key the rule allows, so no softmax row is empty, while a real query sees only real keys."""
    rule = allowed(q_pos[..., :, None], q_copy[..., :, None], k_pos[..., None, :], k_copy[..., None, :], window, chunk)
    return rule & (k_valid[..., None, :] | ~q_valid[..., :, None])


# ----------------------------------------------------------------------------------------------------------
# The token layout: where token (n, s) sits, written once. Every order the code uses is built from these.
# ----------------------------------------------------------------------------------------------------------


def interleaved_offset(pos, copy, repeat_k: int):
    """n*K + s - 1: token (n, s) in the interleaved order (naive repetition, the reference mask, the naive cache)
    and its `expanded` RoPE position (spec section 4). Ints or tensors."""
    return pos * repeat_k + copy - 1


def interleaved_token(idx: Tensor, repeat_k: int) -> tuple[Tensor, Tensor]:
    """(position, copy) at interleaved index idx: the inverse of interleaved_offset."""
    return idx // repeat_k, idx % repeat_k + 1


def hidden_offset(pos, copy, repeat_k: int):
    """n*(K-1) + s - 2: hidden token (n, s >= 2) among the hidden tokens of positions 0, 1, ..., position-major
    (the training layout's hidden block, the split backend's band, the cache's ring). Ints or tensors."""
    return pos * (repeat_k - 1) + copy - 2


def hidden_token(idx: Tensor, repeat_k: int) -> tuple[Tensor, Tensor]:
    """(position, copy) at hidden offset idx: the inverse of hidden_offset."""
    per_position = max(repeat_k - 1, 1)
    return idx // per_position, idx % per_position + 2


def hidden_tokens(positions: Tensor, repeat_k: int) -> tuple[Tensor, Tensor]:
    """The hidden tokens of `positions` [..., P], position-major: pos [..., P*(K-1)], copy [P*(K-1)]."""
    pos = positions.repeat_interleave(repeat_k - 1, dim=-1)
    copy = torch.arange(2, repeat_k + 1, device=positions.device).repeat(positions.shape[-1])
    return pos, copy


def rope_position(pos: Tensor, copy: Tensor, repeat_k: int, scheme: str) -> Tensor:
    """RoPE position of token (n, s): K*n + s - 1 (`expanded`, as in the repeated sequence) or n (`shared`)."""
    return pos if scheme == "shared" else interleaved_offset(pos, copy, repeat_k)


def split_token(idx: Tensor, seq_len: int, repeat_k: int) -> tuple[Tensor, Tensor]:
    """(position, copy) at index idx of the training layout [T originals | (K-1)*T hidden, position-major]."""
    is_orig = idx < seq_len
    hid_pos, hid_copy = hidden_token(idx - seq_len, repeat_k)
    return torch.where(is_orig, idx, hid_pos), torch.where(is_orig, torch.ones_like(idx), hid_copy)


def interleaved_index(seq_len: int, repeat_k: int, device: torch.device | str | None = None):
    """(position, copy) of every token in interleaved order: token (n, s) at index n*K + s - 1."""
    return interleaved_token(torch.arange(seq_len * repeat_k, device=device), repeat_k)


def split_index(seq_len: int, repeat_k: int, device: torch.device | str | None = None):
    """(position, copy) in the training layout [T originals | (K-1)*T hidden, position-major].

    Hidden token (n, s) sits at T + n*(K-1) + (s-2): within the hidden block, the window of a query is a
    contiguous band that ends at the query itself (spec section 5).
    """
    return split_token(torch.arange(seq_len * repeat_k, device=device), seq_len, repeat_k)


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
        """(position, copy) of every token, in this layout's order."""
        if self.naive:
            return interleaved_index(self.seq_len, self.repeat_k, device)
        return split_index(self.seq_len, self.repeat_k, device)

    def hidden_index(self, pos, copy):
        """Index of hidden token (pos, copy >= 2) in the training layout: T + n*(K-1) + s - 2."""
        return self.seq_len + hidden_offset(pos, copy, self.repeat_k)

    def final_index(self, pos):
        """Index of copy K of position pos: the token whose output predicts the next token."""
        repeat_k = self.repeat_k
        if self.is_causal:
            return interleaved_offset(pos, repeat_k, repeat_k)
        return self.hidden_index(pos, repeat_k)

    def final_copies(self, h: Tensor) -> Tensor:
        """[B, N, ...] in this layout's order -> [B, T, ...]: copy K of every position."""
        first = self.final_index(0)
        return h[:, first :: self.final_index(1) - first]

    @property
    def cached_tokens(self) -> int:
        """The leading tokens whose K/V a cache keeps as originals: the T originals (naive repetition: all)."""
        return self.num_tokens if self.naive else self.seq_len

    @property
    def band_reach(self) -> int:
        """Hidden keys before a hidden query's own slot that it may see: W*(K-1) of the window, K-2 of its own
        position's earlier copies (the band of the split backend)."""
        return (self.window or 0) * (self.repeat_k - 1) + self.repeat_k - 2

    def expand(self, h: Tensor) -> Tensor:
        """Embeddings [B, T, d] -> [B, K*T, d] in this layout's order."""
        repeat_k = self.repeat_k
        if repeat_k == 1:
            return h
        if self.naive:
            return h.repeat_interleave(repeat_k, dim=1)
        return torch.cat([h, h.repeat_interleave(repeat_k - 1, dim=1)], dim=1)

    def dense_mask(self, device=None) -> Tensor:
        """Bool [N, N] for this layout's order, from the one rule (or causal for naive repetition)."""
        n = self.num_tokens
        if self.is_causal:
            return torch.ones(n, n, dtype=torch.bool, device=device).tril()
        pos, copy = self.index(device)
        return allowed(pos[:, None], copy[:, None], pos[None, :], copy[None, :], self.window, self.chunk)

    def mask_mod(self):
        """A flex_attention mask_mod over this layout, computing (position, copy) from the flat index."""
        seq_len, repeat_k, window, chunk = self.seq_len, self.repeat_k, self.window, self.chunk
        if self.is_causal:
            return lambda b, h, q_idx, kv_idx: kv_idx <= q_idx

        def mask_mod(b, h, q_idx, kv_idx):
            q_pos, q_copy = split_token(q_idx, seq_len, repeat_k)
            kv_pos, kv_copy = split_token(kv_idx, seq_len, repeat_k)
            return allowed(q_pos, q_copy, kv_pos, kv_copy, window, chunk)

        return mask_mod
