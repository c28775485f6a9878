"""Training throughput of the real trainer (`phd train`) at 1 and N processes, and the scaling efficiency.

Each measurement is a short `torchrun --nproc_per_node=P -m phd train` on synthetic tokens with the same
global batch (strong scaling). On CUDA each process has its own GPU: efficiency = tokens/s(P) / (P * tokens/s(1)).
On CPU the processes split the same cores (OMP_NUM_THREADS = cores / P; 1 process gets every core), so the
hardware is fixed and efficiency = tokens/s(P) / tokens/s(1): what data parallelism costs over threads.
Throughput is the median of the per-step tokens/s that the trainer logs, after `--warmup` steps. On CUDA every
run also reports MFU for the model FLOPs (6 * matmul parameters * K per input token, plus attention) over the
device's peak.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import PHDConfig
from ..data.shards import token_dtype, write_meta, write_split

# Dense bf16 peak (TFLOP/s) of common accelerators, for MFU; others: pass --peak-tflops.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def train_flops_per_token(config, seq_len: int) -> float:
    """Forward + backward FLOPs per input token: 6 * (block matmul parameters) for each of the K copies, the
    LM head once (copy K only), and attention (QK^T and AV, 2 * 2 * d per visible key) over the keys each
    copy sees on average: about T/2 originals, plus its own group and up to W*(K-1) hidden keys."""
    d, layers, k = config.d_model, config.n_layers, config.repeat_k
    kv = config.n_kv_heads * config.head_dim
    block = 2 * d * d + 2 * d * kv + 3 * d * config.d_ff
    keys = seq_len / 2 + (k + 1) / 2 + (config.window or 0) * (k - 1) ** 2 / k  # averaged over the K copies
    if config.naive:
        keys = k * seq_len / 2
    attention = 2 * 2 * d * keys * k * layers
    return 3 * (2 * block * layers * k + 2 * d * config.vocab_size + attention)


def _synthetic_data(root: Path, vocab_size: int, tokens: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    dtype = token_dtype(vocab_size)
    splits = {}
    for split, n in (("train", tokens), ("val", tokens // 10)):
        write_split(root, split, rng.integers(0, vocab_size, n).astype(dtype))
        splits[split] = {"tokens": n, "documents": 1}
    write_meta(root, {"dtype": dtype.name, "vocab_size": vocab_size, "eos_id": 0, "splits": splits, "sources": []})
    return root


def _measure(args, variant: str, procs: int, data: Path, work: Path, device: str,
             extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One `phd train` under torchrun; `extra`: more `key=value` overrides. Its metrics stay in the run dir."""
    run_dir = work / f"{variant}-{procs}"
    micro = args.micro_batch or max(args.batch_size // procs, 1)
    overrides = [
        f"model.preset={args.preset}", f"model.variant={variant}", f"model.max_seq_len={max(args.seq_len, 512)}",
        f"data={data}", f"out={run_dir}", f"seq_len={args.seq_len}", f"batch_size={args.batch_size}",
        f"micro_batch={micro}", f"max_steps={args.steps}", "eval_every=0", "checkpoint_every=0", "log_every=1",
        "progress=false", f"device={device}", f"compile={'true' if args.compile else 'false'}", *extra,
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "phd", "train", *overrides]
    env = dict(os.environ)
    if device == "cpu":
        env["OMP_NUM_THREADS"] = str(args.threads or max((os.cpu_count() or 1) // procs, 1))
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} on {procs} process(es) failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tok_per_s"] for r in records if r.get("tok_per_s") and r["step"] > args.warmup]
    return {
        "variant": variant, "procs": procs, "micro_batch": micro, "threads": env.get("OMP_NUM_THREADS"),
        "tok_per_s": statistics.median(rates), "wall_s": time.perf_counter() - start,
    }


def _peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def format_markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| variant | processes | threads/proc | tokens/s | scaling efficiency | MFU |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        eff = f"{r['efficiency']:.0%}" if r.get("efficiency") is not None else ""
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else ""
        lines.append(
            f"| {r['variant']} | {r['procs']} | {r['threads'] or ''} | {r['tok_per_s']:,.0f} | {eff} | {mfu} |"
        )
    return "\n".join(lines) + "\n"


def run(args: Any) -> int:
    """`args`: the options of `phd bench scaling` (phd.commands.bench)."""

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and max(args.procs) > torch.cuda.device_count():
        args.procs = [p for p in args.procs if p <= torch.cuda.device_count()]
        print(f"only {torch.cuda.device_count()} GPU(s): measuring {args.procs} process(es)", file=sys.stderr)
    peak = _peak_tflops(args) if device == "cuda" else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="phd-scaling-") as tmp:
        work = Path(tmp)
        vocab = PHDConfig.preset(args.preset).vocab_size
        tokens = args.batch_size * (args.seq_len + 1) * (args.steps + 1)
        data = _synthetic_data(work / "data", vocab, tokens)
        for variant in args.variants:
            config = PHDConfig.preset(args.preset, variant)
            base = None
            for procs in args.procs:
                row = _measure(args, variant, procs, data, work, device)
                base = row["tok_per_s"] if procs == 1 else base
                devices = procs if device == "cuda" else 1  # CPU: the P processes share the same cores
                row["efficiency"] = row["tok_per_s"] / (devices * base) if base and procs > 1 else None
                row["mfu"] = (
                    row["tok_per_s"] * train_flops_per_token(config, args.seq_len) / (peak * 1e12 * procs)
                    if peak else None
                )
                rows.append(row)
                print(f"{variant} x{procs}: {row['tok_per_s']:,.0f} tok/s", file=sys.stderr)
    header = (
        f"Training throughput, {args.preset}, seq_len {args.seq_len}, global batch {args.batch_size}, "
        f"{args.steps} steps (median after {args.warmup}), device {device}"
    )
    if device == "cuda":
        header += f" ({torch.cuda.get_device_name()}, peak {peak} TFLOP/s)"
        header += ". Scaling efficiency: tokens/s(P) / (P * tokens/s(1)), one GPU per process."
    else:
        header += (
            f", {os.cpu_count()} cores shared by the processes. Scaling efficiency: tokens/s(P) / tokens/s(1) "
            "on the same cores (the cost of data parallelism over threads)."
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = format_markdown(rows, header)
    (out / "scaling.md").write_text(text)
    (out / "scaling.json").write_text(json.dumps({"setup": header, "rows": rows}, indent=2) + "\n")
    print(text)
    return 0
