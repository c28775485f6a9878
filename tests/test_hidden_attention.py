"""The hidden-attention kernel (csrc/hidden_attention.cpp) against its dense reference: SDPA over the same keys
gathered out of the paged cache, with the same mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from phd.inference.kernels import hidden_attention_op

OP = hidden_attention_op()
pytestmark = pytest.mark.skipif(OP is None, reason="no phd kernels here (not x86 with AVX2, or no compiler)")

# (base, s_t, s_d) of keys and values in a block's slab of 2 * size * D floats per kv head.
LAYOUTS = {
    "cpu backend (keys [D, size], values [size, D])": lambda size, d: ((0, 1, size), (size * d, d, 1)),
    "plain (keys and values [size, D])": lambda size, d: ((0, d, 1), (size * d, d, 1)),
    "transposed values": lambda size, d: ((size * d, d, 1), (0, 1, size)),
    "interleaved (keys and values strided by 2)": lambda size, d: ((0, 2 * d, 2), (1, 2 * d, 2)),
}


def _case(seed: int, r: int, hq: int, hkv: int, m: int, d: int, size: int, s: int, lengths: list[int],
          q_scale: float = 1.0):
    """A random paged cache holding requests of `lengths` originals in shuffled blocks, plus window, set, mask."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = [-(-n // size) for n in lengths]
    total = sum(n_blocks) + 3  # and blocks no request owns
    cache = torch.randn(total, hkv, 2 * size * d, generator=g)
    ids = torch.randperm(total, generator=g)
    table = torch.zeros(r, max(n_blocks) + 1, dtype=torch.long)  # a spare column: tables are wider than needed
    used = 0
    for i, n in enumerate(n_blocks):
        table[i, :n] = ids[used : used + n]
        used += n
    q = q_scale * torch.randn(r, m, hq, d, generator=g).transpose(1, 2)  # strided, as the plugin's views are
    set_k, set_v = (torch.randn(r, m, hkv, d, generator=g).transpose(1, 2) for _ in range(2))
    window = torch.randn(r + 2, 2, hkv, s, d, generator=g)
    rows = torch.randperm(r + 2, generator=g)[:r]
    # Query i of request j sees originals 0..limit-1 (below its length), and a random half of window and set
    # (at least one key each, as masks.allowed always grants the query itself).
    limit = torch.stack([torch.randint(0, n + 1, (m,), generator=g) for n in lengths])
    limit[:, -1] = torch.tensor(lengths)  # a request of length 0 stands for padding queries that see no original
    extra = torch.rand(r, m, s + m, generator=g) < 0.5
    extra[..., s:] |= torch.eye(m, dtype=torch.bool)
    mask = torch.zeros(extra.shape).masked_fill_(~extra, float("-inf"))
    return cache, table, q, set_k, set_v, window, rows, limit, mask


def _reference(q, cache, key_layout, value_layout, size, table, limit, window, rows, set_k, set_v, mask, scale):
    """SDPA over [originals gathered from the blocks | window | set] with the additive mask: [Hq, R*M, D]."""
    r, hq, m, d = q.shape
    hkv = cache.shape[1]
    length = int(limit.max())
    pos = torch.arange(length)
    out = []
    for layout in (key_layout, value_layout):
        base, s_t, s_d = layout
        place = base + (pos % size)[:, None] * s_t + torch.arange(d) * s_d  # [length, D]
        block = table.gather(1, (pos // size).expand(r, -1))  # [R, length]
        out.append(cache[block[..., None, None], torch.arange(hkv)[:, None], place[:, None]]
                   .permute(0, 2, 1, 3) if length else cache.new_zeros(r, hkv, 0, d))
    keys = torch.cat([out[0], window[rows, 0], set_k], dim=2)
    values = torch.cat([out[1], window[rows, 1], set_v], dim=2)
    seen = (pos < limit[..., None]).float().log()  # [R, M, length]: 0 or -inf
    full = torch.cat([seen, mask], dim=-1)[:, None]
    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=full, scale=scale, enable_gqa=hq != hkv)
    return o.transpose(0, 1).flatten(1, 2)  # [Hq, R*M, D]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [
    dict(r=1, hq=9, hkv=3, m=3, d=64, size=16, s=48, lengths=[150]),  # decode, SmolLM2's heads, K = 4, W = 16
    dict(r=3, hq=4, hkv=2, m=1, d=16, size=8, s=0, lengths=[1, 17, 40]),  # PHD-2 (no window), ragged requests
    dict(r=2, hq=6, hkv=6, m=12, d=12, size=4, s=6, lengths=[30, 9]),  # prefill-sized set, D not a multiple of 8
    dict(r=2, hq=9, hkv=3, m=1, d=64, size=16, s=16, lengths=[29, 45]),  # CSWA-2 decode: 3 rows; 13 keys after 16
    dict(r=1, hq=1, hkv=1, m=1, d=40, size=32, s=3, lengths=[61]),  # one row; 29 keys after 32; D = 16 + 16 + 8
    dict(r=2, hq=7, hkv=1, m=1, d=20, size=16, s=5, lengths=[9, 0]),  # 7 rows; 9 keys; a request that sees none
    dict(r=1, hq=13, hkv=13, m=1, d=8, size=32, s=2, lengths=[95]),  # 1 row per kv head, many heads
    dict(r=1, hq=2, hkv=1, m=13, d=24, size=16, s=4, lengths=[70], q_scale=30.0),  # 26 rows; scores over +-100
    dict(r=2, hq=9, hkv=3, m=16, d=64, size=16, s=16, lengths=[100, 37]),  # 48 rows: window / set keys as columns
])
def test_the_kernel_equals_sdpa_over_the_gathered_keys(layout, shape):
    key_layout, value_layout = LAYOUTS[layout](shape["size"], shape["d"])
    cache, table, q, set_k, set_v, window, rows, limit, mask = _case(0, **{k: v for k, v in shape.items()})
    scale = shape["d"] ** -0.5
    args = (q, cache, key_layout, value_layout, shape["size"], table, limit, window, rows, set_k, set_v, mask, scale)
    got, want = OP(*args), _reference(*args)
    assert got.shape == want.shape == (shape["hq"], shape["r"] * shape["m"], shape["d"])
    tol = 2e-6 * shape.get("q_scale", 1.0)  # float32 scores of size ~100 carry ~1e-5 of rounding either way
    torch.testing.assert_close(got, want, atol=tol, rtol=max(tol, 1e-5))


@pytest.mark.parametrize("queries", [1, 2])
def test_fewer_queries_than_set_entries(queries):
    """A last layer asks only for the last copies' outputs: the last `queries` of the set's 4 entries query, while
    all 4 stay keys (the mask [R, queries, S + 4] says which each sees)."""
    key_layout, value_layout = LAYOUTS["cpu backend (keys [D, size], values [size, D])"](16, 64)
    cache, table, q, set_k, set_v, window, rows, limit, mask = _case(3, 2, 9, 3, 4, 64, 16, 48, [40, 77])
    q, limit, mask = q[:, :, -queries:], limit[:, -queries:].contiguous(), mask[:, -queries:].contiguous()
    args = (q, cache, key_layout, value_layout, 16, table, limit, window, rows, set_k, set_v, mask, 0.125)
    got, want = OP(*args), _reference(*args)
    assert got.shape == want.shape == (9, 2 * queries, 64)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="Ms >= "):
        OP(torch.randn(2, 9, 5, 64), *args[1:])  # more queries than set entries


def test_leading_padding_queries_are_zeros_and_the_rest_exact():
    """A step that mixes prompts and decoding requests pads each request's set to the widest: its leading queries
    see no key (limit 0, mask all -inf). The kernel skips them (zeros) and the others equal SDPA; here request 0
    has 5 of 7 leading queries padded, request 1 none, request 2 all 7 (and one padding query mid-set: zeros too)."""
    key_layout, value_layout = LAYOUTS["cpu backend (keys [D, size], values [size, D])"](16, 64)
    cache, table, q, set_k, set_v, window, rows, limit, mask = _case(5, 3, 9, 3, 7, 64, 16, 16, [40, 77, 20])
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, :5], pad[2, :], pad[1, 3] = True, True, True
    limit[pad], mask[pad] = 0, float("-inf")
    args = (q, cache, key_layout, value_layout, 16, table, limit, window, rows, set_k, set_v, mask, 0.125)
    got, want = OP(*args), _reference(*args)
    rows_pad = pad.flatten()
    assert torch.equal(got[:, rows_pad], torch.zeros_like(got[:, rows_pad]))
    torch.testing.assert_close(got[:, ~rows_pad], want[:, ~rows_pad], atol=2e-6, rtol=1e-5)


def test_a_query_with_no_key_gets_zeros_and_bad_input_is_refused():
    """Only a padding query can see nothing; it gets zeros (never NaN). Limits past the block table, block ids
    outside the cache, window rows outside the pool and layouts past a block's slab are refused."""
    cache, table, q, set_k, set_v, window, rows, limit, mask = _case(1, 2, 2, 1, 2, 8, 4, 0, [5, 7])
    limit[0, 0] = 0
    mask[0, 0] = float("-inf")
    layouts = LAYOUTS["plain (keys and values [size, D])"](4, 8)
    out = OP(q, cache, *layouts, 4, table, limit, window, rows, set_k, set_v, mask, 0.5)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0])) and torch.isfinite(out).all()
    bad = limit.clone()
    bad[1, 1] = 4 * table.shape[1] + 1
    with pytest.raises(RuntimeError, match="positions the block table holds"):
        OP(q, cache, *layouts, 4, table, bad, window, rows, set_k, set_v, mask, 0.5)
    bad = table.clone()
    bad[1, 0] = cache.shape[0]
    with pytest.raises(RuntimeError, match="outside the cache"):
        OP(q, cache, *layouts, 4, bad, limit, window, rows, set_k, set_v, mask, 0.5)
    with pytest.raises(RuntimeError, match="reaches past"):
        OP(q, cache, (40, 8, 1), layouts[1], 4, table, limit, window, rows, set_k, set_v, mask, 0.5)
    cache, table, q, set_k, set_v, window, rows, limit, mask = _case(2, 2, 2, 1, 2, 8, 4, 3, [5, 7])
    with pytest.raises(RuntimeError, match="rows of the pool"):
        OP(q, cache, *layouts, 4, table, limit, window, rows + window.shape[0], set_k, set_v, mask, 0.5)
