"""`phd study SUITE --costs`: inference cost beside quality. Runs `phd bench inference` on the suite's trained shape
(its preset, a prompt of seq_len tokens, decode at batch 1 with a full context, the suite's K values and W / C)
and appends one `kind: "cost"` row per trained variant to the results file: KV-cache bytes, prefill and decode
time as ratios to vanilla. Timed with process CPU time on one thread, which other jobs on the machine disturb
least; the report says so.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..bench import inference
from .recipes import StudyError, Suite
from .runner import append_result, git_commit


def bench_args(suite: Suite, out: Path) -> SimpleNamespace:
    """The inference benchmark's options for the suite's main recipes' shape."""
    runs = [r for r in suite.runs if r.role == "main"]
    if not runs:
        raise StudyError(f"suite {suite.name} has no main recipe to price")
    configs = [r.model_config() for r in runs]
    windows = {c.window for c in configs if c.window}
    chunks = {c.chunk for c in configs if c.chunk}
    if len(windows) > 1 or len(chunks) > 1:
        raise StudyError(f"suite {suite.name}: the main recipes use several W {sorted(windows)} / C {sorted(chunks)}; "
                         "the benchmark prices one pair")
    seq_len = runs[0].settings["seq_len"]
    ks = sorted({c.repeat_k for c in configs} | {1})
    given = dict(preset=runs[0].settings["preset"], ks=ks, prompt_lens=[seq_len], batches=[1], decode_context=seq_len,
                 decode_steps=16, repeats=7, clock="cpu", threads=1, out=str(out))
    if windows:
        given["window"] = windows.pop()
    if chunks:
        given["chunk"] = chunks.pop()
    return inference.options(**given)


def measure_costs(suite: Suite, results: Path) -> list[dict[str, Any]]:
    trained = {r.variant for r in suite.runs if r.role == "main"}
    with tempfile.TemporaryDirectory(prefix="phd-costs-") as tmp:
        args = bench_args(suite, Path(tmp))
        inference.run(args)
        report = json.loads((Path(tmp) / "inference.json").read_text())
    seq_len = str(args.prompt_lens[0])
    commit = git_commit()
    rows = []
    for r in report["rows"]:
        if r["label"] not in trained:
            continue
        row = {
            "kind": "cost", "suite": suite.name, "variant": r["label"], "prefill_len": int(seq_len),
            "cache_bytes": r["cache_bytes"], "cache_ratio": r["cache_ratio"],
            "prefill_ratio": r["prefill_ratio"][seq_len], "decode_ratio": r["decode_ratio"]["1"],
            "prefill_mode": r["prefill_mode"], "clock": "cpu", "threads": 1, "commit": commit,
        }
        append_result(results, row)
        rows.append(row)
    return rows
