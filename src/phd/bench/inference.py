"""`phd bench inference`: prefill time, decode latency and cache bytes of every variant, as ratios to vanilla.

All variants share one set of weights and are measured side by side in one run, round-robin (every repeat
visits every variant), so slow drifts of the machine hit them alike; figures are medians. Writes
OUT/inference.md (table, goals, environment), OUT/inference.json and, with matplotlib, PNG plots in the manner
of the paper's Figures 1c/1d (prefill and decode cost against K) and 9 (SWA vs CSWA).

Decode timing starts from a cache filled to --decode-context tokens (zero K/V: latency does not depend
on the values); a K-fold prefill of naive repetition just to set it up would dominate the run.
Measured reasons for missed goals are recorded with the figures: the extra hidden tokens each bounded
prefill computes (share of vanilla's token-layers) and how a matmul's time grows from B to K*B rows here.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from ..config import PHDConfig
from ..inference import PHDCache, decode_step, generate, prefill
from ..inference.engine import hidden_widths
from ..inference.kernels import ROWS_LINEAR_MAX_ROWS, rows_linear_op
from ..inference.weights import (
    as_loaded,
    column_major_linears,
    decode_applies,
    decode_linears,
    kernel_linears,
    packing_available,
    plain_linears,
)
from ..masks import hidden_token
from ..model import PHDTransformer
from .timing import CLOCKS

PLAIN = "{} (plain linears)"  # label of a reference row decoded with nn.Linear's own kernels
GOALS = {  # ratio to vanilla; prefill at the longest prompt, decode at K = 4
    "PHD prefill": 1.05, "PHD-CSWA prefill": 1.10, "PHD-SWA bounded prefill": 1.15, "decode K=4": 1.25,
}


# Defaults of the full run and of --quick (a smoke run in seconds); explicit options override either.
FULL = dict(preset="bench-100m", ks=[1, 2, 3, 4, 8, 16], prompt_lens=[512, 2048], batches=[1, 8], window=16,
            chunk=32, decode_context=512, decode_steps=16, repeats=3, warmup=1)
QUICK = dict(preset="cpu-1m", ks=[1, 2, 4], prompt_lens=[64, 128], batches=[1, 2], window=4, chunk=8,
             decode_context=64, decode_steps=4, repeats=2, warmup=1)
# Every option (`phd bench inference --help`); None: taken from FULL or QUICK.
DEFAULTS = dict(dict.fromkeys(FULL), quick=False, kfold_repeats=1, max_prefill_tokens=8192, max_cache_gb=4.0,
                device="cpu", dtype="float32", threads=None, clock="wall", out="docs/bench", weights="default",
                generate=True)


def options(**given: Any) -> SimpleNamespace:
    """The benchmark's options for a caller other than the command (DEFAULTS, then `given`)."""
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown inference benchmark options {sorted(unknown)}")
    return SimpleNamespace(**{**DEFAULTS, **given})


def describe(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


@dataclass
class Variant:
    label: str  # row name in the table
    name: str  # PHDConfig variant name
    k: int
    mode: str = "bounded"  # prefill mode
    family: str = ""  # vanilla | repeat | PHD | PHD-SWA | PHD-SWA full | PHD-CSWA | plain
    plain: bool = False  # decode with nn.Linear's own kernels whatever --weights (a reference row; no prefill)
    prefill: dict = field(default_factory=dict)  # T -> seconds (median)
    decode: dict = field(default_factory=dict)  # batch -> seconds per token (median)
    cache_bytes: int = 0
    hidden_share: float = 0.0  # hidden token-layers computed by prefill at the longest prompt / (T * L)


def _variants(ks: list[int], window: int, chunk: int, plain_rows: bool = False) -> list[Variant]:
    """Every variant at every K; plain_rows: vanilla and PHD-CSWA again with plain linears (decode only), so that
    decode with and without decode_linears is measured side by side in one run."""
    out = [Variant("vanilla", "vanilla", 1, family="vanilla")]
    if plain_rows:
        out.append(Variant(PLAIN.format("vanilla"), "vanilla", 1, family="plain", plain=True))
    for k in (k for k in ks if k > 1):
        out += [
            Variant(f"repeat-{k}", f"repeat-{k}", k, "full", "repeat"),
            Variant(f"PHD-{k}", f"PHD-{k}", k, family="PHD"),
            Variant(f"PHD-SWA-{k}-{window}-inf", f"PHD-SWA-{k}-{window}-inf", k, family="PHD-SWA"),
            Variant(f"PHD-SWA-{k}-{window}-inf (full prefill)", f"PHD-SWA-{k}-{window}-inf", k, "full",
                    "PHD-SWA full"),
            Variant(f"PHD-CSWA-{k}-{window}-{chunk}", f"PHD-CSWA-{k}-{window}-{chunk}", k, family="PHD-CSWA"),
        ]
        if plain_rows:
            name = f"PHD-CSWA-{k}-{window}-{chunk}"
            out.append(Variant(PLAIN.format(name), name, k, family="plain", plain=True))
    return out


def _is_kfold(v: Variant) -> bool:
    return v.mode == "full" and v.k > 1


def _with_variant(model, name: str):
    """The same weights under another variant: only the config (the attention rule, K) differs."""
    view = copy.copy(model)
    view.config = model.config.with_variant(name)
    return view


def _hidden_share(cfg, t: int) -> float:

    if cfg.is_causal:
        return 0.0
    span = (t - 1) % cfg.chunk + 1 if cfg.chunk else None  # the chunk holding the last token, as prefill does
    return sum(outs for _, outs in hidden_widths(cfg, t, span)) * (cfg.repeat_k - 1) / (t * cfg.n_layers)


def _matmul_scaling(d_in: int, d_out: int, rows: list[int], clock, n_weights: int = 24, device: str = "cpu",
                    dtype=None) -> dict[str, dict[int, float]]:
    """Seconds of one [rows, d_in] x [d_in, d_out] linear, weights streamed from memory as in decoding
    (cycling through n_weights distinct matrices, larger than the caches): how cost grows with the rows, for
    weights stored row-major (nn.Linear's default), column-major, packed by MKL for that row count, and read by
    phd's rows kernel (up to 8 rows; the last two are what decode_linears uses on CPU)."""
    row_major = [torch.randn(d_out, d_in, device=device, dtype=dtype) for _ in range(n_weights)]
    layouts = {"row": row_major, "column": [w.t().contiguous().t() for w in row_major]}
    float_cpu = torch.device(device).type == "cpu" and (dtype or torch.float32) == torch.float32
    packable = float_cpu and packing_available()
    kernel = rows_linear_op() if float_cpu else None
    if packable:
        layouts["packed"] = row_major
    if kernel is not None:
        layouts["kernel"] = row_major
    out: dict[str, dict[int, float]] = {name: {} for name in layouts}
    for m in rows:
        x = torch.randn(m, d_in, device=device, dtype=dtype)
        packs = [torch.ops.mkl._mkl_reorder_linear_weight(w, m) for w in row_major] if packable else []
        for _ in range(3):  # round-robin over the layouts, best of 3 each
            for name, weights in layouts.items():
                if name == "kernel" and m > ROWS_LINEAR_MAX_ROWS:
                    continue
                start = clock()
                if name == "packed":
                    for w, packed in zip(weights, packs, strict=True):
                        torch.ops.mkl._mkl_linear(x, packed, w, None, m)
                elif name == "kernel":
                    for w in weights:
                        kernel(x, w, None)
                else:
                    for w in weights:
                        F.linear(x, w)
                seconds = (clock() - start) / n_weights
                out[name][m] = min(out[name].get(m, seconds), seconds)
    return out


LAYOUTS = {"row": "row-major weights", "column": "column-major weights", "default": "what decode_step does",
           "packed": "weights packed by MKL for the row count", "kernel": "phd's rows kernel"}


def _used(scaling: dict[str, dict[int, float]], weights: str, rows: int) -> float:
    """Seconds of the kernel a decode of `rows` rows runs under `weights`, as decode_linears chooses: `decode`
    takes the rows kernel up to 8 rows, MKL's packs beyond (`packed`: packs from 2 rows on); one row without
    the kernel stays a plain matrix-vector product."""
    if weights in ("default", "decode") and rows in scaling.get("kernel", {}):
        return scaling["kernel"][rows]
    if weights == "default":
        weights = "row"
    if weights in ("decode", "packed"):
        weights = "packed" if rows > 1 and "packed" in scaling else "row"
    return scaling[weights][rows]


def _read_bandwidth(device: str, dtype, clock, mib: int = 512) -> float:
    """Bytes per second one pass over a buffer far larger than the caches reads (best of 5): the speed at which
    a decode step can at best stream the weights."""
    buf = torch.ones(mib * 2**20 // torch.finfo(dtype).bits * 8, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        start = clock()
        buf.sum()
        best = min(best, clock() - start)
    return buf.numel() * buf.element_size() / best


def _decode_weight_bytes(model) -> int:
    """Bytes a decode step must read at least once: every parameter, except an untied embedding table, of
    which it reads only the rows of the new tokens."""
    embed = model.embed.weight
    tied = model.lm_head.weight is embed
    return sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embed)


def run(args: SimpleNamespace) -> int:
    """Measure and write the report; `args`: the DEFAULTS options (`phd bench inference` or options())."""


    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if 1 not in args.ks:
        args.ks = [1, *args.ks]  # vanilla is the reference of every ratio
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_max = max(args.prompt_lens)
    cfg = PHDConfig.preset(args.preset, max_seq_len=max(t_max, args.decode_context + args.decode_steps + 8))
    dtype = getattr(torch, args.dtype)
    base = PHDTransformer(cfg).to(args.device, dtype).eval()
    if args.weights == "column":
        column_major_linears(base)  # the variants below share these weights
    plain_rows = args.weights in ("default", "decode", "packed") and decode_applies(args.device, dtype)
    variants = _variants(args.ks, args.window, args.chunk, plain_rows=plain_rows)
    models = {v.label: _with_variant(base, v.name) for v in variants}
    load_before = os.getloadavg()
    started = time.perf_counter()
    print(f"{cfg.num_params() / 1e6:.0f}M parameters, {len(variants)} variants, threads {torch.get_num_threads()}")

    with torch.inference_mode():
        # ----- cache bytes (meta tensors: the real layout, no memory) -----
        for v in variants:
            v.cache_bytes = PHDCache.for_config(models[v.label].config, 1, t_max, dtype, device="meta").nbytes
            v.hidden_share = float(v.k - 1) if _is_kfold(v) else _hidden_share(models[v.label].config, t_max)

        for t in args.prompt_lens:
            todo = [v for v in variants
                    if not v.plain and not (_is_kfold(v) and v.k * t > args.max_prefill_tokens)]
            medians = _time_prefill(models, todo, cfg.vocab_size, t, args, started)
            for v in todo:
                v.prefill[t] = medians[v.label]
        decoders = [v for v in variants if v.family != "PHD-SWA full"]  # its decode is bounded PHD-SWA's
        for b in args.batches:
            medians = _time_decode(models, decoders, cfg.vocab_size, b, args)
            for v in decoders:
                v.decode[b] = medians.get(v.label)
            print(f"  decode batch {b} done ({time.perf_counter() - started:.0f} s)", flush=True)
        generate = _time_generate(base, args) if args.generate else {}

    rows = sorted({b * k for b in args.batches for k in args.ks} | set(args.batches))
    scaling = _matmul_scaling(cfg.d_model, cfg.d_ff, rows, _clock(args), device=args.device, dtype=dtype)
    bandwidth = _read_bandwidth(args.device, dtype, _clock(args))
    weight_bytes = _decode_weight_bytes(base)
    bound = {"weight_bytes": weight_bytes, "read_bytes_per_s": bandwidth, "seconds": weight_bytes / bandwidth}
    env = {
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "device": _device_name(args.device),
        "cores": os.cpu_count(), "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()], "seconds": round(time.perf_counter() - started, 1),
        "preset": args.preset, "params": cfg.num_params(), "dtype": args.dtype,
        "decode_context": args.decode_context, "decode_steps": args.decode_steps,
        "repeats": args.repeats, "warmup": args.warmup, "kfold_repeats": args.kfold_repeats, "clock": args.clock,
        "weights": args.weights,
    }
    report = _report(cfg, variants, args, scaling, env)
    report["memory_bound"] = bound
    report["generate"] = generate
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "inference.json").write_text(json.dumps(report, indent=2) + "\n")
    plots = _plots(report, out)
    (out / "inference.md").write_text(_markdown(report, plots))
    print(f"wrote {out / 'inference.md'}, {out / 'inference.json'}" + (f", {len(plots)} plots" if plots else ""))
    return 0


def _generate_paths() -> dict[str, tuple[Callable, Callable]]:
    """Each way a user generates greedily, as (wrap, run): wrap(model) builds what the user holds (outside the
    clock), run(wrapped, ids, new tokens) -> ids is timed. phd's own loop, and transformers' generate() through
    PHDForCausalLM and its Cache where transformers is installed."""
    paths: dict[str, tuple[Callable, Callable]] = {
        "phd.generate": (lambda model: model, lambda model, ids, n: generate(model, ids, n))}
    try:
        from ..hf import PHDForCausalLM
    except ImportError:
        return paths

    def hf_generate(hf, ids, n):
        return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    paths["transformers generate()"] = (PHDForCausalLM.from_native, hf_generate)
    return paths


def _time_generate(base, args) -> dict:
    """End to end at batch 1 (a prompt of --decode-context tokens, then --decode-steps greedy tokens), vanilla and
    PHD-CSWA at each K through each path, round-robin; each path's ratio is to vanilla through the same path.
    Every model starts from plain linears, as a freshly loaded one does (its first decode step gives it the
    kernel)."""
    paths = _generate_paths()
    names = ["vanilla"] + [f"PHD-CSWA-{k}-{args.window}-{args.chunk}" for k in args.ks if k > 1]
    ids = torch.randint(0, base.config.vocab_size, (1, args.decode_context), device=args.device)
    times: dict[str, dict[str, list[float]]] = {path: {n: [] for n in names} for path in paths}
    for r in range(args.warmup + args.repeats):
        for path, (wrap, run_path) in paths.items():
            for name in names:
                as_loaded(base)  # plain linears, no decode-kernel state: what a fresh model's first step sees
                model = wrap(_with_variant(base, name))
                start = _clock(args)()
                run_path(model, ids, args.decode_steps)
                if r >= args.warmup:
                    times[path][name].append(_clock(args)() - start)
    as_loaded(base)
    out = {}
    for path, by_name in times.items():
        van = statistics.median(by_name["vanilla"])
        out[path] = {name: {"seconds": statistics.median(v), "ratio": round(statistics.median(v) / van, 3)}
                     for name, v in by_name.items()}
    print(f"  end-to-end generate done ({len(paths)} paths)", flush=True)
    return out


def _generate_markdown(generate: dict) -> list[str]:
    if not generate:
        return []
    names = list(next(iter(generate.values())))
    lines = ["", "## End to end: generate at batch 1", "",
             "A prompt of the decode context, then the decode steps' greedy tokens, through each path a user takes "
             "(no preparation step: each model as loaded); time / vanilla's through the same path.", "",
             "| path | vanilla | " + " | ".join(names[1:]) + " |", "|---|---|" + "---|" * (len(names) - 1)]
    for path, by_name in generate.items():
        cells = [_fmt(by_name[n]["ratio"]) for n in names[1:]]
        lines.append(f"| {path} | {by_name['vanilla']['seconds']:.3f} s | " + " | ".join(cells) + " |")
    return lines


def _clock(args):
    """The chosen clock; on CUDA it first waits for the queued kernels, so that each reading is a real time."""
    clock = CLOCKS[args.clock]
    if args.device != "cuda":
        return clock

    def synced() -> float:
        torch.cuda.synchronize()
        return clock()

    return synced


def _device_name(device: str) -> str:

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def _time_prefill(models: dict, variants: list[Variant], vocab: int, t: int, args, started: float) -> dict:
    """Median prefill seconds of each variant at batch 1, prompt length t, visiting variants round-robin.

    Each run gets a fresh cache, made before the clock starts: one cache alive at a time keeps memory low.
    """


    ids = torch.randint(0, vocab, (1, t), device=args.device)
    times: dict[str, list[float]] = {v.label: [] for v in variants}
    for r in range(args.warmup + args.repeats):
        for v in variants:
            if _is_kfold(v) and not args.warmup <= r < args.warmup + args.kfold_repeats:
                continue
            model = models[v.label]
            cache = model.new_cache(1, t)
            start = _clock(args)()
            prefill(model, ids, cache, mode=v.mode)
            if r >= args.warmup:
                times[v.label].append(_clock(args)() - start)
            del cache
        print(f"  prefill T={t}: repeat {r + 1}/{args.warmup + args.repeats} done "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    return {label: statistics.median(values) for label, values in times.items() if values}


def _decode_cache(model, batch: int, ctx: int, max_len: int):
    """A cache as after a prompt of ctx tokens (zeros: latency does not depend on the values), with a full
    hidden window, as in steady-state decoding."""


    cache = model.new_cache(batch, max_len)
    cache.lengths.fill_(ctx)
    cache.longest = ctx
    if cache.ring_slots:
        slots = torch.arange(cache.ring_slots, device=cache.slot_pos.device)
        cache.slot_pos[:, : cache.ring_slots] = ctx - 1 - hidden_token(slots, model.config.repeat_k)[0]
    return cache


def _time_decode(models: dict, variants: list[Variant], vocab: int, batch: int, args) -> dict:
    """Median seconds per decode step of each variant, round-robin, each run on a fresh cache."""


    ctx, steps = args.decode_context, args.decode_steps
    max_len = ctx + steps + 1
    limit = args.max_cache_gb * 2**30
    todo = [v for v in variants
            if PHDCache.for_config(models[v.label].config, batch, max_len, models[v.label].embed.weight.dtype,
                                   device="meta").allocated_nbytes <= limit]
    token = torch.randint(0, vocab, (batch,), device=args.device)
    times: dict[str, list[float]] = {v.label: [] for v in todo}
    for r in range(args.warmup + args.repeats):
        for v in todo:
            model = models[v.label]
            cache = _decode_cache(model, batch, ctx, max_len)
            # The linears as each path has them (untimed, like prefill): `default` as a fresh model's first decode
            # step leaves them (the rows kernel up to 8 rows), `decode` as `phd generate` prepares them.
            if v.plain or args.weights in ("row", "column"):
                plain_linears(model)
            elif args.weights == "default":
                kernel_linears(model)
            else:
                decode_linears(model, v.k * batch, kernel=args.weights == "decode")
            decode_step(model, token, cache, check=False)  # untimed: the first step on a fresh cache
            start = _clock(args)()
            for _ in range(steps):
                decode_step(model, token, cache, check=False)
            if r >= args.warmup:
                times[v.label].append((_clock(args)() - start) / steps)
            del cache
    if todo:  # the variants share their linears: one model restores them all
        plain_linears(models[todo[0].label])
    return {label: statistics.median(values) for label, values in times.items()}


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def _report(cfg, variants: list[Variant], args, scaling: dict[str, dict[int, float]], env: dict) -> dict:
    vanilla = variants[0]
    t_max = max(args.prompt_lens)

    def ratio(value, ref):
        return None if value is None or not ref else round(value / ref, 3)

    table = []
    for v in variants:
        table.append({
            "label": v.label, "variant": v.name, "k": v.k, "family": v.family, "prefill_mode": v.mode,
            "prefill_s": {str(t): v.prefill.get(t) for t in args.prompt_lens},
            "prefill_ratio": {str(t): ratio(v.prefill.get(t), vanilla.prefill.get(t)) for t in args.prompt_lens},
            "decode_s_per_token": {str(b): v.decode.get(b) for b in args.batches},
            "decode_ratio": {str(b): ratio(v.decode.get(b), vanilla.decode.get(b)) for b in args.batches},
            "cache_bytes": v.cache_bytes, "cache_ratio": ratio(v.cache_bytes, vanilla.cache_bytes),
            "hidden_token_share": round(v.hidden_share, 4),
        })
    itemsize = 2 if args.dtype == "bfloat16" else 4
    window_bytes = {
        v.label: cfg.n_layers * 2 * (v.k - 1) * args.window * cfg.n_kv_heads * cfg.head_dim * itemsize
        for v in variants if v.family in ("PHD-SWA", "PHD-SWA full", "PHD-CSWA") or (v.plain and v.k > 1)
    }
    exact = all(
        v.cache_bytes == vanilla.cache_bytes * (v.k if v.family == "repeat" else 1) + window_bytes.get(v.label, 0)
        for v in variants
    )
    goals = []
    for family, goal_name in (("PHD", "PHD prefill"), ("PHD-CSWA", "PHD-CSWA prefill"),
                              ("PHD-SWA", "PHD-SWA bounded prefill")):
        for row in table:
            r = row["prefill_ratio"][str(t_max)]
            if row["family"] == family and r is not None:
                goals.append({"goal": f"{goal_name} <= {GOALS[goal_name]}x at T={t_max}", "variant": row["label"],
                              "measured": r, "met": r <= GOALS[goal_name],
                              "hidden_token_share": row["hidden_token_share"]})
    for row in table:
        if row["k"] == 4 and row["family"] in ("PHD", "PHD-SWA", "PHD-CSWA"):
            for b in args.batches:
                r = row["decode_ratio"][str(b)]
                if r is not None:
                    goals.append({"goal": f"decode K=4 <= {GOALS['decode K=4']}x, batch {b}", "variant": row["label"],
                                  "measured": r, "met": r <= GOALS["decode K=4"],
                                  "matmul_ratio": round(_used(scaling, args.weights, 4 * b)
                                                        / _used(scaling, args.weights, b), 2)})
    goals.append({"goal": "cache bytes exactly vanilla + L*2*(K-1)*W*kv_heads*head_dim (naive: K x vanilla)",
                  "variant": "all", "measured": exact, "met": exact})
    return {
        "model": {"preset": args.preset, **{k: getattr(cfg, k) for k in
                  ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size")}},
        "window": args.window, "chunk": args.chunk, "prompt_lens": args.prompt_lens, "batches": args.batches,
        "vanilla": {"prefill_s": {str(t): vanilla.prefill.get(t) for t in args.prompt_lens},
                    "decode_s_per_token": {str(b): vanilla.decode.get(b) for b in args.batches},
                    "cache_bytes": vanilla.cache_bytes},
        "rows": table, "goals": goals,
        "matmul_seconds": {layout: {str(m): s for m, s in by_rows.items()} for layout, by_rows in scaling.items()},
        "environment": env,
    }


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _markdown(report: dict, plots: list[str]) -> str:
    lens, batches, env = report["prompt_lens"], report["batches"], report["environment"]
    van = report["vanilla"]
    lines = [
        "# Inference benchmark: prefill, decode latency and KV cache vs vanilla",
        "",
        f"Model `{report['model']['preset']}` ({env['params'] / 1e6:.0f}M parameters: {report['model']['n_layers']} "
        f"layers, d {report['model']['d_model']}), {env['dtype']} on {env.get('device', 'cpu')}, "
        f"W = {report['window']}, C = {report['chunk']}. "
        f"{env['clock']} clock, torch {env['torch']}, {env['threads']} threads on {env['cores']} cores "
        f"({env['cpu']}); load average "
        f"{env['load_before'][0]} before, {env['load_after'][0]} after; {env['seconds']:.0f} s.",
        "Written by `phd bench inference`; every figure a ratio to vanilla measured in the same run (medians of "
        f"{env['repeats']} repeats after {env['warmup']} warmup; K-fold prefills: {env['kfold_repeats']} run). "
        "Prefill at batch 1; decode per token with "
        f"{env['decode_context']} tokens in the cache. `-`: not measured (a K-fold prefill above "
        "--max-prefill-tokens, a cache above --max-cache-gb, or full-prefill rows, whose decode is the bounded "
        "row's).",
        "",
        "Vanilla: " + ", ".join(f"prefill T={t}: {van['prefill_s'][str(t)]:.3f} s" for t in lens
                                if van["prefill_s"][str(t)] is not None)
        + ", " + ", ".join(f"decode batch {b}: {1000 * van['decode_s_per_token'][str(b)]:.1f} ms/token"
                           for b in batches if van["decode_s_per_token"][str(b)] is not None)
        + f", cache {van['cache_bytes'] / 2**20:.1f} MiB at T={max(lens)}.",
        "",
        "| variant | " + " | ".join(f"prefill T={t}" for t in lens) + " | "
        + " | ".join(f"decode b={b}" for b in batches) + " | cache | hidden share |",
        "|---|" + "---|" * (len(lens) + len(batches) + 2),
    ]
    for row in report["rows"]:
        cells = [_fmt(row["prefill_ratio"][str(t)]) for t in lens] + [_fmt(row["decode_ratio"][str(b)])
                                                                     for b in batches]
        lines.append(f"| {row['label']} | " + " | ".join(cells)
                     + f" | {row['cache_ratio']:.3f}x | {row['hidden_token_share']:.3f} |")
    lines += [
        "",
        "*hidden share*: extra token-layers the prefill computes at the longest prompt, as a share of vanilla's "
        "T x L (K-1 for naive repetition and the full prefill; the bounded ones compute only what the future "
        "reads).",
        "",
        "## Goals",
        "",
        "| goal | variant | measured | met |",
        "|---|---|---|---|",
    ]
    for g in report["goals"]:
        measured = g["measured"] if isinstance(g["measured"], bool) else f"{g['measured']:.2f}x"
        lines.append(f"| {g['goal']} | {g['variant']} | {measured} | {'yes' if g['met'] else 'no'} |")
    m = report["matmul_seconds"]
    bound = report.get("memory_bound")
    if bound:
        lines += ["", "## The memory bound", "",
                  f"A decode step reads every weight at least once: {bound['weight_bytes'] / 2**20:.0f} MiB, "
                  f"{1e3 * bound['seconds']:.1f} ms at the {bound['read_bytes_per_s'] / 1e9:.1f} GB/s one pass "
                  "over a 512 MiB buffer reads here (same threads). Decode time per step as a multiple of that "
                  "bound:", "",
                  "| variant | " + " | ".join(f"decode b={b}" for b in batches) + " |",
                  "|---|" + "---|" * len(batches)]
        for row in report["rows"]:
            if row["family"] == "PHD-SWA full":
                continue
            cells = [_fmt(None if row["decode_s_per_token"][str(b)] is None
                          else row["decode_s_per_token"][str(b)] / bound["seconds"]) for b in batches]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Measured reasons, where a goal is missed:",
        "- Prefill: on a CPU the work is compute-bound and grows with the tokens computed; a bounded prefill "
        "adds its *hidden share* of vanilla's token-layers (plus their attention over the whole prompt).",
        "- Decode: K copies turn each matmul of B rows into one of K*B rows. On a GPU decoding is memory-bound "
        "and extra rows are nearly free; on this CPU a d_model x d_ff linear takes "
        + "; ".join(f"{LAYOUTS[layout]}: " + ", ".join(f"{1e3 * s:.3g} ms at {r} rows" for r, s in by.items())
                    for layout, by in m.items())
        + f" (this run: {LAYOUTS.get(env.get('weights', 'row'), 'decode_linears')}"
        + (", one row plain" if env.get("weights") == "packed" else "")
        + (": the rows kernel up to 8 rows, MKL's packs beyond" if env.get("weights") == "decode" else "")
        + (": the rows kernel up to 8 rows, nn.Linear's own beyond" if env.get("weights") == "default" else "")
        + "; column *matmul_ratio* in inference.json: time at 4B rows / time at B rows).",
    ]
    lines += _generate_markdown(report.get("generate") or {})
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _plots(report: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'phd[plot]')")
        return []
    families = ["repeat", "PHD", "PHD-SWA", "PHD-SWA full", "PHD-CSWA"]
    names = {"repeat": "naive repetition", "PHD": "PHD", "PHD-SWA": "PHD-SWA (bounded prefill)",
             "PHD-SWA full": "PHD-SWA (full prefill)", "PHD-CSWA": "PHD-CSWA"}

    def series(family, key, sub):
        pts = [(r["k"], r[key][sub]) for r in report["rows"] if r["family"] == family and r[key][sub] is not None]
        return [1] + [k for k, _ in pts], [1.0] + [y for _, y in pts]

    files = []
    for key, title, subs, fname, fams in (
        ("prefill_ratio", "Prefill time / vanilla (Fig. 1c, 9)", report["prompt_lens"], "inference_prefill.png",
         families),
        ("decode_ratio", "Decode latency per token / vanilla (Fig. 1d, 9)", report["batches"],
         "inference_decode.png", [f for f in families if f != "PHD-SWA full"]),
    ):
        fig, axes = plt.subplots(1, len(subs), figsize=(5.5 * len(subs), 4), squeeze=False)
        for ax, sub in zip(axes[0], subs, strict=True):
            for fam in fams:
                xs, ys = series(fam, key, str(sub))
                if len(xs) > 1:
                    label = names[fam] if key == "prefill_ratio" else names[fam].replace(" (bounded prefill)", "")
                    ax.plot(xs, ys, marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xlabel("K (copies per token)")
            ax.set_title(f"{'T' if key == 'prefill_ratio' else 'batch'} = {sub}")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(title)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files.append(fname)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for fam in ("repeat", "PHD", "PHD-SWA", "PHD-CSWA"):
        pts = [(r["k"], r["cache_ratio"]) for r in report["rows"] if r["family"] == fam]
        ax.plot([1] + [k for k, _ in pts], [1.0] + [y for _, y in pts], marker="o",
                label=names[fam].replace(" (bounded prefill)", ""))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("K (copies per token)")
    ax.set_ylabel(f"KV cache bytes / vanilla (T = {max(report['prompt_lens'])})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "inference_cache.png", dpi=110)
    plt.close(fig)
    return files + ["inference_cache.png"]
