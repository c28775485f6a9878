"""Training-time cost of PHD: attention forward+backward per backend, and full training steps, as ratios to
vanilla, measured side by side in one run.

Attention: vanilla is causal SDPA over T tokens; naive repetition is causal SDPA over K*T; PHD runs the spec's
rule over K*T tokens with the dense reference (K^2 cost) and the split backend (the paper's rearranged layout,
cost ~K). Step: forward + backward + AdamW update of a whole model.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..attention import causal_attention, dense_attention, split_attention
from ..config import PHDConfig
from ..masks import AttentionLayout
from ..model import PHDTransformer
from .timing import CLOCKS, interleaved_medians, machine_line, markdown_table, write_report


def _attention_step(fn, layout: AttentionLayout, args):
    """forward + backward of one attention call over the layout's tokens, batch 1."""
    n = layout.num_tokens
    gen = torch.Generator().manual_seed(0)
    # [B, N, H, D] storage, as the model's projections produce
    q = torch.randn(1, n, args.heads, args.head_dim, generator=gen).transpose(1, 2).requires_grad_()
    k = torch.randn(1, n, args.kv_heads, args.head_dim, generator=gen).transpose(1, 2).requires_grad_()
    v = torch.randn(1, n, args.kv_heads, args.head_dim, generator=gen).transpose(1, 2).requires_grad_()
    grad = torch.randn(1, n, args.heads, args.head_dim, generator=gen).transpose(1, 2)

    def step():
        torch.autograd.backward(fn(q, k, v, layout), grad)
        q.grad = k.grad = v.grad = None

    return step


def _train_step(cfg: PHDConfig, seq_len: int):
    """forward + backward + AdamW update of a whole model, batch 1."""
    torch.manual_seed(0)
    model = PHDTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len + 1))

    def step():
        model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run(args: Any) -> int:
    """`args`: the options of `phd bench training` (phd.commands.bench)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    started = time.time()
    data = {"machine": machine_line(), "clock": args.clock, "attention": [], "step": []}
    causal = lambda q, k, v, layout: causal_attention(q, k, v)
    attn_rows, step_rows = [], []
    for t in args.seq_lens:
        fns = {"vanilla": _attention_step(causal, AttentionLayout(t, 1), args)}
        for k in args.ks:
            phd = AttentionLayout(t, k, args.window, args.chunk)
            fns[f"naive{k}"] = _attention_step(causal, AttentionLayout(t, k, naive=True), args)
            fns[f"split{k}"] = _attention_step(split_attention, phd, args)
            if k * t <= args.skip_dense_above:
                fns[f"dense{k}"] = _attention_step(dense_attention, phd, args)
        sec = interleaved_medians(fns, repeats=args.repeats, clock=clock)
        van = sec["vanilla"]
        for k in args.ks:
            dense = sec.get(f"dense{k}", float("nan"))
            naive, split = sec[f"naive{k}"], sec[f"split{k}"]
            data["attention"].append(dict(T=t, K=k, vanilla_s=van, naive_s=naive, split_s=split, dense_s=dense))
            attn_rows.append([t, k, f"{van * 1e3:.1f}", f"{naive / van:.2f}", f"{dense / van:.2f}",
                              f"{split / van:.2f}", f"{split / van / k:.2f}"])
            print(f"attention T={t} K={k}: vanilla {van * 1e3:.1f} ms, naive x{naive / van:.2f}, "
                  f"dense x{dense / van:.2f}, split x{split / van:.2f}", flush=True)
    base = PHDConfig.preset(args.preset)
    for t in args.seq_lens:
        fns = {"vanilla": _train_step(base, t)}
        for k in args.ks:
            fns[f"naive{k}"] = _train_step(base.with_variant(f"repeat-{k}"), t)
            fns[f"phd{k}"] = _train_step(base.with_variant(f"PHD-CSWA-{k}-{args.window}-{args.chunk}"), t)
        sec = interleaved_medians(fns, repeats=args.repeats, clock=clock)
        van = sec["vanilla"]
        for k in args.ks:
            naive, phd = sec[f"naive{k}"], sec[f"phd{k}"]
            data["step"].append(dict(T=t, K=k, vanilla_s=van, naive_s=naive, phd_split_s=phd))
            step_rows.append([t, k, f"{van:.3f}", f"{naive / van:.2f}", f"{phd / van:.2f}", f"{phd / van / k:.2f}"])
            print(f"step T={t} K={k}: vanilla {van:.3f} s, naive x{naive / van:.2f}, PHD-CSWA x{phd / van:.2f}",
                  flush=True)
    clock_text = "CPU time of this process" if args.clock == "cpu" else "wall time"
    md = "\n\n".join([
        "# Training-time cost of PHD (`phd bench training`)",
        f"Machine: {data['machine']}; clock: {clock_text}. Every table's entries were timed round-robin in one run "
        f"({time.time() - started:.0f} s in all): medians of {args.repeats} repeats after a warm-up. PHD rows use "
        f"window {args.window}, chunk {args.chunk}. Command: `phd bench training "
        f"--threads {torch.get_num_threads()} --clock {args.clock}`.",
        f"## Attention forward+backward, batch 1, {args.heads} q / {args.kv_heads} kv heads, head dim {args.head_dim}",
        "Ratios to vanilla causal attention over T tokens. naive = causal attention over the K*T repeated tokens; "
        "dense = the reference mask over K*T tokens (K^2 cost); split = the rearranged layout. "
        "Goal: split <= 1.25*K (last column <= 1.25).",
        markdown_table(["T", "K", "vanilla ms", "naive x", "dense x", "split x", "split / (K*vanilla)"], attn_rows),
        f"## Full training step (forward, backward, AdamW), preset {args.preset}, batch 1",
        "Ratios to a vanilla step. Goal: a PHD-K step costs <= K vanilla steps (last column <= 1).",
        markdown_table(["T", "K", "vanilla s", "naive x", f"PHD-CSWA-K-{args.window}-{args.chunk} x",
                        "PHD / (K*vanilla)"], step_rows),
    ])
    path = write_report(args.out, "training", md, data)
    print(md)
    print(f"\nwrote {path}")
    return 0
