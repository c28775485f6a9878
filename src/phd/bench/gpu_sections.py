"""The sections of `phd bench gpu-check`. Each runs in its own process (a CUDA error cannot spoil the others),
records its rows as it goes (what it finished survives a kill) and stops starting work at its deadline.

Every section runs on CPU too (`--device cpu --quick`: small sizes), so the test suite keeps all of it working.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..attention import flex_attention, split_attention
from ..config import PHDConfig
from ..masks import AttentionLayout
from ..model import PHDTransformer
from ..train.parallelize import apply_compile
from . import agreement as agree
from . import inference as bench_inference
from .scaling import _measure, _peak_tflops, _synthetic_data, train_flops_per_token

# fp32 on a GPU: the fused kernels and the dense reference reduce up to ~4,000 keys in different orders.
CUDA_FP32_TOL = 1e-4
DTYPES = (torch.float32, torch.bfloat16)
COMPILE_BACKEND = {False: "inductor", True: "aot_eager"}  # quick CPU runs: inductor's C++ build takes ~45 s
COMPILE_NEED_S = 40  # no compiled run starts with less time left
PAPER = {"prefill": 1.08, "decode": 1.2}  # PHD-CSWA prefill and PHD decode latency, ratios to vanilla


@dataclass
class Context:
    device: torch.device
    quick: bool
    deadline: float  # time.time() after which no new work starts
    out: Path  # the report folder
    result_path: Path
    result: dict[str, Any] = field(default_factory=lambda: {"rows": [], "notes": [], "passed": None})

    def out_of_time(self) -> bool:
        return time.time() >= self.deadline

    def add(self, row: dict[str, Any]) -> None:
        self.result["rows"].append(row)
        self.flush()

    def note(self, text: str) -> None:
        self.result["notes"].append(text)
        self.flush()

    def flush(self) -> None:
        self.result_path.write_text(json.dumps(self.result, indent=1, default=str) + "\n")

    def stopped(self, what: str, need: float = 0.0) -> bool:
        """True (and said once) when fewer than `need` seconds are left before the deadline: the caller skips
        `what` and the rest."""
        if time.time() + need < self.deadline:
            return False
        if not self.result.get("budget_hit"):
            self.result["budget_hit"] = True
            self.note(f"time budget of this section spent: skipped from {what} on")
        return True


def _tol(ctx: Context, dtype: torch.dtype) -> float:
    if dtype == torch.float32 and ctx.device.type == "cuda":
        return CUDA_FP32_TOL
    return agree.ATTENTION_TOL[dtype]


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


# ----------------------------------------------------------------------------------------------------------
# 1. Attention backends vs dense
# ----------------------------------------------------------------------------------------------------------


def equivalence(ctx: Context) -> None:
    if ctx.quick:
        ts, ks, ws, cs, shape = [1, 33], [1, 3], [None, 2], [None, 4], dict(heads=4, kv_heads=2, dim=8, batch=2)
        flex_layouts = [(33, 3, 2, 4)]  # fp32 only: each flex compile costs seconds on a CPU
    else:
        ts, ks, ws, cs = [1, 33, 128, 777], [1, 2, 3, 5], [None, 1, 4, 16], [None, 4, 32]
        shape = dict(heads=4, kv_heads=2, dim=64, batch=2)  # head_dim 64: the flash path in bf16
        flex_layouts = [(33, 3, 4, 8), (128, 2, 16, 32), (777, 4, 16, 32), (128, 5, None, None)]
    grid = [(t, k, w, c) for t in ts for k in ks for w in ws for c in cs if not (c is not None and w is None)]
    flex_grad = ctx.device.type == "cuda"
    ctx.note(f"tolerances (max |error| vs dense in fp32 on the same rounded inputs; gradients x4): "
             f"fp32 {_tol(ctx, torch.float32):g}, bf16 {_tol(ctx, torch.bfloat16):g}; inputs unit normal, "
             f"{shape}")
    if not flex_grad:
        ctx.note("flex: forward only (no flex backward on CPU)")
    if ctx.device.type == "cuda":  # every flex layout and dtype compiles its own kernel
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    cases = [(dtype, "split", split_attention, layout, True) for dtype in DTYPES for layout in grid]
    cases += [(dtype, "flex", flex_attention, layout, flex_grad) for dtype in DTYPES for layout in flex_layouts
              if not (ctx.quick and dtype != torch.float32)]
    failures = 0
    for dtype, backend, fn, (t, k, w, c), backward in cases:
        if ctx.stopped(f"{backend} {dtype} T={t} K={k}"):
            break
        row = {"backend": backend, "dtype": str(dtype).removeprefix("torch."), "T": t, "K": k, "W": w, "C": c}
        try:
            errors = agree.attention_errors(fn, AttentionLayout(t, k, w, c), dtype=dtype, device=ctx.device,
                                            backward=backward, **shape)
            row.update({name: float(f"{e:.3g}") for name, e in errors.items()})
            row["ok"] = agree.within(errors, _tol(ctx, dtype))
        except Exception as exc:  # noqa: BLE001 - one failing case must not hide the others
            row.update(ok=False, error=_error_text(exc))
        failures += not row["ok"]
        ctx.add(row)
    ctx.result["passed"] = False if failures else (None if ctx.result.get("budget_hit") else True)


# ----------------------------------------------------------------------------------------------------------
# 2. Cache inference vs the training forward
# ----------------------------------------------------------------------------------------------------------


def inference_agreement(ctx: Context) -> None:
    variants = ["vanilla", "repeat-3", "PHD-SWA-3-2-inf", "PHD-CSWA-3-2-4"] if ctx.quick else agree.INFERENCE_VARIANTS
    positions = ["expanded"] if ctx.quick else ["expanded", "shared"]
    ctx.note(f"prefill (bounded, and full for one variant) and every decode step vs the dense training forward, "
             f"fp32, tolerance {agree.LOGIT_TOL:g} on logits (the CPU tests')")
    cases = [(name, pos, "bounded") for pos in positions for name in variants]
    cases.append(("PHD-CSWA-4-3-2" if not ctx.quick else "PHD-CSWA-3-2-4", "expanded", "full"))
    failures = 0
    for name, pos, mode in cases:
        if ctx.stopped(f"{name} ({pos}, {mode})"):
            break
        row: dict[str, Any] = {"variant": name, "positions": pos, "prefill": mode}
        try:
            model = agree.tiny_model(name, device=ctx.device, positions=pos)
            steps = (model.config.chunk or 3) + 3
            err = agree.logit_error(model, agree.edge_lengths(model.config), steps, mode=mode)
            row.update(max_logit_error=float(f"{err:.3g}"), decode_steps=steps, ok=err <= agree.LOGIT_TOL)
        except Exception as exc:  # noqa: BLE001
            row.update(ok=False, error=_error_text(exc))
        failures += not row["ok"]
        ctx.add(row)
    ctx.result["passed"] = failures == 0 and not ctx.result.get("budget_hit")


# ----------------------------------------------------------------------------------------------------------
# 3. Training throughput, peak memory and MFU
# ----------------------------------------------------------------------------------------------------------


def _train_runs(quick: bool, cuda: bool) -> list[tuple[str, str, bool]]:
    """(variant, attention backend, compile), most telling first: the budget cuts from the end."""
    ks = [2] if quick else [2, 3, 4]
    phd = [f"PHD-CSWA-{k}-4-8" if quick else f"PHD-CSWA-{k}-16-32" for k in ks]
    backends = ["split", "flex"] if cuda else ["split"]
    eager = [("vanilla", "split", False)]
    eager += [(v, b, False) for v in phd for b in backends] + [(f"repeat-{k}", "split", False) for k in ks]
    mid = phd[len(phd) // 2]
    compiled = [("vanilla", "split", True)] + [(mid, b, True) for b in backends] + [(f"repeat-{ks[len(ks) // 2]}",
                                                                                    "split", True)]
    compiled += [(v, b, True) for v in phd if v != mid for b in backends]
    compiled += [(f"repeat-{k}", "split", True) for k in ks if k != ks[len(ks) // 2]]
    return eager + compiled


def _time_training(ctx: Context, cfg, seq_len: int, batch: int, compile_blocks: bool, steps: int) -> dict[str, Any]:
    """Seconds per training step (median), tokens/s and peak memory of one model; the first step is apart."""

    cuda = ctx.device.type == "cuda"
    if compile_blocks:
        torch._dynamo.reset()  # a fresh cache for every model: no recompile limit, no stale graphs
    torch.manual_seed(0)
    model = PHDTransformer(cfg).to(ctx.device)
    if compile_blocks:
        apply_compile(model, COMPILE_BACKEND[ctx.quick and not cuda])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=ctx.device)

    def step() -> float:
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # a host sync: the step is done

    if cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    start = time.perf_counter()
    loss = step()
    first = time.perf_counter() - start  # includes compilation
    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if cuda else None
    return {"step_s": sec, "first_step_s": first, "tok_per_s": batch * seq_len / sec, "peak_gib": peak,
            "loss": loss}


def training(ctx: Context) -> None:
    cuda = ctx.device.type == "cuda"
    preset, seq_len, batch, steps = ("cpu-1m", 64, 2, 2) if ctx.quick else ("bench-100m", 2048, 8, 5)
    peak = _peak_tflops(SimpleNamespace(peak_tflops=None)) if cuda else None
    ctx.note(f"preset {preset}, T = {seq_len}, batch {batch}, bf16 autocast, AdamW; median of {steps} steps after "
             f"2 (the first includes compilation); MFU against {peak} TFLOP/s dense bf16" if peak else
             f"preset {preset}, T = {seq_len}, batch {batch}, bf16 autocast, AdamW; median of {steps} steps after 2")
    if not cuda:
        ctx.note("flex: not run on CPU (no flex backward); peak memory and MFU: CUDA only")
    if ctx.quick and not cuda:
        ctx.note("compile=True: per-block torch.compile with the aot_eager backend (quick CPU run)")
    vanilla: dict[bool, float] = {}
    failures = 0
    for variant, backend, compiled in _train_runs(ctx.quick, cuda):
        if ctx.stopped(f"{variant} {backend} compile={compiled}", need=COMPILE_NEED_S * compiled * (not ctx.quick)):
            break
        cfg = PHDConfig.preset(preset, variant, max_seq_len=max(seq_len, 512), attn_backend=backend)
        row: dict[str, Any] = {"variant": variant, "K": cfg.repeat_k, "attention": backend if cfg.repeat_k > 1
                               and not cfg.naive else "causal", "compile": compiled}
        try:
            row.update(_time_training(ctx, cfg, seq_len, batch, compiled, steps))
            if cuda:
                torch.cuda.empty_cache()  # the model and optimizer of the run are gone
            if variant == "vanilla":
                vanilla[compiled] = row["tok_per_s"]
            if compiled in vanilla:
                row["vs_vanilla"] = vanilla[compiled] / row["tok_per_s"]  # step time ratio
            if peak:
                row["mfu"] = row["tok_per_s"] * train_flops_per_token(cfg, seq_len) / (peak * 1e12)
            row["ok"] = True
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory, or flex failing to compile
            row.update(ok=False, error=_error_text(exc))
            failures += 1
            if cuda:
                torch.cuda.empty_cache()
        ctx.add(row)
    ctx.result["passed"] = failures == 0 if ctx.result["rows"] else None


# ----------------------------------------------------------------------------------------------------------
# 4. Inference latency (the native engine, eager), as ratios to vanilla beside the paper's figures
# ----------------------------------------------------------------------------------------------------------


def inference(ctx: Context) -> None:
    out = ctx.out / "inference"
    if ctx.quick:
        given = dict(quick=True, ks=[1, 2], batches=[1, 2], repeats=1, warmup=0)
    else:
        given = dict(preset="bench-100m", ks=[1, 2, 4, 8, 16], prompt_lens=[2048, 8192], batches=[1, 32], repeats=2,
                     warmup=1, decode_steps=16, max_cache_gb=24, dtype="bfloat16")
    flags = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else " " + ",".join(map(str, v))
                     if isinstance(v, list) else f" {v}") for k, v in given.items())
    ctx.note(f"`phd bench inference {flags} --device {ctx.device.type}`: eager engine (decode attends to "
             "a cache view that grows every step, so no CUDA graphs); full report in inference/")
    bench_inference.run(bench_inference.options(**given, device=ctx.device.type, out=str(out)))
    report = json.loads((out / "inference.json").read_text())
    t_max = str(max(report["prompt_lens"]))
    for row in report["rows"]:
        if row["family"] not in ("vanilla", "PHD-CSWA", "PHD", "repeat"):
            continue
        entry = {"variant": row["label"], "K": row["k"]}
        entry.update({f"prefill_T{t}": r for t, r in row["prefill_ratio"].items()})
        entry.update({f"decode_b{b}": r for b, r in row["decode_ratio"].items()})
        if row["family"] == "PHD-CSWA":
            pre = row["prefill_ratio"][t_max]
            dec = [r for r in row["decode_ratio"].values() if r is not None]
            entry["paper_prefill_ok"] = None if pre is None else pre <= PAPER["prefill"]
            entry["paper_decode_ok"] = all(r <= PAPER["decode"] for r in dec) if dec else None
        ctx.add(entry)
    ctx.result["passed"] = None  # a measurement, compared with the paper in the report


# ----------------------------------------------------------------------------------------------------------
# 5. Data parallelism: 2 processes equal 1
# ----------------------------------------------------------------------------------------------------------


def fsdp(ctx: Context) -> None:
    cuda = ctx.device.type == "cuda"
    if cuda and torch.cuda.device_count() < 2:
        ctx.result["skipped"] = f"{torch.cuda.device_count()} GPU: the 2-process NCCL FSDP2 step needs 2"
        ctx.note(ctx.result["skipped"])
        return
    backend = "NCCL" if cuda else "gloo"
    args = SimpleNamespace(preset="cpu-1m", seq_len=64 if ctx.quick else 256, batch_size=8, micro_batch=None,
                           steps=3, warmup=1, compile=False, threads=1 if not cuda else None)
    rtol = 1e-5 if not cuda else 1e-4
    ctx.note(f"`phd train` (FSDP2, {backend}) at 1 and 2 processes, preset {args.preset}, PHD-CSWA-2-4-8, "
             f"fp32, global batch {args.batch_size}, {args.steps} steps: losses equal to rtol {rtol:g}")
    with tempfile.TemporaryDirectory(prefix="phd-gpu-check-") as tmp:
        work = Path(tmp)
        data = _synthetic_data(work / "data", 2048, args.batch_size * (args.seq_len + 1) * (args.steps + 1))
        losses = {}
        for procs in (1, 2):  # one comparison: the deadline is not checked between its two runs
            row = _measure(args, "PHD-CSWA-2-4-8", procs, data, work, ctx.device.type, extra=("dtype=float32",))
            records = (work / f"PHD-CSWA-2-4-8-{procs}" / "metrics.jsonl").read_text().splitlines()
            losses[procs] = [r["loss"] for r in map(json.loads, records) if "loss" in r]
            ctx.add({"processes": procs, "losses": [round(x, 6) for x in losses[procs]],
                     "tok_per_s": round(row["tok_per_s"], 1)})
    diff = max(abs(a - b) / abs(a) for a, b in zip(losses[1], losses[2], strict=True))
    ctx.result["max_relative_loss_difference"] = diff
    ctx.result["passed"] = len(losses[1]) == args.steps and diff <= rtol


SECTIONS = {"equivalence": equivalence, "inference_agreement": inference_agreement, "fsdp": fsdp,
            "training": training, "inference": inference}
