"""Weight storage for decoding on CPU: linear weights kept column-major.

A decode step multiplies a few rows (the K copies of each sequence) by every weight matrix, a memory-bound product
whose ideal cost is one read of the weights whatever the row count. PyTorch's CPU GEMM on a row-major [out, in]
weight gets far from that ideal as rows are added (measured here: 4 rows of a 768 x 2048 linear cost about 2x one
row), while the same values stored column-major (`weight.t().contiguous().t()`) keep 4 and 8 rows close to the
1-row time. Only the storage order changes: same parameters, same values, same module tree, same results up to the
kernels' summation order. GPU kernels read both orders at full speed, so only CPU tensors are touched.
"""

from __future__ import annotations

from torch import nn


def column_major_linears(model: nn.Module) -> int:
    """Store every CPU `nn.Linear` weight column-major in place (idempotent); return how many were changed.

    Weights shared with an `nn.Embedding` (tied LM heads) keep their row-major order, which the embedding's row
    lookups want; the LM head computes one row per sequence anyway (copy K only), for PHD as for vanilla.
    """
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    changed = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear) or id(module.weight) in shared:
            continue
        w = module.weight
        if w.device.type != "cpu" or w.dim() != 2 or (w.stride(0) == 1 and w.stride(1) == w.shape[0]):
            continue
        w.data = w.data.t().contiguous().t()
        changed += 1
    return changed
