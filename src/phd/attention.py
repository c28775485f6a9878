"""Attention backends for the PHD training-time forward. All take q [B, H, N, D], k/v [B, Hkv, N, D] in the
order of an `AttentionLayout` and return [B, H, N, D]. Each one is tested against `dense`.

- dense: the reference; SDPA with the boolean mask of `masks.allowed` over all N = K*T tokens (K^2 cost).
- split: the paper's rearranged layout. Originals by causal SDPA (exactly vanilla); hidden queries by a causal
  pass against the originals plus a narrow band over the hidden tokens (own group and window), the two
  merged exactly through their log-sum-exp. Cost grows like K, not K^2. Forward and backward on any device.
- flex: flex_attention with a block mask from the same rule; the training path on CUDA.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import AttentionLayout

BAND_BLOCK = 64  # hidden query rows per band block: each row looks at BAND_BLOCK + band_width keys


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[B, Hkv, N, D] -> [B, Hkv*n_rep, N, D], query head h reading kv head h // n_rep (GQA)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout) -> Tensor:
    n_rep = q.shape[1] // k.shape[1]
    mask = layout.dense_mask(q.device)
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    n_rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), is_causal=True)


# ----------------------------------------------------------------------------------------------------------
# Attention with log-sum-exp: the two kernels the split backend merges with.
# `fwd` returns (out, lse [B, H, L] fp32). `bwd` is called with the FINAL merged out and lse: then
# P = exp(S - lse) are the merged probabilities restricted to this part and D = rowsum(dO * out) is the merged
# row term, so each part's gradient is exactly its share of the merged attention's gradient.
# ----------------------------------------------------------------------------------------------------------


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


class MathKernel:
    """Portable explicit-matmul kernel (any device; materialises the score matrix)."""

    @staticmethod
    def _scores(q, k, causal, mask, scale):
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        if causal:
            lq, lk = s.shape[-2:]
            s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril().logical_not(), -math.inf)
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf)
        return s

    @classmethod
    def fwd(cls, q, k, v, causal, mask, scale):
        s = cls._scores(q, k, causal, mask, scale)
        lse = torch.logsumexp(s, dim=-1)
        out = torch.matmul(torch.exp(s - lse[..., None]), v.float()).to(q.dtype)
        return out, lse

    @classmethod
    def bwd(cls, dout, q, k, v, out, lse, causal, mask, scale):
        s = cls._scores(q, k, causal, mask, scale)
        p = torch.exp(s - lse[..., None])
        dout32 = dout.float()
        dv = torch.matmul(p.transpose(-1, -2), dout32)
        dp = torch.matmul(dout32, v.float().transpose(-1, -2))
        row = (dout32 * out.float()).sum(-1, keepdim=True)
        ds = p * (dp - row) * scale
        dq = torch.matmul(ds, k.float())
        dk = torch.matmul(ds.transpose(-1, -2), q.float())
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class CpuFlashKernel:
    """PyTorch's fused CPU flash-attention kernel, which also returns the log-sum-exp."""

    @staticmethod
    def fwd(q, k, v, causal, mask, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=_additive(mask, q.dtype), scale=scale
        )
        return out, lse.float()

    @staticmethod
    def bwd(dout, q, k, v, out, lse, causal, mask, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), 0.0, causal,
            attn_mask=_additive(mask, q.dtype), scale=scale,
        )


def pick_kernel(device: torch.device):
    if device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return CpuFlashKernel
    return MathKernel


# ----------------------------------------------------------------------------------------------------------
# The split backend.
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _band_plan(layout: AttentionLayout, device: torch.device):
    """Key indices and mask of the hidden band, in blocks of BAND_BLOCK hidden query rows.

    Hidden row r = n*(K-1) + j - 2 needs hidden keys from (n - W)*(K-1) to r (no window: from n*(K-1)), so
    block b reads the padded hidden keys [b*BAND_BLOCK - pad, (b+1)*BAND_BLOCK) with pad = W*(K-1) + K - 2.
    The mask comes from `allowed`; rows past the end (padding) see every key, and are dropped.
    """
    from .masks import allowed

    t, k = layout.seq_len, layout.repeat_k
    rows = t * (k - 1)
    pad = (layout.window or 0) * (k - 1) + k - 2
    nb = -(-rows // BAND_BLOCK)
    width = BAND_BLOCK + pad
    row = torch.arange(nb * BAND_BLOCK, device=device).view(nb, BAND_BLOCK)
    col = (torch.arange(nb, device=device) * BAND_BLOCK)[:, None] + torch.arange(width, device=device) - pad
    real_col = (col >= 0) & (col < rows)
    colc = col.clamp(0, rows - 1)
    qp, qc = row // (k - 1), row % (k - 1) + 2
    kp, kc = colc // (k - 1), colc % (k - 1) + 2
    mask = allowed(qp[:, :, None], qc[:, :, None], kp[:, None, :], kc[:, None, :], layout.window, layout.chunk)
    mask = mask & real_col[:, None, :]
    mask = mask | (row >= rows)[:, :, None]
    gather = col + pad  # index into keys left-padded by `pad` zeros and right-padded to cover the last block
    return gather, mask, pad, nb, width


def _to_heads(x: Tensor, k1: int) -> Tensor:
    """Hidden rows [B, H, T*(K-1), ...] (position-major) -> [B, H*(K-1), T, ...] (copies as extra heads)."""
    b, h, rows = x.shape[:3]
    t = rows // k1
    x = x.reshape(b, h, t, k1, *x.shape[3:]).transpose(2, 3)
    return x.reshape(b, h * k1, t, *x.shape[4:])


def _from_heads(x: Tensor, k1: int) -> Tensor:
    b, hk, t = x.shape[:3]
    h = hk // k1
    x = x.reshape(b, h, k1, t, *x.shape[3:]).transpose(2, 3)
    return x.reshape(b, h, t * k1, *x.shape[4:])


def _to_band(x: Tensor, nb: int) -> Tensor:
    """Hidden rows [B, H, R, ...] -> [B, H*nb, BAND_BLOCK, ...], zero-padded to nb blocks."""
    b, h, rows = x.shape[:3]
    extra = nb * BAND_BLOCK - rows
    if extra:
        x = torch.cat([x, x.new_zeros(b, h, extra, *x.shape[3:])], dim=2)
    return x.reshape(b, h * nb, BAND_BLOCK, *x.shape[3:])


def _from_band(x: Tensor, rows: int, heads: int) -> Tensor:
    b = x.shape[0]
    return x.reshape(b, heads, -1, *x.shape[3:])[:, :, :rows]


def _band_keys(x: Tensor, gather: Tensor, pad: int, nb: int, width: int) -> Tensor:
    b, h, rows, d = x.shape
    padded = F.pad(x, (0, 0, pad, nb * BAND_BLOCK - rows))
    return padded[:, :, gather.reshape(-1)].reshape(b, h * nb, width, d)


class _HiddenAttention(torch.autograd.Function):
    """Hidden queries against (causal originals) + (hidden band), merged exactly by log-sum-exp."""

    @staticmethod
    def forward(ctx, qh, ko, vo, kh, vh, layout: AttentionLayout, kernel, scale: float):
        b, h, rows, d = qh.shape
        k1 = layout.repeat_k - 1
        gather, mask, pad, nb, width = _band_plan(layout, qh.device)
        band_mask = mask.repeat(h, 1, 1).unsqueeze(0)

        qa = _to_heads(qh, k1)
        ka = ko.repeat_interleave(k1, dim=1)
        va = vo.repeat_interleave(k1, dim=1)
        out_a, lse_a = kernel.fwd(qa, ka, va, True, None, scale)
        qb = _to_band(qh, nb)
        kb = _band_keys(kh, gather, pad, nb, width)
        vb = _band_keys(vh, gather, pad, nb, width)
        out_b, lse_b = kernel.fwd(qb, kb, vb, False, band_mask, scale)

        lse_a = _from_heads(lse_a, k1)
        out_a = _from_heads(out_a, k1)
        lse_b_all = lse_b.reshape(b, h, -1)
        lse_b, out_b = lse_b_all[:, :, :rows], _from_band(out_b, rows, h)
        lse = torch.logaddexp(lse_a, lse_b)
        out = (torch.exp(lse_a - lse)[..., None] * out_a.float() + torch.exp(lse_b - lse)[..., None] * out_b.float())
        out = out.to(qh.dtype)
        # Band rows past the end keep their own statistics (they are dropped, their gradient is zero).
        lse_band = torch.cat([lse, lse_b_all[:, :, rows:]], dim=2).reshape(b, h * nb, BAND_BLOCK)
        ctx.save_for_backward(qh, ko, vo, kh, vh, out, lse, lse_band)
        ctx.layout, ctx.kernel, ctx.scale = layout, kernel, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        qh, ko, vo, kh, vh, out, lse, lse_band = ctx.saved_tensors
        layout, kernel, scale = ctx.layout, ctx.kernel, ctx.scale
        b, h, rows, d = qh.shape
        k1 = layout.repeat_k - 1
        gather, mask, pad, nb, width = _band_plan(layout, qh.device)
        band_mask = mask.repeat(h, 1, 1).unsqueeze(0)
        dout = dout.to(qh.dtype)

        qa = _to_heads(qh, k1)
        ka = ko.repeat_interleave(k1, dim=1)
        va = vo.repeat_interleave(k1, dim=1)
        dqa, dka, dva = kernel.bwd(
            _to_heads(dout, k1), qa, ka, va, _to_heads(out, k1), _to_heads(lse, k1), True, None, scale
        )
        dko = dka.reshape(b, h, k1, -1, d).sum(2)
        dvo = dva.reshape(b, h, k1, -1, d).sum(2)

        qb = _to_band(qh, nb)
        kb = _band_keys(kh, gather, pad, nb, width)
        vb = _band_keys(vh, gather, pad, nb, width)
        out_band = _to_band(out, nb)
        dqb, dkb, dvb = kernel.bwd(_to_band(dout, nb), qb, kb, vb, out_band, lse_band, False, band_mask, scale)
        index = gather.reshape(-1)
        padded_rows = pad + nb * BAND_BLOCK
        dkh = dkb.new_zeros(b, h, padded_rows, d).index_add_(2, index, dkb.reshape(b, h, nb * width, d))
        dvh = dvb.new_zeros(b, h, padded_rows, d).index_add_(2, index, dvb.reshape(b, h, nb * width, d))
        dqh = _from_heads(dqa, k1) + _from_band(dqb, rows, h)
        return dqh, dko, dvo, dkh[:, :, pad : pad + rows], dvh[:, :, pad : pad + rows], None, None, None


def split_attention(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, kernel=None) -> Tensor:
    if layout.is_causal:
        return causal_attention(q, k, v)
    t = layout.seq_len
    n_rep = q.shape[1] // k.shape[1]
    kernel = kernel or pick_kernel(q.device)
    out_orig = causal_attention(q[:, :, :t], k[:, :, :t], v[:, :, :t])
    k_full, v_full = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    out_hidden = _HiddenAttention.apply(
        q[:, :, t:].contiguous(),
        k_full[:, :, :t].contiguous(),
        v_full[:, :, :t].contiguous(),
        k_full[:, :, t:].contiguous(),
        v_full[:, :, t:].contiguous(),
        layout,
        kernel,
        1.0 / math.sqrt(q.shape[-1]),
    )
    return torch.cat([out_orig, out_hidden], dim=2)


# ----------------------------------------------------------------------------------------------------------
# flex_attention
# ----------------------------------------------------------------------------------------------------------


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def _block_mask(layout: AttentionLayout, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    n = layout.num_tokens
    return create_block_mask(layout.mask_mod(), B=None, H=None, Q_LEN=n, KV_LEN=n, device=device)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout) -> Tensor:
    block_mask = _block_mask(layout, q.device)
    return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


# ----------------------------------------------------------------------------------------------------------


def resolve_backend(name: str, device: torch.device, needs_grad: bool) -> str:
    """`auto`: flex on CUDA (fused, block-sparse), split elsewhere (flex has no CPU backward)."""
    if name != "auto":
        if name == "flex" and device.type == "cpu" and needs_grad:
            raise RuntimeError(
                "attn_backend='flex' has no backward on CPU in this PyTorch; use 'split' (or 'auto') to train on CPU"
            )
        return name
    if device.type == "cuda" and flex_available():
        return "flex"
    return "split"


def attention(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, backend: str = "auto") -> Tensor:
    """The training-time attention of PHD over all K*T tokens, by the chosen backend."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    backend = resolve_backend(backend, q.device, needs_grad)
    if backend == "dense":
        return dense_attention(q, k, v, layout)
    if backend == "flex":
        return flex_attention(q, k, v, layout)
    return split_attention(q, k, v, layout)
