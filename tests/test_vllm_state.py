"""The plugin's per-request state without vLLM (phd.vllm.state).

PagedReader: the strided path over whole blocks, and the per-step plan that writes into the attention buffer,
equal the element-wise gather, for the CPU backend's layout (a block-head slab holding keys [D, block_size] then
values [block_size, D]) and a layout with other strides. WindowPool: rows keyed by first blocks, emptied when a
request starts at position 0, handed back when the key block moves into another request, and the ring keeps the
last W positions."""

from __future__ import annotations

import pytest
import torch

from phd.config import PHDConfig
from phd.vllm.state import PagedReader, WindowPool, _affine


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


@pytest.mark.parametrize("transposed", [True, False])
def test_read_into_a_buffer_equals_the_gather(transposed):
    """The per-step plan reads each layer straight into a slice of a larger buffer; held positions equal the
    gather (the rest are masked by the plugin, and only need to be finite)."""
    size, dim, heads = 8, 4, 2
    torch.manual_seed(1)
    cache = torch.randn(12, heads, size, 2 * dim)
    table = torch.tensor([[3, 7, 1, 0], [9, 2, 11, 0]])
    lens = torch.tensor([3 * size - 3, size + 1])
    for reader in (PagedReader(*_layout(size, dim, transposed)),
                   PagedReader(_layout(size, dim, transposed)[0].flatten()[torch.randperm(size * dim)].view(size, dim),
                               _layout(size, dim, transposed)[1])):
        for length in (1, size, size + 1, 3 * size - 3):
            keys, values = torch.full((2, heads, length + 5, dim), 7.0), torch.full((2, heads, length + 5, dim), 7.0)
            plan = reader.plan(cache, table, lens, length, keys[:, :, :length], values[:, :, :length])
            for _ in range(2):  # a plan serves every layer
                reader.read_into(cache, plan)
            ref = reader.read_gather(cache, table, lens, length)
            held = (torch.arange(length) < lens[:, None])[:, None, :, None]
            for got, want in zip((keys, values), ref, strict=True):
                assert torch.equal(torch.where(held, got[:, :, :length], 0), want)
                assert torch.isfinite(got).all() and (got[:, :, length:] == 7).all()  # nothing past its slice


def _pool_step(pool, table, lens, fresh, set_pos, set_valid, layers_kv):
    """One step of the pool as the plugin runs it: begin, then per layer read the window and write the set."""
    step = pool.begin(torch.tensor(table), torch.tensor(lens), torch.tensor(fresh), 4, torch.zeros(1),
                      torch.tensor(set_pos), torch.tensor(set_valid), torch.tensor(lens) - 1)
    seen = []
    for layer, kv in enumerate(layers_kv):
        r, s = step.pos.shape
        out = torch.empty(r, 2, 1, s, 2)
        pool.read_into(layer, step, out)
        seen.append(out[:, 0])
        pool.write(layer, step, kv, -kv, 0)
    return step, seen


def test_window_pool_rows_and_ring():
    cfg = PHDConfig(vocab_size=8, d_model=4, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=8, repeat_k=3, window=2)
    pool = WindowPool(cfg)  # S = (K-1) * W = 4 slots per request, position-major ring

    def kv(r, m, base):  # [R, Hkv=1, M, D=2], distinct per entry
        return (base + torch.arange(r * m * 2.0)).view(r, 1, m, 2)

    # Prefill of two requests (first blocks 3 and 5): positions 0..2 (6 entries), the first padded before 1.
    set_pos = [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2]]
    valid = [[False, False, True, True, True, True], [True] * 6]
    step, _ = _pool_step(pool, [[3, 0], [5, 0]], [3, 3], [True, True], set_pos, valid, [kv(2, 6, 0), kv(2, 6, 100)])
    assert (step.pos == -1).all()  # fresh: empty before the step
    rows = step.rows.tolist()
    # Ring slot of (p, s) = (p % 2) * 2 + s - 2: positions 1 and 2 are kept (the last W = 2).
    assert pool.pos[rows].tolist() == [[2, 2, 1, 1], [2, 2, 1, 1]]
    # Decode at position 3: the window read is what the prefill wrote (entries 4, 5 -> slots 0, 1; 2, 3 -> 2, 3).
    step, seen = _pool_step(pool, [[3, 0], [5, 0]], [4, 4], [False, False], [[3, 3]] * 2, [[True] * 2] * 2,
                            [kv(2, 2, 50), kv(2, 2, 60)])
    assert step.pos.tolist() == [[2, 2, 1, 1], [2, 2, 1, 1]]
    assert torch.equal(seen[0][0, 0], kv(2, 6, 0)[0, 0, [4, 5, 2, 3]])
    assert torch.equal(seen[1][1, 0], kv(2, 6, 100)[1, 0, [4, 5, 2, 3]])
    assert pool.pos[rows].tolist() == [[2, 2, 3, 3], [2, 2, 3, 3]]  # position 3 replaced position 1
    assert torch.equal(pool.kv[1, rows[1], 1, 0, 2:], -kv(2, 2, 60)[1, 0])  # values too, per layer
    # Request 5 is preempted and recomputed from position 0 under the same first block: its window starts empty.
    step, _ = _pool_step(pool, [[5, 0]], [1], [True], [[0, 0]], [[True, True]], [kv(1, 2, 0), kv(1, 2, 0)])
    assert step.rows.tolist() == [rows[1]] and (step.pos == -1).all()
    # Block 3 (request 3's key) now sits inside another request: request 3 ended, its row is handed back and reused.
    step, _ = _pool_step(pool, [[7, 3]], [6], [True], [[5, 5]], [[True, True]], [kv(1, 2, 0), kv(1, 2, 0)])
    assert 3 not in pool.rows and step.rows.tolist() == [rows[0]] and (step.pos == -1).all()
    # More requests than rows: the pool doubles and keeps what it held.
    held = pool.kv[:, rows[1]].clone()
    table = [[b, 0] for b in range(20, 30)]
    _pool_step(pool, table, [1] * 10, [True] * 10, [[0, 0]] * 10, [[True] * 2] * 10, [kv(10, 2, 0), kv(10, 2, 0)])
    assert pool.kv.shape[1] == 16 and torch.equal(pool.kv[:, rows[1]], held)
