"""Small timing helpers shared by the benchmarks: warm-up, then the median of repeats."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def median_seconds(
    fn: Callable[[], object], repeats: int = 5, warmup: int = 1, clock: Callable[[], float] = time.perf_counter
) -> float:
    """`clock`: wall time, or this process's CPU time (steadier on a shared machine, with one torch thread)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = clock()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(clock() - start)
    return statistics.median(times)


def interleaved_medians(
    fns: dict, repeats: int = 5, warmup: int = 1, clock: Callable[[], float] = time.perf_counter
) -> dict:
    """Median seconds of each function, timed round-robin so that load changes hit every entry alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(median_seconds(fn, repeats=1, warmup=0, clock=clock))
    return {name: statistics.median(values) for name, values in times.items()}


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out_dir: str | Path, stem: str, markdown: str, data: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(markdown + "\n")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    return out / f"{stem}.md"


def machine_line() -> str:
    threads = torch.get_num_threads()
    cpu = platform.processor() or platform.machine()
    return f"torch {torch.__version__}, {cpu}, {os.cpu_count()} cores, {threads} threads"
