"""`phd bench training | inference | scaling | gpu-check`."""

from __future__ import annotations

import argparse
import importlib

KINDS = {
    "training": ("phd.bench.training", "attention and training-step cost of every backend vs vanilla"),
    "inference": ("phd.bench.inference", "prefill, decode latency and cache bytes vs vanilla"),
    "scaling": ("phd.bench.scaling", "training tokens/s at 1 and 2 processes (and MFU on CUDA)"),
    "gpu-check": ("phd.bench.gpu_check", "everything a GPU loan should prove, in one timed run (or --quick on CPU)"),
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="benchmarks: ratios to vanilla measured side by side")
    kinds = parser.add_subparsers(dest="kind", metavar="KIND")
    for name, (module, help_text) in KINDS.items():
        mod = importlib.import_module(module)
        kind = kinds.add_parser(name, help=help_text)
        mod.add_arguments(kind)
        kind.set_defaults(func=mod.run)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
