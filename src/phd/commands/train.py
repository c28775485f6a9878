"""`phd train [CONFIG.json|CONFIG.toml] [--preset P] [--variant NAME] [--key value | key=value ...]`.

Runs in one process, or under torchrun for data-parallel FSDP2 (see docs/training.md). A run directory that
already holds a checkpoint is resumed from its latest one. A run stopped before its end (SIGTERM, Ctrl-C) exits
EXIT_STOPPED, not 0, so that `phd train ... && next` never goes on after an unfinished run.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import PHDError
from ..train.config import TrainConfigError, build_config, parse_overrides
from ..train.parallelize import init_distributed, shutdown_distributed
from ..train.trainer import train

EXIT_STOPPED = 75  # EX_TEMPFAIL (sysexits.h): stopped before the end with a checkpoint; run again to resume

USAGE = """usage: phd train [CONFIG.json|CONFIG.toml] [--preset P] [--variant NAME] [--key value | key=value ...]

Train a PHD-Transformer. Every TrainConfig field can be set in the file or overridden here; nested model
fields use dots. Examples:
  phd train --preset cpu-1m --variant PHD-CSWA-3-16-32 data=data/default out=runs/cswa max_steps=500
  phd train run.json --lr 1e-3 --model.repeat_k 3 --checkpoint_every 100
  torchrun --nproc_per_node=2 -m phd train run.json

Fields: data, out, init_from, seq_len, batch_size (global, sequences per step), micro_batch (per process),
max_steps, max_tokens, lr, min_lr, warmup_steps, betas, weight_decay, clip, eval_every, eval_iters,
checkpoint_every, checkpoint_keep, log_every, seed, device (auto|cpu|cuda), dtype (auto|float32|bfloat16),
nan_policy (skip|stop), max_skipped_steps, data_parallel (fsdp|ddp), compile, activation_checkpointing,
progress,
model.preset, model.variant, model.<any PHDConfig field>.

Exit status: 0 trained to the end (model exported); 75 stopped before the end by SIGTERM or Ctrl-C, with a
checkpoint (run the same command again to resume); 1 an error while training; 2 a bad config or device;
130 aborted by a second Ctrl-C (the last checkpoint stays).
"""


def register(sub: argparse._SubParsersAction) -> None:
    # Overrides are free-form (`--model.repeat_k 3`), so this parser takes every argument as text.
    parser = sub.add_parser("train", help="train a model (single process or torchrun/FSDP2)", prefix_chars="+",
                            add_help=False)
    parser.add_argument("args", nargs="*")
    parser.set_defaults(func=run)


def split_args(args: list[str]) -> tuple[str | None, dict]:
    """(config file, overrides) from the raw arguments; --preset / --variant are model.preset / model.variant."""
    path = None
    if args and not args[0].startswith("-") and "=" not in args[0]:
        path, args = args[0], args[1:]
    overrides = parse_overrides(args)
    for short in ("preset", "variant"):
        if short in overrides:
            overrides[f"model.{short}"] = overrides.pop(short)
    if path is None and "model.preset" not in overrides and not any(k.startswith("model.d_model") for k in overrides):
        raise TrainConfigError("give a config file or --preset NAME (e.g. --preset cpu-1m); see `phd train --help`")
    return path, overrides


def run(args: argparse.Namespace) -> int:
    if any(a in ("-h", "--help") for a in args.args):
        print(USAGE)
        return 0
    try:
        path, overrides = split_args(args.args)
        cfg = build_config(path, overrides)
        info = init_distributed(cfg.device)
    except PHDError as err:  # a bad config or device: exit 2 before any process group exists
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = train(cfg, info)
    except PHDError as err:
        print(f"error (rank {info.rank}): {err}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    if summary["stopped"]:  # every rank stopped at the same step: every rank exits EXIT_STOPPED
        if info.is_main:
            print(f"stopped: {format_summary(summary)}; checkpoint saved in {cfg.out}/checkpoints; run again to "
                  f"resume (exit status {EXIT_STOPPED})")
        return EXIT_STOPPED
    if info.is_main:
        exported = f"model exported to {summary['exported']}" if summary["exported"] else "nothing exported"
        print(f"done: {format_summary(summary)}; {exported}")
    return 0


def format_summary(summary: dict) -> str:
    parts = [f"{summary['variant']} step {summary['step']}", f"{summary['tokens']:,} tokens"]
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
        if summary[key] is not None:
            parts.append(f"{label} {summary[key]:.4f}")
    if summary["tok_per_s"]:
        parts.append(f"{summary['tok_per_s']:,.0f} tok/s")
    return ", ".join(parts)
