"""`phd data | train | generate | eval | bench | convert | export`: one entry point, one module per command.

Each command module exposes `register(subparsers)` and imports its heavy dependencies only when it runs, so
the command starts fast and without the optional extras (transformers, lm-eval, matplotlib).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "data": "phd.data.cli",
    "train": "phd.train.cli",
    "export": "phd.train.cli_export",
    "compare": "phd.train.compare",
    "generate": "phd.inference.cli",
    "bench": "phd.bench.cli",
    "eval": "phd.eval.cli",
    "convert": "phd.convert_cli",
    "study": "phd.study.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phd", description="PHD-Transformer: pretrain, serve, evaluate")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .errors import PHDError

    try:
        return int(args.func(args) or 0)
    except PHDError as err:  # bad input or state a command did not report itself: one line, no traceback
        print(f"phd {args.command}: error: {err}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as err:
        if "pip install" not in str(err):  # a missing optional extra: say which, without a traceback
            raise
        print(f"phd {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
