"""Training-time cost of PHD: attention forward+backward per backend, and full training steps, as ratios to
vanilla, measured side by side in one run.

Attention: vanilla is causal SDPA over T tokens; naive repetition is causal SDPA over K*T; PHD runs the spec's
rule over K*T tokens with the dense reference (K^2 cost) and the split backend (the paper's rearranged layout,
cost ~K). Step: forward + backward + AdamW update of a whole model.
"""

from __future__ import annotations

import argparse
import time

import torch

from ..attention import causal_attention, dense_attention, split_attention
from ..config import PHDConfig
from ..masks import AttentionLayout
from ..model import PHDTransformer
from .timing import machine_line, markdown_table, median_seconds, write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--preset", default="cpu-10m", help="model for the full training step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-dense-above", type=int, default=8192, help="skip dense when K*T exceeds this")
    parser.add_argument("--out", default="docs/bench", help="where training.md / training.json go")


def _attention_time(fn, layout: AttentionLayout, args) -> float:
    n = layout.num_tokens
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, args.heads, n, args.head_dim, generator=gen, requires_grad=True)
    k = torch.randn(1, args.kv_heads, n, args.head_dim, generator=gen, requires_grad=True)
    v = torch.randn(1, args.kv_heads, n, args.head_dim, generator=gen, requires_grad=True)
    grad = torch.randn(1, args.heads, n, args.head_dim, generator=gen)

    def step():
        out = fn(q, k, v, layout)
        torch.autograd.backward(out, grad)

    return median_seconds(step, repeats=args.repeats)


def _step_time(cfg: PHDConfig, seq_len: int, backend: str, repeats: int) -> float:
    torch.manual_seed(0)
    model = PHDTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len + 1))

    def step():
        loss = model(ids[:, :-1], targets=ids[:, 1:], backend=backend).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return median_seconds(step, repeats=repeats)


def run(args: argparse.Namespace) -> int:
    started = time.time()
    attn_rows, step_rows, data = [], [], {"machine": machine_line(), "attention": [], "step": []}
    causal = lambda q, k, v, layout: causal_attention(q, k, v)
    for t in args.seq_lens:
        vanilla = _attention_time(causal, AttentionLayout(t, 1), args)
        for k in args.ks:
            naive = _attention_time(causal, AttentionLayout(t, k, naive=True), args)
            phd = AttentionLayout(t, k, args.window, args.chunk)
            split = _attention_time(split_attention, phd, args)
            dense = _attention_time(dense_attention, phd, args) if k * t <= args.skip_dense_above else float("nan")
            rec = dict(T=t, K=k, vanilla_s=vanilla, naive_s=naive, split_s=split, dense_s=dense)
            data["attention"].append(rec)
            attn_rows.append(
                [t, k, f"{vanilla * 1e3:.1f}", f"{naive / vanilla:.2f}", f"{dense / vanilla:.2f}",
                 f"{split / vanilla:.2f}", f"{split / vanilla / k:.2f}"]
            )
            print(f"attention T={t} K={k}: vanilla {vanilla * 1e3:.1f} ms, naive x{naive / vanilla:.2f}, "
                  f"dense x{dense / vanilla:.2f}, split x{split / vanilla:.2f}", flush=True)
    base = PHDConfig.preset(args.preset)
    for t in args.seq_lens:
        vanilla = _step_time(base, t, "split", args.repeats)
        for k in args.ks:
            naive = _step_time(base.with_variant(f"repeat-{k}"), t, "split", args.repeats)
            cswa = base.with_variant(f"PHD-CSWA-{k}-{args.window}-{args.chunk}")
            split = _step_time(cswa, t, "split", args.repeats)
            rec = dict(T=t, K=k, vanilla_s=vanilla, naive_s=naive, phd_split_s=split)
            data["step"].append(rec)
            step_rows.append([t, k, f"{vanilla:.3f}", f"{naive / vanilla:.2f}", f"{split / vanilla:.2f}",
                              f"{split / vanilla / k:.2f}"])
            print(f"step T={t} K={k}: vanilla {vanilla:.3f} s, naive x{naive / vanilla:.2f}, "
                  f"PHD-CSWA split x{split / vanilla:.2f}", flush=True)
    md = "\n\n".join([
        "# Training-time cost of PHD (`phd bench training`)",
        f"Machine: {data['machine']}. Medians of {args.repeats} repeats after a warm-up; all rows of a table come "
        f"from one run ({time.time() - started:.0f} s). PHD rows use window {args.window}, chunk {args.chunk}.",
        f"## Attention forward+backward, batch 1, {args.heads} q / {args.kv_heads} kv heads, head dim {args.head_dim}",
        "Ratios to vanilla causal attention over T tokens. Goal: split <= 1.25*K (last column <= 1.25).",
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
