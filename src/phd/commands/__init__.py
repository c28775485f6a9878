"""The `phd` command: one module per subcommand in this package, registered in COMMANDS (one line each).

Commands sit on top of the library and are its only users of argparse. Each module exposes `register(subparsers)`
and imports the optional extras (transformers, lm-eval, matplotlib) only when it runs, so every command is listed
and starts without them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import PHDError

COMMANDS = {name: f"phd.commands.{name}" for name in
            ("data", "train", "export", "compare", "generate", "serve", "bench", "eval", "convert", "study")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phd", description="PHD-Transformer: pretrain, serve, evaluate")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []  # for another program (phd serve: vLLM)
    args = parser.parse_args(argv[: len(argv) - len(passthrough) - 1] if "--" in argv else argv)
    if "--" in argv:
        if not hasattr(args, "passthrough"):
            parser.error(f"arguments after `--` are passed to vLLM by `phd serve` only; phd {args.command} takes none")
        args.passthrough = passthrough
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
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

