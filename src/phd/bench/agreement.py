"""How far a fast path is from its reference: attention backends against `dense`, and cache inference
(prefill, then every decode step) against the training forward. Shared by the tests and `phd bench gpu-check`,
so the check run on a GPU is the one the CPU tests run."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..attention import dense_attention
from ..config import PHDConfig
from ..masks import AttentionLayout
from ..model import PHDTransformer

# Largest |error| allowed against dense on unit-normal inputs: outputs; q/k/v gradients get GRAD_FACTOR times it.
ATTENTION_TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
GRAD_FACTOR = 4
LOGIT_TOL = 1e-4  # cache inference vs the training forward, fp32
# Variants whose inference is checked against training, and the tiny architecture they are checked at.
INFERENCE_VARIANTS = ["vanilla", "repeat-3", "PHD-2", "PHD-5", "PHD-SWA-3-2-inf", "PHD-SWA-2-1-inf", "PHD-CSWA-3-2-4",
                      "PHD-CSWA-4-3-2", "PHD-CSWA-2-1-1", "PHD-CSWA-5-1-3"]
TINY_ARCH = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=128)


def within(errors: dict[str, float], tol: float) -> bool:
    """Output error <= tol and every gradient error <= GRAD_FACTOR * tol."""
    return all(e <= (tol if name == "out" else GRAD_FACTOR * tol) for name, e in errors.items())


def tiny_model(name: str, seed: int = 0, device: torch.device | str = "cpu", **arch):
    """A TINY_ARCH model of a named variant, in eval mode."""

    torch.manual_seed(seed)
    return PHDTransformer(PHDConfig.from_name(name, **{**TINY_ARCH, **arch})).to(device).eval()


def attention_inputs(
    layout: AttentionLayout, heads: int = 4, kv_heads: int = 2, dim: int = 8, batch: int = 2,
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q, k, v (leaves that require grad) and an output gradient, stored [B, N, H, D] as the model's
    projections are (the fused kernels see the strides training gives them). Drawn on the CPU, so every
    device gets the same numbers."""
    gen = torch.Generator().manual_seed(seed)
    n = layout.num_tokens

    def draw(h: int, grad: bool = True) -> Tensor:
        x = torch.randn(batch, n, h, dim, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
        return x.requires_grad_() if grad else x

    return draw(heads), draw(kv_heads), draw(kv_heads), draw(heads, grad=False)


def attention_errors(
    fn: Callable[[Tensor, Tensor, Tensor, AttentionLayout], Tensor], layout: AttentionLayout,
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", backward: bool = True, **shape: int,
) -> dict[str, float]:
    """Largest |difference| of `fn`'s output (and q/k/v gradients) from the dense reference, computed in
    fp32 on the same (dtype-rounded) inputs."""
    q, k, v, grad = attention_inputs(layout, dtype=dtype, device=device, **shape)
    if not backward:
        q, k, v = (x.detach() for x in (q, k, v))
    ref = dense_attention(q.float(), k.float(), v.float(), layout)
    if not backward:
        return {"out": (fn(q, k, v, layout).float() - ref).abs().max().item()}
    out = fn(q, k, v, layout)
    errors = {"out": (out.float() - ref).abs().max().item()}
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad.float())
    for name, a, b in zip("qkv", grads, ref_grads, strict=True):
        errors[f"d{name}"] = (a.float() - b.float()).abs().max().item()
    return errors


def logit_error(model, lengths: list[int], steps: int, mode: str = "bounded", seed: int = 0) -> float:
    """Largest |logit difference| between cache inference (prefill of prompts of `lengths`, one batch, then
    `steps` decode steps) and the dense training forward of each row alone, on the model's device."""
    device = model.embed.weight.device
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    rows = [torch.randint(0, vocab, (n + steps,), generator=gen).to(device) for n in lengths]
    width = max(lengths)
    prompt = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for b, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        prompt[b, :n] = row[:n]
        prompt[b, n:] = (b + 7) % vocab  # padding content must not matter
    lens = torch.tensor(lengths, device=device)
    with torch.no_grad():
        refs = [model(row[None], backend="dense").logits[0] for row in rows]
    cache = model.new_cache(len(rows), width + steps)
    got = [model.prefill(prompt, cache, lengths=lens, mode=mode)]
    for s in range(steps):
        got.append(model.decode_step(torch.stack([row[n + s] for row, n in zip(rows, lengths, strict=True)]), cache))
    err = 0.0
    for s, logits in enumerate(got):
        expected = torch.stack([ref[n - 1 + s] for ref, n in zip(refs, lengths, strict=True)])
        err = max(err, (logits - expected).abs().max().item())
    return err


def edge_lengths(config) -> list[int]:
    """Prompt lengths that cover every row phase: 1, C-1, C, C+1 and one past L*W (the bounded SWA prefill's
    reach)."""
    c = config.chunk or 4
    reach = config.n_layers * (config.window or 1) + 2
    return sorted({n for n in (1, c - 1, c, c + 1, reach) if n >= 1})
