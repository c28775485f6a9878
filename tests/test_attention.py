"""Every backend agrees with the dense reference on outputs and gradients; each fused kernel of the split
backend runs the whole grid on its device (CUDA's wherever a GPU is present)."""

import itertools

import pytest
import torch

from phd import attention as attn
from phd.attention import CpuFlashKernel, CudaKernel, MathKernel, flex_attention, split_attention
from phd.bench.agreement import ATTENTION_TOL, attention_errors, attention_inputs, within
from phd.masks import AttentionLayout

GRID = [
    (T, K, W, C)
    for T, K, W, C in itertools.product([1, 7, 33, 128], [1, 2, 3, 5], [None, 1, 2, 4, 16], [None, 1, 4, 32])
    if not (C is not None and W is None)
]
no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
KERNELS = [
    pytest.param(CpuFlashKernel, "cpu", id="cpu-flash"),
    pytest.param(MathKernel, "cpu", id="math"),
    pytest.param(CudaKernel, "cuda", id="cuda", marks=no_cuda),
]


def _check(fn, layout, dtype=torch.float32, device="cpu", atol=None, **shape):
    errors = attention_errors(fn, layout, dtype=dtype, device=device, **shape)
    assert within(errors, atol or ATTENTION_TOL[dtype]), errors


def _with(kernel):
    return lambda q, k, v, layout: split_attention(q, k, v, layout, kernel)


@pytest.mark.parametrize("kernel, device", KERNELS)
@pytest.mark.parametrize("T, K, W, C", GRID, ids=[f"T{t}-K{k}-W{w}-C{c}" for t, k, w, c in GRID])
def test_split_matches_dense(T, K, W, C, kernel, device):
    _check(_with(kernel), AttentionLayout(T, K, W, C), device=device)


BF16_CASES = [(33, 3, 4, 8), (64, 2, 16, None), (50, 4, None, None), (40, 3, 16, 4)]


@pytest.mark.parametrize("kernel, device", [KERNELS[0], KERNELS[2]])
@pytest.mark.parametrize("T, K, W, C", BF16_CASES)
def test_split_matches_dense_in_bf16(T, K, W, C, kernel, device):
    _check(_with(kernel), AttentionLayout(T, K, W, C), dtype=torch.bfloat16, device=device)


@no_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, K, W, C", [(700, 3, 16, 32), (300, 5, 4, None), (257, 2, None, None)])
def test_cuda_kernel_at_model_head_dim(T, K, W, C, dtype):
    """head_dim 64 and heads 12 / kv 4: the flash path for bf16, rows past one tile of every kernel."""
    _check(_with(CudaKernel), AttentionLayout(T, K, W, C), dtype=dtype, device="cuda", heads=12, kv_heads=4,
           dim=64, batch=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_calls_match_the_op_schemas(dtype):
    """On meta tensors the real aten ops check every argument against their schemas and give output shapes:
    this runs the CUDA kernel's forward and backward plumbing (flash for bf16, memory-efficient for fp32 and
    the masked band) without a GPU. It checks calls and shapes, not numbers."""
    layout = AttentionLayout(70, 3, 4, 8)
    q, k, v, grad = attention_inputs(layout, dim=64, device="meta", dtype=dtype)
    out = split_attention(q, k, v, layout, CudaKernel)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert out.shape == q.shape and out.dtype == dtype
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert attn._flash_applies(q, None) == (dtype == torch.bfloat16)
    assert not attn._flash_applies(q, torch.ones(1, dtype=torch.bool))


def test_cuda_bias_is_the_additive_mask_with_aligned_rows():
    mask = torch.rand(3, 1, 32, 37) > 0.5
    q = torch.zeros(3, 4, 32, 8, dtype=torch.bfloat16)
    bias = attn._cuda_bias(mask, q)
    assert bias.shape == (3, 4, 32, 37) and bias.dtype == torch.bfloat16
    assert bias.stride(2) % 16 == 0 and bias.stride(1) == 0 and bias.stride(3) == 1
    expected = torch.zeros(3, 1, 32, 37, dtype=torch.bfloat16).masked_fill(~mask, float("-inf"))
    assert torch.equal(bias, expected.expand(3, 4, 32, 37))


def test_naive_and_vanilla_layouts_are_causal_in_every_backend():
    for layout in (AttentionLayout(20, 3, naive=True), AttentionLayout(20, 1)):
        _check(split_attention, layout)


@pytest.mark.parametrize("T, K, W, C", [(33, 3, 4, 8), (16, 2, None, None), (20, 5, 1, 1)])
def test_flex_forward_matches_dense_on_cpu(T, K, W, C):
    errors = attention_errors(flex_attention, AttentionLayout(T, K, W, C), backward=False)
    assert errors["out"] <= ATTENTION_TOL[torch.float32], errors


@no_cuda
@pytest.mark.parametrize("T, K, W, C", [(33, 3, 4, 8), (130, 2, 16, 32)])
def test_flex_matches_dense_on_cuda(T, K, W, C):
    _check(flex_attention, AttentionLayout(T, K, W, C), device="cuda", atol=1e-4)



def test_flex_probe_reports_why_flex_is_not_used():
    """The probe behind `auto` on CUDA, run where flex cannot train: it says no, and why."""
    works, reason = attn.flex_works(torch.device("cpu"))
    assert not works and "backward" in reason, reason
    assert attn.resolve_backend("auto", torch.device("cpu"), needs_grad=True) == "split"


@no_cuda
def test_auto_on_cuda_probes_flex_once_and_says_which(capsys):
    device = torch.device("cuda", torch.cuda.current_device())
    first = attn.resolve_backend("auto", device, needs_grad=True)
    assert attn.resolve_backend("auto", torch.device("cuda"), needs_grad=True) == first in ("flex", "split")
    said = [line for line in capsys.readouterr().err.splitlines() if "attn_backend=auto" in line]
    assert len(said) <= 1 and (not said or first in said[0])  # said once per process (maybe by an earlier test)


@pytest.mark.parametrize("backend", ["dense", "split"])
def test_window_bound_through_the_backends(backend):
    """Independent of phd.masks: with W = 2 the hidden query of position 5 reads the hidden value of position 3
    and not that of position 2 (and with chunks of 4, not position 3 either)."""
    from phd.attention import attention

    for chunk, seen, unseen in ((None, 3, 2), (4, 4, 3)):
        layout = AttentionLayout(8, 2, 2, chunk)
        q, k, v = (t.detach() for t in attention_inputs(layout)[:3])
        query = 8 + 5  # hidden copy of position 5 in the layout [8 originals | 8 hidden]
        base = attention(q, k, v, layout, backend)[:, :, query]
        for position, moves in ((seen, True), (unseen, False)):
            v2 = v.clone()
            v2[:, :, 8 + position] += 10.0
            changed = not torch.allclose(attention(q, k, v2, layout, backend)[:, :, query], base, atol=1e-6)
            assert changed == moves, (chunk, position)


def test_the_training_forward_is_one_graph_under_torch_compile():
    """torch.compile(model, fullgraph=True) takes the training forward (split backend over a PHD-CSWA layout, with
    the loss): the token-id range check and the band plan stay in the graph, with no host sync and no cache lookup
    that would break it. The eager backend only traces (no inductor compile), so this is cheap."""
    import torch._dynamo

    from phd import PHDConfig, PHDTransformer

    cfg = PHDConfig.from_name("PHD-CSWA-3-2-4", vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              d_ff=48, max_seq_len=64)
    model = PHDTransformer(cfg).train()
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert torch.equal(compiled(ids, ids).loss, model(ids, ids).loss)
    finally:
        torch._dynamo.reset()
