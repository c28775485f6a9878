"""`phd study SUITE [--status]` trains a suite of runs from `experiments/SUITE.json` (resumable, never redoing a
finished run); `phd study report` rebuilds docs/RESULTS.md and its plots from `experiments/results.jsonl` alone."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..errors import PHDError
from ..study.costs import measure_costs
from ..study.recipes import StudyError, load_suite
from ..study.report import write_report
from ..study.runner import run_suite
from ..study.screen import screen_suite
from ..study.status import status_text


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("study", help="run a suite of paired training runs; `phd study report` writes the report")
    parser.add_argument("suite", help="suite name (experiments/SUITE.json), or `report`")
    parser.add_argument("--status", action="store_true", help="say what is done and what is left, with a time estimate")
    parser.add_argument("--costs", action="store_true",
                        help="time inference of the suite's variants on its shape and add cost rows to the results")
    parser.add_argument("--screen", type=int, metavar="STEPS",
                        help="train each run only to step STEPS (its full schedule), health every step; one row per "
                             "run in EXPERIMENTS/screen.jsonl (or --results)")
    parser.add_argument("--experiments", default="experiments", help="folder of suite files and results.jsonl")
    parser.add_argument("--results", help="results file (default EXPERIMENTS/results.jsonl)")
    parser.add_argument("--runs", default="runs/study", help="folder of the runs' checkpoints (default runs/study)")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: torch's choice)")
    parser.add_argument("--out", default="docs", help="report: folder for RESULTS.md and results/*.png (default docs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    experiments = Path(args.experiments)
    default = "screen.jsonl" if args.screen else "results.jsonl"
    results = Path(args.results) if args.results else experiments / default
    if args.threads is not None:
        if args.threads < 1:
            print(f"phd study: error: --threads {args.threads} must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        if args.suite == "report":
            for path in write_report(results, Path(args.out)):
                print(f"wrote {path}")
            return 0
        suite = load_suite(experiments, args.suite)
        if args.status:
            print(status_text(suite, results, Path(args.runs)))
            return 0
        if args.costs:
            for row in measure_costs(suite, results):
                print(f"{row['variant']}: cache {row['cache_ratio']:.3f}x, prefill {row['prefill_ratio']:.2f}x, "
                      f"decode {row['decode_ratio']:.2f}x")
            return 0
        if args.screen is not None:
            if args.screen < 1:
                raise StudyError(f"--screen {args.screen} must be >= 1 (steps)")
            trained = screen_suite(suite, results, Path(args.runs), args.screen)
            print(f"[screen {suite.name}] {trained} run(s) screened to step {args.screen}; rows in {results}")
            return 0
        counts = run_suite(suite, results, Path(args.runs), progress=not args.quiet)
    except PHDError as err:  # exit 2: the suite or its data is invalid
        print(f"phd study: error: {err}", file=sys.stderr)
        return 2
    left = len(suite.runs) - counts["done"] - counts["trained"]
    print(f"[study {suite.name}] {counts['done']} already done, {counts['trained']} trained now, "
          f"{counts['locked']} held by other processes; {left} left")
    return 0
