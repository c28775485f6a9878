"""`phd data`: text files, folders, JSON Lines or Hugging Face datasets -> a tokenizer and token shards."""

from __future__ import annotations

import argparse
import time

from ..data.build import build_shards
from ..data.corpus import default_corpus
from ..data.sources import TextFile, resolve_input
from ..data.tokenizer import EOS, load_tokenizer


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "data",
        help="tokenize text into train/val token shards",
        description="Train a byte-level BPE (or load a tokenizer) and write train.bin / val.bin / meta.json / "
        "tokenizer.json to --out. With no input, uses the default English corpus.",
    )
    parser.add_argument(
        "inputs", nargs="*", metavar="INPUT",
        help="text/Markdown files, *.jsonl, folders, saved Hugging Face datasets, or hf:NAME (hub)",
    )
    parser.add_argument("--out", required=True, help="data directory to write (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it holds phd data already")
    parser.add_argument("--default-corpus", action="store_true", help="add the default English corpus to the inputs")
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary to train (default 8192)")
    parser.add_argument(
        "--special-token", action="append", default=[], metavar="TOKEN",
        help="extra special token for the trained tokenizer (repeatable); <|endoftext|> is always id 0",
    )
    parser.add_argument("--tokenizer", help="use this tokenizer.json or tokenizer directory instead of training")
    parser.add_argument("--eos-token", help="document separator of --tokenizer (default: the one it declares)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="held-out tail of every input (0.05)")
    parser.add_argument("--max-chars", type=int, help="read at most this many characters of every input")
    parser.add_argument("--text-field", default="text", help='JSON Lines / dataset field with the text ("text")')
    parser.add_argument("--hf-split", default="train", help="dataset split to read (train)")
    parser.add_argument("--hf-config", help="dataset configuration name for hf:NAME")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sources = [
        resolve_input(spec, args.text_field, args.hf_split, args.hf_config) for spec in args.inputs
    ]
    if args.default_corpus or not args.inputs:
        corpus = default_corpus()
        sources += [TextFile(path) for path in corpus.files]
    tokenizer = load_tokenizer(args.tokenizer, args.eos_token) if args.tokenizer else None
    start = time.perf_counter()
    meta = build_shards(
        sources,
        args.out,
        tokenizer=tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        max_chars=args.max_chars,
        special_tokens=(EOS, *args.special_token),
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    print(summary(meta, args.out, time.perf_counter() - start))
    if tokenizer is None and meta["vocab_size"] < args.vocab_size:
        print(f"note: the text supports only {meta['vocab_size']} tokens (asked {args.vocab_size}); "
              f"set the model's vocab_size to {meta['vocab_size']}")
    return 0


def summary(meta: dict, out: str, seconds: float) -> str:
    """The table printed after a build: documents, tokens and bytes per token of each split."""
    rows = [f"{'split':<6} {'documents':>10} {'tokens':>14} {'bytes':>14} {'bytes/token':>12}"]
    for split, counts in meta["splits"].items():
        per_token = counts["bytes"] / counts["tokens"] if counts["tokens"] else 0.0
        rows.append(
            f"{split:<6} {counts['documents']:>10,} {counts['tokens']:>14,} {counts['bytes']:>14,} {per_token:>12.2f}"
        )
    return "\n".join(
        [
            f"wrote {out}: {len(meta['sources'])} source(s), vocab {meta['vocab_size']:,} ({meta['dtype']}), "
            f"eos {meta['eos_token']!r} = {meta['eos_id']}, {seconds:.1f} s",
            f"tokenizer: {meta['tokenizer']}",
            *rows,
        ]
    )
