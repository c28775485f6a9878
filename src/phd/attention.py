"""Attention backends for the PHD training-time forward. All take q [B, H, N, D], k/v [B, Hkv, N, D] in the
order of an `AttentionLayout` and return [B, H, N, D]. Each one is tested against `dense`.

- dense: the reference; SDPA with the boolean mask of `masks.allowed` over all N = K*T tokens (K^2 cost).
- split: the paper's rearranged layout. Originals by causal SDPA (exactly vanilla); hidden queries by a causal
  pass against the originals plus a narrow band over the hidden tokens (own group and window), the two
  merged exactly through their log-sum-exp. Cost grows like K, not K^2. Forward and backward on any device; on
  CPU and CUDA with fused kernels (memory linear in T, no compiler needed).
- flex: flex_attention with a block mask from the same rule (compiled); `auto` picks it on CUDA when it works.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import AttentionLayout, allowed, hidden_token

BAND_BLOCK = 32  # hidden query rows per band block: each row looks at BAND_BLOCK + band_width keys


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[B, Hkv, N, D] -> [B, Hkv*n_rep, N, D], query head h reading kv head h // n_rep (GQA)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout) -> Tensor:
    n_rep = q.shape[1] // k.shape[1]
    mask = layout.dense_mask(q.device)
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


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
    """Portable explicit-matmul kernel (any device; materialises the score matrix). GQA by head repetition."""

    @staticmethod
    def _scores(q, k, causal, mask, scale):
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        if causal:
            lq, lk = s.shape[-2:]
            future = torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril().logical_not()
            s = s.masked_fill(future, -math.inf)
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf)
        return s

    @classmethod
    def fwd(cls, q, k, v, causal, mask, scale):
        n_rep = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        s = cls._scores(q, k, causal, mask, scale)
        lse = torch.logsumexp(s, dim=-1)
        out = torch.matmul(torch.exp(s - lse[..., None]), v.float()).to(q.dtype)
        return out, lse

    @classmethod
    def bwd(cls, dout, q, k, v, out, lse, causal, mask, scale):
        b, hkv, n, d = k.shape
        n_rep = q.shape[1] // hkv
        kr, vr = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        s = cls._scores(q, kr, causal, mask, scale)
        p = torch.exp(s - lse[..., None])
        dout32 = dout.float()
        dv = torch.matmul(p.transpose(-1, -2), dout32)
        dp = torch.matmul(dout32, vr.float().transpose(-1, -2))
        row = (dout32 * out.float()).sum(-1, keepdim=True)
        ds = p * (dp - row) * scale
        dq = torch.matmul(ds, kr.float())
        dk = torch.matmul(ds.transpose(-1, -2), q.float())
        dk = dk.reshape(b, hkv, n_rep, n, d).sum(2)
        dv = dv.reshape(b, hkv, n_rep, n, d).sum(2)
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
            dout, q, k, v, out, lse, 0.0, causal,
            attn_mask=_additive(mask, q.dtype), scale=scale,
        )


def _flash_applies(q: Tensor, mask: Tensor | None) -> bool:
    """The CUDA flash kernel takes no mask, only fp16/bf16, head dims that are multiples of 8 up to 256, and
    needs sm80+ (meta tensors, used to check the calls against the op schemas, count as such a GPU)."""
    d = q.shape[-1]
    if mask is not None or q.dtype not in (torch.float16, torch.bfloat16) or d % 8 or d > 256:
        return False
    return not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] >= 8


def _cuda_bias(mask: Tensor | None, q: Tensor) -> Tensor | None:
    """Additive bias [B, H, L, S] in q's dtype for the memory-efficient kernel: the batch and head sizes must
    be q's (heads may be a stride-0 expansion) and the row stride a multiple of 16 elements (alignment)."""
    if mask is None:
        return None
    b, _, rows, cols = mask.shape
    padded = torch.zeros(b, 1, rows, -(-cols // 16) * 16, dtype=q.dtype, device=mask.device)
    bias = padded[..., :cols].masked_fill_(~mask, float("-inf"))
    return bias.expand(q.shape[0], q.shape[1], rows, cols)


def _rng_placeholder(device: torch.device) -> Tensor:
    """The backward ops' philox seed / offset arguments, read only when dropout_p > 0 (never here)."""
    return torch.empty(0, dtype=torch.long, device=device)


class CudaKernel:
    """PyTorch's fused CUDA kernels, which return the log-sum-exp and have a backward: flash attention where it
    applies (fp16/bf16, no mask; GQA native), else the memory-efficient kernel (fp32 too, and an additive mask;
    GQA by repeating kv heads). Memory stays linear in the sequence length either way."""

    @staticmethod
    def fwd(q, k, v, causal, mask, scale):
        if _flash_applies(q, mask):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, scale=scale)[:2]
            return out, lse
        n_rep = q.shape[1] // k.shape[1]
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), _cuda_bias(mask, q), True, 0.0, causal, scale=scale
        )[:2]
        return out, lse[:, :, : q.shape[2]].contiguous()  # the kernel pads the rows to a multiple of 32

    @staticmethod
    def bwd(dout, q, k, v, out, lse, causal, mask, scale):
        rng = _rng_placeholder(q.device)
        if _flash_applies(q, mask):
            return torch.ops.aten._scaled_dot_product_flash_attention_backward(
                dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, rng, rng, scale=scale
            )
        b, hkv, n, d = k.shape
        n_rep = q.shape[1] // hkv
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout, q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), _cuda_bias(mask, q), out, lse, rng, rng, 0.0,
            [True, True, True, False], causal, scale=scale,
        )
        if n_rep > 1:
            dk, dv = dk.unflatten(1, (hkv, n_rep)).sum(2), dv.unflatten(1, (hkv, n_rep)).sum(2)
        return dq, dk, dv


def pick_kernel(device: torch.device):
    if device.type == "cuda":
        return CudaKernel
    if device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return CpuFlashKernel
    return MathKernel


# ----------------------------------------------------------------------------------------------------------
# The split backend.
# ----------------------------------------------------------------------------------------------------------


def _band_plan(layout: AttentionLayout, device: torch.device):
    """The band plan of `layout`, computed once per layout and device. Under torch.compile it enters the graph as
    constants (`_constant_band_plan`): computing it inside the graph fails in inductor (torch 2.13: "vr must not
    be None"), and a cache lookup or `torch.compiler.disable` there would break the graph."""
    if torch.compiler.is_compiling():
        return _constant_band_plan(layout.seq_len, layout.repeat_k, layout.window, layout.chunk, device)
    return _cached_band_plan(layout, device)


@functools.lru_cache(maxsize=64)
def _cached_band_plan(layout: AttentionLayout, device: torch.device):
    return _make_band_plan(layout, device)


def _constant_band_plan(seq_len: int, repeat_k: int, window: int | None, chunk: int | None, device: torch.device):
    """The cached plan, which dynamo calls while tracing and keeps as constants (a function of the layout only;
    the layout goes in as its fields, which dynamo passes as they are)."""
    return _cached_band_plan(AttentionLayout(seq_len, repeat_k, window, chunk), device)


# torch.compiler.assume_constant_result(_constant_band_plan), without the dynamo import it makes (which would double
# the time `import phd` takes): what that decorator sets.
_constant_band_plan._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _make_band_plan(layout: AttentionLayout, device: torch.device):
    """Key indices and mask of the hidden band, in blocks of BAND_BLOCK hidden query rows.

    Hidden row r = n*(K-1) + j - 2 needs hidden keys from (n - W)*(K-1) to r (no window: from n*(K-1)), so
    block b reads the padded hidden keys [b*BAND_BLOCK - pad, (b+1)*BAND_BLOCK) with pad = layout.band_reach.
    The mask comes from `allowed`; rows past the end (padding) see every key, and are dropped.
    """
    rows = layout.seq_len * (layout.repeat_k - 1)
    pad = layout.band_reach
    nb = -(-rows // BAND_BLOCK)
    width = BAND_BLOCK + pad
    row = torch.arange(nb * BAND_BLOCK, device=device).view(nb, BAND_BLOCK)
    col = (torch.arange(nb, device=device) * BAND_BLOCK)[:, None] + torch.arange(width, device=device) - pad
    real_col = (col >= 0) & (col < rows)
    qp, qc = hidden_token(row, layout.repeat_k)
    kp, kc = hidden_token(col.clamp(0, rows - 1), layout.repeat_k)
    mask = allowed(qp[:, :, None], qc[:, :, None], kp[:, None, :], kc[:, None, :], layout.window, layout.chunk)
    mask = mask & real_col[:, None, :]
    mask = mask | (row >= rows)[:, :, None]
    gather = col + pad  # index into keys left-padded by `pad` zeros and right-padded to cover the last block
    return gather, mask, pad, nb, width


def _copies_as_heads(x: Tensor, copies: int) -> Tensor:
    """Hidden rows [B, H, T*(K-1), ...] (position-major) -> [B, (K-1)*H, T, ...], head c*H + h = copy c + 2 of
    head h. A view (no copy) when x is laid out [B, N, H, D] in memory, as the model's projections are."""
    b, h, rows = x.shape[:3]
    return x.unflatten(2, (rows // copies, copies)).movedim(3, 1).flatten(1, 2)


def _heads_as_copies(x: Tensor, copies: int) -> Tensor:
    """Inverse of _copies_as_heads, as a [B, H, T, K-1, ...] view."""
    return x.unflatten(1, (copies, x.shape[1] // copies)).movedim(1, 3)


def _tile_kv(x: Tensor, copies: int) -> Tensor:
    """kv heads [B, Hkv, T, D] -> [B, (K-1)*Hkv, T, D] so that query head c*H + h reads kv head h // group."""
    return x.unsqueeze(1).expand(x.shape[0], copies, *x.shape[1:]).flatten(1, 2)


def _to_band(x: Tensor, nb: int) -> Tensor:
    """Hidden rows [B, H, R, ...] -> [B*nb, H, BAND_BLOCK, ...] (blocks as batch), zero-padded to nb blocks."""
    extra = nb * BAND_BLOCK - x.shape[2]
    if extra:
        x = torch.cat([x, x.new_zeros(*x.shape[:2], extra, *x.shape[3:])], dim=2)
    return x.unflatten(2, (nb, BAND_BLOCK)).transpose(1, 2).flatten(0, 1)


def _from_band(x: Tensor, rows: int, batch: int) -> Tensor:
    """[B*nb, H, BAND_BLOCK, ...] -> [B, H, rows, ...]."""
    return x.unflatten(0, (batch, -1)).transpose(1, 2).flatten(2, 3)[:, :, :rows]


def _band_keys(x: Tensor, gather: Tensor, pad: int, nb: int, width: int) -> Tensor:
    """Hidden keys [B, Hkv, R, D] -> the keys of every band block [B*nb, Hkv, width, D]."""
    b, h, rows, d = x.shape
    padded = F.pad(x, (0, 0, pad, nb * BAND_BLOCK - rows))
    return padded[:, :, gather.reshape(-1)].reshape(b, h, nb, width, d).transpose(1, 2).flatten(0, 1)


def _band_grad(grad: Tensor, gather: Tensor, pad: int, nb: int, rows: int) -> Tensor:
    """Adjoint of _band_keys: scatter-add block key gradients back to [B, Hkv, R, D]."""
    bnb, h, width, d = grad.shape
    b = bnb // nb
    grad = grad.reshape(b, nb, h, width, d).transpose(1, 2).reshape(b, h, nb * width, d)
    full = grad.new_zeros(b, h, pad + nb * BAND_BLOCK, d).index_add_(2, gather.reshape(-1), grad)
    return full[:, :, pad : pad + rows]


def _empty_like_bnhd(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An empty [B, H, N, D] tensor stored as [B, N, H, D], the layout the fused kernels read and write."""
    b, h, n, d = x.shape
    return torch.empty(b, n, h, d, dtype=dtype or x.dtype, device=x.device).transpose(1, 2)


class _SplitAttention(torch.autograd.Function):
    """PHD attention over [T originals | (K-1)*T hidden] in three fused-kernel calls and one exact merge.

    1. originals: causal attention over the originals (exactly vanilla).
    2. hidden queries vs originals: originals 0..n are visible to every copy of position n, so this is causal
       attention again, with the K-1 copies as extra query heads.
    3. hidden queries vs hidden keys: a band (own group, window, chunk) computed in blocks with the rule's mask.
    2 and 3 are merged by their log-sum-exp. The backward calls each kernel's backward with the MERGED output and
    log-sum-exp, which gives every part exactly its share of the merged attention's gradient.
    """

    @staticmethod
    def forward(ctx, q, k, v, layout: AttentionLayout, kernel, scale: float):
        t, copies = layout.seq_len, layout.repeat_k - 1
        b = q.shape[0]
        rows = t * copies
        gather, mask, pad, nb, width = _band_plan(layout, q.device)
        out = _empty_like_bnhd(q)

        out_o, lse_o = kernel.fwd(q[:, :, :t], k[:, :, :t], v[:, :, :t], True, None, scale)
        out[:, :, :t] = out_o

        qh, kh, vh = q[:, :, t:], k[:, :, t:], v[:, :, t:]
        out_a, lse_a = kernel.fwd(
            _copies_as_heads(qh, copies), _tile_kv(k[:, :, :t], copies), _tile_kv(v[:, :, :t], copies), True, None,
            scale,
        )
        out_b, lse_b = kernel.fwd(
            _to_band(qh, nb), _band_keys(kh, gather, pad, nb, width), _band_keys(vh, gather, pad, nb, width),
            False, mask.repeat(b, 1, 1).unsqueeze(1), scale,
        )
        lse_a = _heads_as_copies(lse_a, copies)  # [B, H, T, K-1]
        lse_b_all = _from_band(lse_b, nb * BAND_BLOCK, b)
        lse_b = lse_b_all[:, :, :rows].unflatten(2, (t, copies))
        lse = torch.logaddexp(lse_a, lse_b)
        merged = torch.exp(lse_a - lse)[..., None] * _heads_as_copies(out_a, copies).float()
        merged += torch.exp(lse_b - lse)[..., None] * _from_band(out_b, rows, b).unflatten(2, (t, copies)).float()
        out[:, :, t:] = merged.flatten(2, 3)

        lse_h = lse.flatten(2, 3)
        # Band rows past the end keep their own statistics (they are dropped; their gradient is zero).
        lse_band = _to_band(torch.cat([lse_h, lse_b_all[:, :, rows:]], dim=2)[..., None], nb)[..., 0].contiguous()
        lse_a_final = lse.movedim(3, 1).flatten(1, 2).contiguous()
        ctx.save_for_backward(q, k, v, out, lse_o, lse_a_final, lse_band)
        ctx.layout, ctx.kernel, ctx.scale = layout, kernel, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse_o, lse_a, lse_band = ctx.saved_tensors
        layout, kernel, scale = ctx.layout, ctx.kernel, ctx.scale
        t, copies = layout.seq_len, layout.repeat_k - 1
        b, hkv = k.shape[:2]
        rows = t * copies
        gather, mask, pad, nb, width = _band_plan(layout, q.device)
        dout = dout.to(q.dtype)
        dq, dk, dv = _empty_like_bnhd(q), _empty_like_bnhd(k), _empty_like_bnhd(v)

        ko, vo = k[:, :, :t], v[:, :, :t]
        dqo, dko, dvo = kernel.bwd(dout[:, :, :t], q[:, :, :t], ko, vo, out[:, :, :t], lse_o, True, None, scale)

        qh, kh, vh, douth, outh = q[:, :, t:], k[:, :, t:], v[:, :, t:], dout[:, :, t:], out[:, :, t:]
        dqa, dka, dva = kernel.bwd(
            _copies_as_heads(douth, copies), _copies_as_heads(qh, copies), _tile_kv(ko, copies), _tile_kv(vo, copies),
            _copies_as_heads(outh, copies), lse_a, True, None, scale,
        )
        dqb, dkb, dvb = kernel.bwd(
            _to_band(douth, nb), _to_band(qh, nb), _band_keys(kh, gather, pad, nb, width),
            _band_keys(vh, gather, pad, nb, width), _to_band(outh, nb), lse_band, False,
            mask.repeat(b, 1, 1).unsqueeze(1), scale,
        )
        dq[:, :, :t] = dqo
        dq[:, :, t:] = _heads_as_copies(dqa, copies).flatten(2, 3) + _from_band(dqb, rows, b)
        dk[:, :, :t] = dko + dka.unflatten(1, (copies, hkv)).sum(1)
        dv[:, :, :t] = dvo + dva.unflatten(1, (copies, hkv)).sum(1)
        dk[:, :, t:] = _band_grad(dkb, gather, pad, nb, rows)
        dv[:, :, t:] = _band_grad(dvb, gather, pad, nb, rows)
        return dq, dk, dv, None, None, None


def split_attention(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, kernel=None) -> Tensor:
    if layout.is_causal:
        return causal_attention(q, k, v)
    kernel = kernel or pick_kernel(q.device)
    return _SplitAttention.apply(q, k, v, layout, kernel, 1.0 / math.sqrt(q.shape[-1]))


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
    """`auto`: on CUDA flex if it compiles and agrees with dense here (checked once per device, and said),
    else split; split elsewhere (flex has no CPU backward)."""
    if name != "auto":
        if name == "flex" and device.type == "cpu" and needs_grad:
            raise RuntimeError(
                "attn_backend='flex' has no backward on CPU in this PyTorch; use 'split' (or 'auto') to train on CPU"
            )
        return name
    if device.type == "cuda":
        return _auto_cuda_backend(torch.device("cuda", torch.cuda.current_device() if device.index is None
                                               else device.index))
    return "split"


@functools.cache
def _auto_cuda_backend(device: torch.device) -> str:
    works, reason = flex_works(device)
    choice = "flex" if works else "split"
    print(f"phd: attn_backend=auto uses {choice!r} on {device} ({reason})", file=sys.stderr, flush=True)
    return choice


def flex_works(device: torch.device, atol: float = 1e-3) -> tuple[bool, str]:
    """Whether compiled flex_attention runs forward and backward on `device` and agrees with dense (fp32, a
    small PHD-CSWA layout); the reason as text. Grad is forced on: callers may be under inference mode."""
    if not flex_available():
        return False, "flex_attention is not in this PyTorch"
    layout = AttentionLayout(40, 3, 4, 8)
    gen = torch.Generator().manual_seed(0)
    n = layout.num_tokens
    try:
        with torch.inference_mode(False), torch.enable_grad():
            q, k, v = (torch.randn(1, h, n, 16, generator=gen).to(device).requires_grad_() for h in (4, 2, 2))
            ref = dense_attention(q, k, v, layout)
            ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
            out = flex_attention(q, k, v, layout)
            grads = torch.autograd.grad(out.sum(), (q, k, v))
            err = max((a - b).abs().max().item() for a, b in zip((out, *grads), (ref, *ref_grads), strict=True))
    except Exception as exc:  # noqa: BLE001 - any failure to compile or run means: do not use flex
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return False, f"flex failed: {type(exc).__name__}: {first}"
    if not err <= atol:
        return False, f"flex disagrees with dense by {err:.2e} > {atol}"
    return True, f"flex compiled and agrees with dense to {err:.1e}"


@dataclass(frozen=True)
class LayoutAttention:
    """The training-time attention of PHD over all K*T tokens of `layout`, by one resolved backend: what the
    model's blocks call (`q, k, v -> out`). Built once per forward, so no layer call resolves the backend."""

    layout: AttentionLayout
    backend: str  # dense | split | flex (resolved; see resolve_backend)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.backend == "dense":
            return dense_attention(q, k, v, self.layout)
        if self.backend == "flex":
            return flex_attention(q, k, v, self.layout)
        return split_attention(q, k, v, self.layout)


def attention(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, backend: str = "auto") -> Tensor:
    """The training-time attention of PHD over all K*T tokens, by the chosen backend (resolved here)."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return LayoutAttention(layout, resolve_backend(backend, q.device, needs_grad))(q, k, v)
