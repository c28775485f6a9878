"""`phd export RUN_DIR --out DIR`: the latest (or a given) training checkpoint as a single-file export."""

from __future__ import annotations

import argparse
import sys


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
    from pathlib import Path

    from ..errors import PHDError
    from .export import export_checkpoint, find_checkpoint

    try:
        path = Path(args.run_dir)
        checkpoint = path if (path / "meta.json").exists() else find_checkpoint(path, args.step)
        out = export_checkpoint(checkpoint, args.out, overwrite=args.overwrite)
    except PHDError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"exported {checkpoint} -> {out}")
    return 0
