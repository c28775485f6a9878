"""Weight storage for decoding on CPU: MKL-packed linears for the K rows of a decode step, or column-major weights.

A decode step multiplies a few rows (the K copies of each sequence) by every weight matrix, a memory-bound product
whose ideal cost is one read of the weights whatever the row count. PyTorch's CPU GEMM on a row-major [out, in]
weight gets far from that ideal as rows are added (measured here, bench-100m, 1 thread: 4 rows of a 768 x 2048
linear cost 1.7-2.2x one row), because each call re-packs the weight into the GEMM kernel's blocked layout. MKL can
pack a weight once, for a given row count (`cblas_sgemm_pack`, exposed by PyTorch as `torch.ops.mkl`), after which
4 rows cost about 1.4x one row. `pack_linears` does that for a model that is about to decode; packs are used only
where they are exactly right (see PackedLinear.forward), so the model stays correct for any other use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def packing_available() -> bool:
    """Whether this PyTorch has MKL's packed GEMM (x86 CPU builds; not ARM, not every source build)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class PackedLinear(nn.Linear):
    """An nn.Linear that also holds its weight packed by MKL for inputs of `packed_rows` rows.

    The pack is a copy: it is used only for an input of exactly that many rows, with no gradient wanted, while the
    weight is the very tensor it was packed from, unmodified (same storage, same version counter); otherwise the
    plain F.linear runs. Same parameters and state_dict keys as nn.Linear; `unpack_linears` turns it back.
    """

    packed: Tensor
    packed_rows: int
    packed_key: tuple[int, int]

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        w = self.weight
        if rows != self.packed_rows or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)) \
                or (w.data_ptr(), w._version) != self.packed_key or x.dtype != w.dtype:
            return F.linear(x, w, self.bias)
        y = torch.ops.mkl._mkl_linear(x.reshape(rows, x.shape[-1]), self.packed, w, self.bias, rows)
        return y.view(*x.shape[:-1], y.shape[-1])


def _untied_linears(model: nn.Module) -> list[nn.Linear]:
    """The CPU linears whose weight is not an embedding's (a tied LM head computes one row per sequence, and the
    embedding's row lookups want its own storage)."""
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [m for m in model.modules()
            if isinstance(m, nn.Linear) and id(m.weight) not in shared and m.weight.device.type == "cpu"]


def packs_apply(device: str | torch.device, dtype: torch.dtype) -> bool:
    """Whether pack_linears does anything for weights of this device and dtype (CPU float32 with MKL)."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and packing_available()


def pack_linears(model: nn.Module, rows: int) -> int:
    """Pack the model's CPU float32 linears for `rows`-row inputs (decode: K x batch); return how many were packed.

    Idempotent; packing for another row count replaces the packs. Costs one more copy of those weights in memory
    (MKL reserves more address space than that, but only the copy is ever touched), freed by `unpack_linears`.
    A no-op (returns 0) for rows < 2 (one row is already a matrix-vector product at the memory bound) and where
    MKL's packed GEMM is not available.
    """
    if rows < 2 or not packing_available():
        return 0
    n = 0
    with torch.no_grad():
        for m in _untied_linears(model):
            w = m.weight
            if not packs_apply(w.device, w.dtype):
                continue
            key = (w.data_ptr(), w._version)
            if not (isinstance(m, PackedLinear) and m.packed_rows == rows and m.packed_key == key):
                m.__class__ = PackedLinear
                m.packed = torch.ops.mkl._mkl_reorder_linear_weight(w.detach(), rows)
                m.packed_rows, m.packed_key = rows, key
            n += 1
    return n


def unpack_linears(model: nn.Module) -> int:
    """Drop every pack (the linears become plain nn.Linear again); return how many were dropped."""
    n = 0
    for m in model.modules():
        if isinstance(m, PackedLinear):
            del m.packed, m.packed_rows, m.packed_key
            m.__class__ = nn.Linear
            n += 1
    return n


def column_major_linears(model: nn.Module) -> int:
    """Store every CPU `nn.Linear` weight column-major in place (idempotent); return how many were changed.

    An alternative to packing that costs no memory (only the storage order changes: same values, same results up
    to summation order), measured by `phd bench inference --weights column`: it helps 4 rows less than packing.
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
