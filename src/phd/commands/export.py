"""`phd export RUN_DIR --out DIR`: the latest (or a given) training checkpoint as a model folder (the single-file
format of phd.io that generate, eval and convert read)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..train.consolidate import consolidate_checkpoint, find_checkpoint


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export", help="training checkpoint -> config.json + model.safetensors + tokenizer.json"
    )
    parser.add_argument("run_dir", help="a `phd train` run directory (or one of its checkpoints/step_* folders)")
    parser.add_argument("--out", required=True, help="the export directory to write (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it holds a phd export already")
    parser.add_argument("--step", type=int, default=None, help="export this step instead of the latest")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = Path(args.run_dir)
    checkpoint = path if (path / "meta.json").exists() else find_checkpoint(path, args.step)
    out = consolidate_checkpoint(checkpoint, args.out, overwrite=args.overwrite)
    print(f"exported {checkpoint} -> {out}")
    return 0
