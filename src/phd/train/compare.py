"""`phd compare`: train the same small model as several variants, same data, same settings, and print their
validation losses side by side.

Every variant starts from the same initial weights (PHD adds no parameters, and the seed is shared), sees the
same batches in the same order and follows the same schedule; only the attention pattern / repetition differs.
The defaults fit a few minutes per variant on 2 CPU cores, so the gap they show is an early-training one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_VARIANTS = ("vanilla", "PHD-CSWA-3-16-32")
DEFAULT_CHARS = 2_000_000  # of every corpus file (12 MB of text): plenty for a few minutes per variant


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("compare", help="train vanilla and PHD variants side by side; print val losses")
    parser.add_argument("--data", help="data directory from `phd data` (default: built once from the default corpus)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), metavar="NAME",
                        help="paper variant names (default: vanilla PHD-CSWA-3-16-32)")
    parser.add_argument("--preset", default="cpu-1m", help="model size preset (default cpu-1m, 1.0M parameters)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per variant (default 120)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-iters", type=int, default=8, help="validation batches (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/compare", help="run directories and results (default runs/compare)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: variant, params, train tokens, val loss (and its difference to the first), tok/s, time."""
    lines = [
        "| variant | params | train tokens | val loss | vs first | tok/s | time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = rows[0]["val_loss"] if rows else None
    for r in rows:
        delta = "" if r is rows[0] else f"{r['val_loss'] - base:+.4f}"
        lines.append(
            f"| {r['variant']} | {r['params']:,} | {r['tokens']:,} | {r['val_loss']:.4f} | {delta} | "
            f"{r['tok_per_s']:,.0f} | {r['time']:.0f} s |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError, PHDConfig, preset_arch
    from ..data.build import default_data_dir
    from ..data.shards import DataError
    from .config import TrainConfig, TrainConfigError
    from .trainer import Trainer

    out = Path(args.out)
    try:
        for name in args.variants:
            PHDConfig.parse_name(name)
        vocab = preset_arch(args.preset)["vocab_size"]
        data = Path(args.data) if args.data else default_data_dir(vocab, DEFAULT_CHARS, progress=not args.quiet)
        rows = []
        for name in args.variants:
            run_dir = out / name
            if (run_dir / "config.json").exists():  # a previous comparison's run: start it over
                shutil.rmtree(run_dir)
            cfg = TrainConfig(
                model={"preset": args.preset, "variant": name, "max_seq_len": max(args.seq_len, 512)},
                data=str(data), out=str(run_dir), seq_len=args.seq_len, batch_size=args.batch_size,
                micro_batch=args.batch_size, max_steps=args.steps, lr=args.lr, min_lr=args.lr / 10,
                warmup_steps=max(args.steps // 10, 1), eval_every=args.steps, eval_iters=args.eval_iters,
                checkpoint_every=args.steps, checkpoint_keep=1, log_every=10, seed=args.seed, device="cpu",
                progress=not args.quiet,
            )
            start = time.perf_counter()
            summary = Trainer(cfg).fit()
            rows.append({
                "variant": summary["variant"], "params": summary["params"], "tokens": summary["tokens"],
                "val_loss": summary["val_loss"], "train_loss": summary["train_loss"],
                "tok_per_s": summary["tok_per_s"], "time": time.perf_counter() - start,
            })
    except (ConfigError, TrainConfigError, DataError) as err:
        print(f"phd compare: error: {err}", file=sys.stderr)
        return 2
    table = format_table(rows)
    setup = (
        f"{args.preset}, seq_len {args.seq_len}, batch {args.batch_size}, {args.steps} steps, lr {args.lr}, "
        f"seed {args.seed}, data {data}"
    )
    (out / "results.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    (out / "results.md").write_text(f"{setup}\n\n{table}\n")
    print(f"\n{setup}\n\n{table}\n\nwritten to {out}/results.md and results.json")
    return 0
