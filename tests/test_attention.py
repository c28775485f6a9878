"""Every backend agrees with the dense reference on outputs and gradients."""

import itertools

import pytest
import torch

from phd.attention import CpuFlashKernel, MathKernel, dense_attention, flex_attention, split_attention
from phd.masks import AttentionLayout

GRID = [
    (T, K, W, C)
    for T, K, W, C in itertools.product([1, 7, 33, 128], [1, 2, 3, 5], [None, 1, 2, 4, 16], [None, 1, 4, 32])
    if not (C is not None and W is None)
]


def _inputs(layout, heads=4, kv_heads=2, dim=8, batch=2, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = layout.num_tokens
    q = torch.randn(batch, heads, n, dim, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(batch, kv_heads, n, dim, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(batch, kv_heads, n, dim, generator=gen).to(dtype).requires_grad_()
    grad = torch.randn(batch, heads, n, dim, generator=gen).to(dtype)
    return q, k, v, grad


def _check(fn, layout, dtype=torch.float32, atol=2e-5):
    q, k, v, grad = _inputs(layout, dtype=dtype)
    ref = dense_attention(q.float(), k.float(), v.float(), layout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad.float())
    out = fn(q, k, v, layout)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)
    for name, a, b in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(
            a.float(), b.float(), atol=atol * 4, rtol=0, msg=lambda m, name=name: f"grad {name}: {m}"
        )


@pytest.mark.parametrize("kernel", [CpuFlashKernel, MathKernel], ids=["cpu-flash", "math"])
@pytest.mark.parametrize("T, K, W, C", GRID, ids=[f"T{t}-K{k}-W{w}-C{c}" for t, k, w, c in GRID])
def test_split_matches_dense(T, K, W, C, kernel):
    _check(lambda q, k, v, layout: split_attention(q, k, v, layout, kernel), AttentionLayout(T, K, W, C))


@pytest.mark.parametrize("T, K, W, C", [(33, 3, 4, 8), (64, 2, 16, None), (50, 4, None, None), (40, 3, 16, 4)])
def test_split_matches_dense_in_bf16(T, K, W, C):
    _check(split_attention, AttentionLayout(T, K, W, C), dtype=torch.bfloat16, atol=3e-2)


def test_naive_and_vanilla_layouts_are_causal_in_every_backend():
    for layout in (AttentionLayout(20, 3, naive=True), AttentionLayout(20, 1)):
        _check(split_attention, layout)


@pytest.mark.parametrize("T, K, W, C", [(33, 3, 4, 8), (16, 2, None, None), (20, 5, 1, 1)])
def test_flex_forward_matches_dense_on_cpu(T, K, W, C):
    layout = AttentionLayout(T, K, W, C)
    q, k, v = (t.detach() for t in _inputs(layout)[:3])
    with torch.no_grad():
        torch.testing.assert_close(flex_attention(q, k, v, layout), dense_attention(q, k, v, layout), atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", ["dense", "split"])
def test_window_bound_through_the_backends(backend):
    """Independent of phd.masks: with W = 2 the hidden query of position 5 reads the hidden value of position 3
    and not that of position 2 (and with chunks of 4, not position 3 either)."""
    from phd.attention import attention

    for chunk, seen, unseen in ((None, 3, 2), (4, 4, 3)):
        layout = AttentionLayout(8, 2, 2, chunk)
        q, k, v = (t.detach() for t in _inputs(layout)[:3])
        query = 8 + 5  # hidden copy of position 5 in the layout [8 originals | 8 hidden]
        base = attention(q, k, v, layout, backend)[:, :, query]
        for position, moves in ((seen, True), (unseen, False)):
            v2 = v.clone()
            v2[:, :, 8 + position] += 10.0
            changed = not torch.allclose(attention(q, k, v2, layout, backend)[:, :, query], base, atol=1e-6)
            assert changed == moves, (chunk, position)
