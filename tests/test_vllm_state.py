"""The plugin's read of the originals back from vLLM's paged cache (phd.vllm.state.PagedReader), without vLLM:
the strided path over whole blocks equals the element-wise gather it replaced, for the CPU backend's layout
(a block-head slab holding keys [D, block_size] then values [block_size, D]) and a layout with other strides."""

from __future__ import annotations

import pytest
import torch

from phd.vllm.state import PagedReader, _affine


def _layout(size: int, dim: int, keys_transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    t, d = torch.meshgrid(torch.arange(size), torch.arange(dim), indexing="ij")
    keys = d * size + t if keys_transposed else t * dim + d
    return keys, dim * size + t * dim + d


@pytest.mark.parametrize("size, dim, heads, transposed", [(16, 8, 3, True), (4, 2, 1, True), (8, 4, 2, False)])
def test_strided_read_equals_the_gather(size, dim, heads, transposed):
    reader = PagedReader(*_layout(size, dim, transposed))
    assert None not in reader.strides  # the fast path is taken
    torch.manual_seed(0)
    cache = torch.randn(10, heads, size, 2 * dim)
    table = torch.tensor([[3, 7, 1, 0], [9, 2, 0, 0], [5, 0, 0, 0]])
    lens = torch.tensor([3 * size - 1, size + 2, 1])
    for length in (1, size, size + 2, 3 * size - 1):
        fast, reference = reader.read(cache, table, lens, length), reader.read_gather(cache, table, lens, length)
        for a, b in zip(fast, reference, strict=True):
            assert a.shape == (3, heads, length, dim) and torch.equal(a, b)
    assert cache.abs().sum() > 0 and torch.equal(reader.read(cache, table, lens, size)[0][2, :, 1:], torch.zeros(
        heads, size - 1, dim))  # positions a request does not hold yet read as zeros


def test_a_layout_that_is_not_strided_takes_the_gather():
    keys, values = _layout(4, 2, True)
    shuffled = keys.flatten()[torch.randperm(8, generator=torch.Generator().manual_seed(0))].view(4, 2)
    assert _affine(shuffled) is None and _affine(keys) == (0, 1, 4)
    reader = PagedReader(shuffled, values)
    cache = torch.randn(3, 1, 4, 4)
    table, lens = torch.tensor([[2, 0]]), torch.tensor([5])
    assert all(torch.equal(a, b) for a, b in zip(reader.read(cache, table, lens, 5),
                                                 reader.read_gather(cache, table, lens, 5), strict=True))
