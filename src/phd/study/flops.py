"""Training FLOPs of a run: the figure that puts variants of different cost on one axis.

Counted as model FLOPs (the convention of Kaplan et al. and PaLM's MFU): a multiply-add is 2 FLOPs, the backward
pass costs twice the forward, so training costs 3x the forward. Per training sequence of T positions:

    matmul   = 2 * 3 * T * (K * L * P_layer + d * V)
    attention = 2 * 3 * 2 * L * n_heads * head_dim * pairs(T)

P_layer is the number of weights of one layer's projections and MLP (the matrices every token is multiplied by);
each of the K copies of a token goes through every layer, but only copy K reaches the output head (d x V), as in
the model. `pairs(T)` counts the (query, key) pairs the attention rule allows over the K*T tokens of the sequence
(QK^T and PV: 2 multiply-adds per pair and head dimension). Embedding lookups, norms, RoPE and the softmax are left
out: they are a few percent at these sizes and the same for every variant of one shape. Masked-out pairs that a
kernel computes anyway are not counted: this is the work the method needs, not what a given kernel spends.
"""

from __future__ import annotations

from ..config import PHDConfig


def layer_matmul_params(cfg: PHDConfig) -> int:
    """Weights one token meets in one layer: q, k, v, o projections and the three SwiGLU matrices."""
    d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
    return 2 * d * d + 2 * d * kv + 3 * d * cfg.d_ff


def attention_pairs(cfg: PHDConfig, seq_len: int) -> int:
    """(query, key) pairs the attention rule allows in one sequence of seq_len positions (closed form).

    Vanilla: T(T+1)/2. Naive repeat-K: causal over K*T tokens. PHD: every copy j of position n sees the n earlier
    originals and copies 1..j of its own position; SWA / CSWA add, for hidden copies, the K-1 hidden copies of each
    position of the window (W preceding positions, clipped to the chunk). The test checks this against a count of
    the dense reference mask.
    """
    t, k = seq_len, cfg.repeat_k
    if k == 1 or cfg.naive:
        n = k * t
        return n * (n + 1) // 2
    earlier = k * (t * (t - 1) // 2)  # every copy of position n sees the n earlier originals
    group = t * (k * (k + 1) // 2)  # copy j sees copies 1..j of its own position
    window = 0
    if cfg.window is not None:
        for n in range(t):
            start = n - cfg.window
            if cfg.chunk is not None:
                start = max(start, (n // cfg.chunk) * cfg.chunk)
            window += max(n - max(start, 0), 0)
        window *= (k - 1) * (k - 1)  # K-1 hidden queries, each seeing K-1 hidden keys per window position
    return earlier + group + window


def flops_per_sequence(cfg: PHDConfig, seq_len: int) -> int:
    """Training FLOPs (forward + backward) of one sequence of seq_len positions (see the module docstring)."""
    matmul = 6 * seq_len * (cfg.repeat_k * cfg.n_layers * layer_matmul_params(cfg) + cfg.d_model * cfg.vocab_size)
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * attention_pairs(cfg, seq_len)
    return matmul + attention


def flops_per_token(cfg: PHDConfig, seq_len: int) -> float:
    return flops_per_sequence(cfg, seq_len) / seq_len


def training_flops(cfg: PHDConfig, seq_len: int, tokens: int) -> int:
    """Training FLOPs of `tokens` training tokens (positions) in sequences of seq_len."""
    return flops_per_sequence(cfg, seq_len) * tokens // seq_len
