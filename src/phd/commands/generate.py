"""`phd generate --checkpoint DIR --prompt "..."`: stream a continuation to the terminal, report tokens/s."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

from ..checks import resolve_device
from ..errors import InputError, PHDError
from ..inference.generate import generate_stream
from ..inference.sampling import SamplingConfig
from ..inference.weights import decode_linears, plain_linears
from ..io import eos_id, generation_eos_ids, load_model, load_tokenizer, model_dir
from .argtypes import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from an exported model, streamed to the terminal")
    p.add_argument("--checkpoint", required=True, help="export dir (config.json + model.safetensors), or a run dir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text, encoded with the checkpoint's tokenizer.json")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids (bypasses the tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one beside the checkpoint)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95; 1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=None,
                   help="stop token (text of one token, or #ID); repeatable; default: the eos ids of the model's "
                        "generation_config.json (as transformers), else the tokenizer's end-of-text")
    p.add_argument("--prefill", choices=("bounded", "full"), default="bounded",
                   help="bounded (default): hidden tokens only where needed; full: the paper's K-fold prefill")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster for small models on a busy machine)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--plain-linears", action="store_true",
                   help="decode with nn.Linear's own CPU kernels; by default the K rows of a decode step go to "
                        "phd's rows kernel (K <= 8, compiled once) or to weights packed by MKL for K rows")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.set_defaults(func=run)


def _stop_ids(tokenizer, stops: list[str] | None, eos: int | None,
              generation_eos: list[int] | None = None) -> list[int]:
    """--stop tokens; by default every eos id of the model's generation_config.json (what transformers' generate()
    stops at: a chat model's turn end too), else the tokenizer's end-of-text id (`phd.io.eos_id`) when text is
    decoded."""
    if stops is None:
        if generation_eos:
            return list(generation_eos)
        return [eos] if tokenizer is not None and eos is not None else []
    ids = []
    for stop in stops:
        if stop.startswith("#") and stop[1:].isdigit():
            ids.append(int(stop[1:]))
            continue
        token_id = tokenizer.token_to_id(stop) if tokenizer is not None else None
        if token_id is None:
            raise InputError(f"--stop {stop!r} is not a single token of the tokenizer; give it as #ID")
        ids.append(token_id)
    return ids


def _folder(path: Path) -> Path:
    return path.parent if path.suffix == ".json" else path


class _TextStream:
    """Prints the decoded continuation as it grows (decoding the whole tail keeps multi-byte characters whole)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.shown = tokenizer, [], 0

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        if self.tokenizer is None:
            sys.stdout.write(f"{token_id} ")
        else:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                return
            sys.stdout.write(text[self.shown :])
            self.shown = len(text)
        sys.stdout.flush()


def _warning_line(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    """A warning (e.g. phd.checks.LengthWarning) as one stderr line beside the command's own report."""
    print(f"[warning: {message}]", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = load_model(args.checkpoint, device=resolve_device(args.device)).to(getattr(torch, args.dtype))
        tokenizer, eos = None, None
        if args.prompt is not None or args.tokenizer:
            source = args.tokenizer or model_dir(args.checkpoint)
            tokenizer, eos = load_tokenizer(source), eos_id(_folder(Path(source)))
        stops = _stop_ids(tokenizer, args.stop, eos, generation_eos_ids(model_dir(args.checkpoint)))
        if args.prompt is not None:
            ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
        else:
            try:
                ids = [int(x) for x in args.prompt_ids.replace(" ", "").split(",") if x]
            except ValueError:
                raise InputError(f"--prompt-ids {args.prompt_ids!r} must be comma-separated integers") from None
        if not ids:
            raise InputError("the prompt is empty (it encodes to no tokens); give some text")
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
        max_new = args.max_new_tokens  # past max_seq_len: generated, with a warning line (phd.checks)
        if args.plain_linears:
            plain_linears(model)  # also keeps decode steps from giving it the rows kernel
        else:
            decode_linears(model, model.config.repeat_k)  # decode's rows: K copies of one sequence
        stream = generate_stream(
            model, torch.tensor([ids]), max_new, sampling, stops,
            seed=args.seed, prefill_mode=args.prefill,
        )
        out = _TextStream(tokenizer)
        start = time.perf_counter()
        first = None
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line
            for token in stream:
                first = first or time.perf_counter()
                out.add(int(token[0]))
        end = time.perf_counter()
    except PHDError as err:  # bad model, prompt or sampling options: exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    n = len(out.ids)
    print(file=sys.stdout)
    if n:
        decode = f", then {(n - 1) / (end - first):.1f} tokens/s" if n > 1 and end > first else ""
        print(
            f"[{model.config.name}: {len(ids)} prompt tokens, {n} new tokens in {end - start:.2f} s "
            f"({n / (end - start):.1f} tokens/s overall; first token {1000 * (first - start):.0f} ms{decode})]",
            file=sys.stderr,
        )
    return 0
