"""`phd convert SRC OUT`: transformers / GGUF checkpoints to PHD models and back.

transformers (the `hf` extra) is imported only when a conversion runs, so that `phd` lists its commands without it.

    phd convert ./llama-dir  out/       --variant PHD-CSWA-2-16-32   # a model folder (config + safetensors + tokenizer)
    phd convert model.gguf   out/       --check                      # K = 1, compare logits with the original
    phd convert out/         llama-dir/ --to hf                      # a K = 1 model back to Llama / OLMo2
    phd convert out/         phd-hf/    --to phd-hf                  # any model as PHDForCausalLM (model_type phd)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import PHDConfig
from ..errors import PHDError
from ..fsutil import check_out, output_dir
from ..hfnames import is_transformers_config
from ..io import (
    GENERATION_CONFIG,
    MODEL_KIND,
    check_finite,
    eos_id,
    is_phd_model,
    load_model,
    model_dir,
    write_model_files,
)

if TYPE_CHECKING:
    from transformers import GenerationConfig

TARGETS = ("phd", "hf", "phd-hf")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert transformers Llama/OLMo2 (directory or GGUF) to a PHD model, and back",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", type=Path, help="transformers directory, .gguf file, or phd model folder")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--to", choices=TARGETS, default=None,
                   help="phd: native model folder (default from transformers/GGUF); hf: LlamaForCausalLM / "
                        "Olmo2ForCausalLM (K = 1; default from a phd model); phd-hf: PHDForCausalLM save_pretrained")
    p.add_argument("--variant", default="vanilla",
                   help="PHD variant of the converted model, e.g. PHD-CSWA-2-16-32 (default: vanilla, K = 1)")
    p.add_argument("--positions", choices=("shared", "expanded"), default="shared",
                   help="RoPE positions of the copies (spec section 4); 'shared' keeps the checkpoint's positions")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT when it holds a conversion of the same kind already (never anything else)")
    p.add_argument("--check", action="store_true",
                   help="compare the logits of the converted model with the source on a sample (K = 1 only)")
    p.set_defaults(func=run)


def _is_phd_hf(path: Path) -> bool:
    """A PHDForCausalLM folder (`--to phd-hf`), as opposed to a native model folder."""
    return is_transformers_config(json.loads((model_dir(path) / "config.json").read_text()))


def _special_tokens(tokenizer) -> dict[str, int | None]:
    if tokenizer is None:
        return {}
    return {name: getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


# The output-folder kind (fsutil.MARKER) each target writes; --overwrite replaces only the same kind.
KINDS = {"phd": MODEL_KIND, "hf": "hf-model", "phd-hf": "phd-hf-model"}


def run(args: argparse.Namespace) -> int:
    try:
        return _convert(args)
    except PHDError as err:  # ConversionError, ConfigError, OutputError, CheckpointError: bad input
        raise SystemExit(f"phd convert: {err}") from None


def _convert(args: argparse.Namespace) -> int:
    from ..hf import PHDForCausalLM  # the `hf` extra (transformers): imported when a conversion runs
    from ..hf.convert import from_transformers, load_transformers, to_transformers

    source: Path = args.source
    from_phd = source.is_dir() and is_phd_model(source)
    target = args.to or ("hf" if from_phd else "phd")
    kind, out = KINDS[target], args.out
    check_out(out, kind, args.overwrite, [source])  # before loading anything
    sample = torch.arange(64).remainder(97)[None] + 3

    if from_phd:
        from_phd_hf = _is_phd_hf(source)
        if target == "phd" and not from_phd_hf:
            raise SystemExit(f"{source} is already a phd model folder; choose --to hf or --to phd-hf")
        model = load_model(source)
        tokenizer = _load_tokenizer(source)
        generation = _generation_config(model_dir(source))
        if target == "phd":  # a PHDForCausalLM folder back to the native export
            with output_dir(out, kind, args.overwrite, [source]) as tmp:
                write_model_files(model, tmp)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
                if generation is not None:
                    generation.save_pretrained(tmp)
            print(f"wrote {args.out} (phd, {model.config.name})")
            return 0
        if target == "hf":
            hf_model = to_transformers(model, **_special_tokens(tokenizer))
        else:
            hf_model = PHDForCausalLM.from_native(model, **_special_tokens(tokenizer))
        if generation is not None:
            hf_model.generation_config = generation
        with output_dir(out, kind, args.overwrite, [source]) as tmp:
            hf_model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        print(f"wrote {args.out} ({type(hf_model).__name__}, {model.config.name})")
        if args.check:
            with torch.no_grad():
                ids = sample.remainder(model.config.vocab_size)
                print(f"max |logit difference| = {_max_diff(model(ids).logits, hf_model(ids).logits):.3g}")
        return 0

    if target == "hf":
        raise SystemExit(f"{source} is a transformers checkpoint already; choose --to phd or --to phd-hf")
    variant = PHDConfig.parse_name(args.variant)
    hf_model, tokenizer = load_transformers(source)
    generation = _generation_config(source if source.is_dir() else None)
    model = from_transformers(hf_model, positions=args.positions, **variant)
    check_finite(model.state_dict(), source)
    with output_dir(out, kind, args.overwrite, [source]) as tmp:
        if target == "phd":
            write_model_files(model, tmp)
            if generation is not None:
                generation.save_pretrained(tmp)
        else:
            phd_hf = PHDForCausalLM.from_native(model, **_special_tokens(tokenizer))
            if generation is not None:
                phd_hf.generation_config = generation
            phd_hf.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    print(f"wrote {args.out} ({target}, {model.config.name}, {model.num_params() / 1e6:.1f}M parameters)")
    if args.check:
        if model.config.repeat_k != 1:
            raise SystemExit("--check compares logits with the source, which only a K = 1 conversion reproduces")
        ids = sample.remainder(model.config.vocab_size)
        with torch.no_grad():
            diff = _max_diff(hf_model(ids).logits, model(ids).logits)
        print(f"max |logit difference| vs the source on {ids.shape[1]} tokens = {diff:.3g}")
    return 0


def _generation_config(folder: Path | None) -> GenerationConfig | None:
    """The source's own generation_config.json as a transformers GenerationConfig (eos ids of a chat model, sampling
    defaults), or None when it has none: save_pretrained would otherwise write a fresh default that stops at the
    wrong token."""
    if folder is None or not (folder / GENERATION_CONFIG).is_file():
        return None
    from transformers import GenerationConfig  # the `hf` extra

    from ..hf.convert import ConversionError

    try:
        return GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConversionError(f"{folder / GENERATION_CONFIG} cannot be read ({first}); fix or delete it") from None


def _load_tokenizer(path: Path):
    """The transformers tokenizer saved beside a model folder, or None when there is none."""
    if not (path / "tokenizer.json").exists():
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # the `hf` extra

    if (path / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(path)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    eos = eos_id(path)
    if eos is not None:  # a bare tokenizer.json names none: the transformers config then gets the recorded one
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    return tokenizer
