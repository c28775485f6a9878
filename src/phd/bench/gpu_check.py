"""`phd bench gpu-check OUT` (also `scripts/gpu-check.sh OUT`): everything a GPU loan of a few minutes should
prove, in one command, reported to OUT/gpu-check.md and .json with a one-screen summary.

Sections (see gpu_sections): attention backends vs dense, cache inference vs training, 2-process FSDP2 vs 1,
training throughput / memory / MFU, inference latency vs the paper. Each runs in a child process with its share
of what is left of a global time budget: a crash, a CUDA error or a hang loses that section only, and
a section past its deadline stops starting work and keeps what it measured. `--device cpu --quick` runs all of
it at small sizes in under 2 minutes; the test suite does, so the check cannot rot between GPU loans.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from .gpu_report import markdown, summary
from .gpu_sections import SECTIONS, Context

# Share of the budget per section, in running order (the cheap, decisive checks first); --quick on a CPU spends
# its time differently (the two torchrun launches of fsdp dominate, nothing is large).
SHARES = {"equivalence": 0.12, "inference_agreement": 0.06, "fsdp": 0.12, "training": 0.45, "inference": 0.25}
QUICK_SHARES = {"equivalence": 0.2, "inference_agreement": 0.1, "fsdp": 0.3, "training": 0.25, "inference": 0.15}
GRACE_S = 30  # a section past its deadline gets this long to finish its current item before it is killed
MIN_START_S = 5  # no section starts with less time than this


def run(args: Any) -> int:
    """`args`: the options of `phd bench gpu-check` (phd.commands.bench); --section runs one section here."""
    if args.section:
        return _run_section(args)

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    budget = args.budget_s or (100.0 if args.quick else 450.0)
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, dict[str, Any]] = {}
    for name in args.sections:
        left = budget - (time.time() - started)
        if left < MIN_START_S:
            results[name] = {"status": "skipped", "reason": "global time budget spent", "rows": [], "notes": []}
            continue
        later = args.sections[args.sections.index(name):]
        shares = QUICK_SHARES if args.quick else SHARES
        share = left * shares[name] / sum(shares[s] for s in later)  # overruns and savings spread over the rest
        t0 = time.time()
        results[name] = _child(name, device, args.quick, t0 + share, out)
        results[name]["seconds"] = round(time.time() - t0, 1)
        print(f"[gpu-check] {name}: {results[name]['status']} ({results[name]['seconds']:.0f} s)", flush=True)
    report = {"device": device, "environment": _environment(device), "quick": args.quick, "budget_s": budget,
              "seconds": round(time.time() - started, 1), "sections": results}
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    (out / "gpu-check.md").write_text(markdown(report))
    print(summary(report))
    print(f"wrote {out / 'gpu-check.md'} and {out / 'gpu-check.json'}")
    return 0 if all(r["status"] in ("passed", "measured", "skipped") for r in results.values()) else 1


def _child(name: str, device: str, quick: bool, deadline: float, out: Path) -> dict[str, Any]:
    """Run one section in a child process; whatever it recorded is kept, whatever happens to it."""
    result_path = out / "logs" / f"{name}.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "phd", "bench", "gpu-check", str(out), "--section", name, "--device", device,
           "--deadline", str(deadline), "--result", str(result_path), *(["--quick"] if quick else [])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(out / "logs" / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait(timeout=max(deadline - time.time(), 0) + GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
    result = json.loads(result_path.read_text()) if result_path.exists() else {"rows": [], "notes": []}
    if rc is None:
        result["status"] = "timed out"
    elif rc != 0:
        result["status"] = "failed"
        result["error"] = result.get("error") or _log_tail(out / "logs" / f"{name}.log")
    elif result.get("skipped"):
        result["status"] = "skipped"
    elif result.get("passed") is None:
        result["status"] = "measured" if result["rows"] else "no result"
    else:
        result["status"] = "passed" if result["passed"] else "FAILED"
    return result


def _log_tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _run_section(args: Any) -> int:
    if args.device == "cpu":
        torch.set_num_threads(1 if args.quick else torch.get_num_threads())
    ctx = Context(torch.device(args.device), args.quick, args.deadline, Path(args.out), Path(args.result))
    ctx.flush()
    try:
        SECTIONS[args.section](ctx)
    except Exception as exc:  # noqa: BLE001 - recorded, and the exit status says the section failed
        traceback.print_exc()
        ctx.result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        ctx.flush()
        return 1
    ctx.flush()
    return 0


def _environment(device: str) -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu_cores": os.cpu_count()}
    if device == "cuda" and torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
    return env

