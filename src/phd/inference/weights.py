"""The linears of a decode step on CPU: K x batch rows at about the price of one row.

A decode step multiplies a few rows (the K copies of each sequence, times the batch) by every weight: a product
bound by reading the weights once, whatever the row count. PyTorch's CPU GEMMs are far from that as rows are
added (bench-100m, 1 thread, a 768 x 2048 linear: 4 rows cost 1.7-2.2x one row on the plain weight, 1.4-1.8x with
the weight packed by MKL). `decode_linears` turns a model's linears into `DecodeLinear`s for a given row count:
- up to 8 rows, phd's own kernel (phd.inference.kernels.rows_linear_op: the weight read as it is, in one stream
  with the rows kept in registers; 4 rows cost 1.0-1.3x one row, one row 0.9-1.0x PyTorch's, 8 rows 0.9-0.95x
  an MKL pack's time; from 16 rows on the pack is faster: the product is no longer bound by the weight);
- more rows, or where the kernel cannot be built, the weight packed once by MKL for that row count
  (cblas_sgemm_pack via torch.ops.mkl; one more copy of the weights in memory).
An engine whose batches change size every step (the vLLM plugin) packs once for its largest decode step instead
and uses that pack for every step of 2 up to that many rows the kernel does not take (`packed_linears`): MKL's
packed weight serves any row count, and a pack made for 128 rows takes 0.8-0.9x the plain GEMM's time at 17-128
rows of SmolLM2's linears (at 256-2048 rows, prefill's, packs are within +-10% of it: not worth the rule).
Each is used only where it is exactly right (DecodeLinear.forward), so the model stays correct for any other use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import ROWS_LINEAR_MAX_ROWS, rows_linear_op


def packing_available() -> bool:
    """Whether this PyTorch has MKL's packed GEMM (x86 CPU builds; not ARM, not every source build)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class DecodeLinear(nn.Linear):
    """An nn.Linear with a faster path for the few rows of a decode step, taken only where it is exactly right.

    No gradient may be wanted and input and weight must be float32 on the CPU. Then: up to ROWS_LINEAR_MAX_ROWS rows
    go to phd's rows kernel (`use_kernel`; it reads the live weight, so any weight change is seen); exactly
    `packed_rows` rows go to the MKL pack (`packed`, a copy) while the weight is the very tensor it was packed from,
    unmodified (same storage, same version counter), and so does any count from 2 to `packed_rows` if `packed_any`.
    Anything else runs the plain F.linear. Same parameters and state_dict keys as nn.Linear; `plain_linears` turns
    it back.
    """

    use_kernel: bool
    packed: Tensor | None
    packed_rows: int
    packed_key: tuple[int, int]
    packed_any: bool

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)) or x.dtype != w.dtype \
                or x.dtype != torch.float32 or x.device.type != "cpu" or not x.numel():
            return F.linear(x, w, self.bias)
        rows = x.numel() // x.shape[-1]
        if self.use_kernel and rows <= ROWS_LINEAR_MAX_ROWS and w.is_contiguous():
            y = rows_linear_op()(x.reshape(rows, x.shape[-1]).contiguous(), w, self.bias)
        elif self.packed is not None and (w.data_ptr(), w._version) == self.packed_key and (
                rows == self.packed_rows or (self.packed_any and 1 < rows < self.packed_rows)):
            # the last argument must be this call's row count: given any other, _mkl_linear silently runs F.linear
            y = torch.ops.mkl._mkl_linear(x.reshape(rows, x.shape[-1]), self.packed, w, self.bias, rows)
        else:
            return F.linear(x, w, self.bias)
        return y.view(*x.shape[:-1], y.shape[-1])


def _as_decode_linear(m: nn.Linear) -> DecodeLinear:
    """`m` as a DecodeLinear, in place (a plain linear starts with neither kernel nor pack)."""
    if not isinstance(m, DecodeLinear):
        m.__class__ = DecodeLinear
        m.use_kernel, m.packed, m.packed_rows, m.packed_key, m.packed_any = False, None, 0, (0, 0), False
    return m


def _pack(m: DecodeLinear, rows: int, any_rows: bool) -> None:
    """Pack m's weight by MKL for `rows` rows, unless the pack it holds already is for this weight, unmodified."""
    w = m.weight
    key = (w.data_ptr(), w._version)
    if m.packed is None or m.packed_rows != rows or m.packed_key != key:
        m.packed = None  # the old pack goes before the new one is made: never two copies at once
        m.packed = torch.ops.mkl._mkl_reorder_linear_weight(w.detach(), rows)
        m.packed_rows, m.packed_key = rows, key
    m.packed_any = any_rows


def _float32_linears(model: nn.Module) -> list[nn.Linear]:
    """The untied CPU linears whose weight is float32: the only ones a kernel or a pack serves."""
    return [m for m in _untied_linears(model) if m.weight.dtype == torch.float32]


def _untied_linears(model: nn.Module) -> list[nn.Linear]:
    """The CPU linears whose weight is not an embedding's (a tied LM head computes one row per sequence, and the
    embedding's row lookups want its own storage)."""
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [m for m in model.modules()
            if isinstance(m, nn.Linear) and id(m.weight) not in shared and m.weight.device.type == "cpu"]


def decode_applies(device: str | torch.device, dtype: torch.dtype) -> bool:
    """Whether decode_linears can do anything for weights of this device and dtype (CPU float32, with the rows
    kernel or MKL's packed GEMM)."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and (
        packing_available() or rows_linear_op() is not None)


def decode_linears(model: nn.Module, rows: int, kernel: bool = True) -> int:
    """Prepare the model's CPU float32 linears for decode steps of `rows` rows (K x batch); return how many.

    Up to 8 rows: phd's rows kernel, no extra memory (unless `kernel` is False or it cannot be built). More rows:
    MKL packs for exactly `rows` rows, one more copy of those weights (MKL reserves more address space than that,
    but only the copy is touched), freed by `plain_linears`. Idempotent; another row count replaces the packs.
    Returns 0 (nothing changed) where neither applies, e.g. one row without the kernel: PyTorch's matrix-vector
    product is then already the right kernel.
    """
    linears = _float32_linears(model)
    if not linears:  # a CUDA or bfloat16 model: nothing to do, and no kernel to compile for it
        return 0
    use_kernel = kernel and rows <= ROWS_LINEAR_MAX_ROWS and rows_linear_op() is not None
    if not use_kernel and (rows < 2 or not packing_available()):
        return 0
    with torch.no_grad():
        for m in linears:
            m = _as_decode_linear(m)
            m.use_kernel = use_kernel
            if use_kernel:
                m.packed, m.packed_rows, m.packed_key, m.packed_any = None, 0, (0, 0), False
            else:
                _pack(m, rows, any_rows=False)
    return len(linears)


_AUTO = "_phd_decode_kernel"  # per-model state of the automatic kernel: absent (not yet), True (given), False (off)


def kernel_linears(model: nn.Module) -> int:
    """Give the model's CPU float32 linears the rows kernel, at no cost in memory; return how many take it.

    Unlike `decode_linears` it never packs (MKL packs copy the weights: opt-in), and it keeps any packs the user
    made. 0 where the kernel cannot be (PHD_KERNELS=0, no compiler, not x86 with AVX2: one warning from kernels.py)
    or nothing is float32 on the CPU.
    """
    linears = _float32_linears(model)
    if not linears or rows_linear_op() is None:
        object.__setattr__(model, _AUTO, False)
        return 0
    for m in linears:
        _as_decode_linear(m).use_kernel = True
    object.__setattr__(model, _AUTO, True)
    return len(linears)


def packed_linears(model: nn.Module, rows: int) -> int:
    """MKL packs of the model's CPU float32 linears, made for steps of `rows` rows and used for every step of 2 to
    `rows` rows the rows kernel does not take (it stays on where it was given); return how many.

    For engines whose batch changes size every step (the vLLM plugin; `rows`: its largest decode step): one pack
    per weight, made once, serves them all. One more copy of these weights; `plain_linears` frees it. A weight
    changed in place through `.data` (no version bump) needs this called again.
    """
    if not packing_available():
        return 0
    linears = _float32_linears(model)
    with torch.no_grad():
        for m in linears:
            _pack(_as_decode_linear(m), rows, any_rows=True)
    return len(linears)


def auto_kernel(model: nn.Module) -> None:
    """`kernel_linears` once per model, called by every decode step (`phd.inference.decode_step`, so
    `model.decode_step`, `phd.generate`, the transformers Cache and the vLLM plugin): the K copies cost about one
    row without a preparation step. Not done again after `plain_linears(model)` (the per-model switch)."""
    if _AUTO not in model.__dict__:
        kernel_linears(model)


def as_loaded(model: nn.Module) -> None:
    """Plain linears and no decode-kernel state, as a freshly loaded model has (its next decode step gives it the
    kernel again): what benchmarks reset to between paths."""
    plain_linears(model)
    del model.__dict__[_AUTO]


def plain_linears(model: nn.Module) -> int:
    """Undo decode_linears and kernel_linears (the linears become plain nn.Linear again, packs freed; later decode
    steps keep them plain); return how many."""
    object.__setattr__(model, _AUTO, False)
    n = 0
    for m in model.modules():
        if isinstance(m, DecodeLinear):
            del m.use_kernel, m.packed, m.packed_rows, m.packed_key, m.packed_any
            m.__class__ = nn.Linear
            n += 1
    return n


def column_major_linears(model: nn.Module) -> int:
    """Store every CPU `nn.Linear` weight column-major in place (idempotent); return how many were changed.

    An alternative that costs no memory (only the storage order changes: same values, same results up to
    summation order), measured by `phd bench inference --weights column`: it helps 4 rows less than packing.
    Weights shared with an `nn.Embedding` (tied LM heads) keep their row-major order, which the embedding's row
    lookups want.
    """
    changed = 0
    for module in _untied_linears(model):
        w = module.weight
        if w.dim() != 2 or (w.stride(0) == 1 and w.stride(1) == w.shape[0]):
            continue
        w.data = w.data.t().contiguous().t()
        changed += 1
    return changed
