"""The model folder: config.json + model.safetensors (+ tokenizer.json) in one directory.

This is what inference, conversion and evaluation read; `phd train` writes one at the end of training (its
model/ folder) and `phd export` consolidates a training checkpoint (sharded, with optimizer state) into one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from .config import PHDConfig
from .data.tokenizer import EOS_CANDIDATES
from .errors import PHDError
from .fsutil import output_dir, sha256_file
from .model import PHDTransformer

MODEL_KIND = "phd-export"  # the fsutil marker of a model folder (on disk: kept as written)
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
SPECIAL_TOKENS = "special_tokens.json"  # {"eos_id": E}: the document separator the model was trained with
GENERATION_CONFIG = "generation_config.json"  # transformers' generation defaults, kept from a converted source


class CheckpointError(PHDError, RuntimeError):
    """A checkpoint is missing, truncated or corrupted; the message names the file."""


def save_model(
    model: PHDTransformer, out_dir: str | Path, tokenizer: str | Path | None = None, overwrite: bool = False,
    sources: Iterable[Path] = (),
) -> Path:
    """Write a model folder atomically under phd's output rule (fsutil): refused over a folder phd did not write,
    replaced only with `overwrite`, never into or over one of `sources`."""
    out_dir = Path(out_dir)
    with output_dir(out_dir, MODEL_KIND, overwrite, sources) as tmp:
        write_model_files(model, tmp, tokenizer)
    return out_dir


def write_model_files(model: PHDTransformer, folder: Path, tokenizer: str | Path | None = None) -> None:
    """The model folder's files (weights, config, checksums, tokenizer) into an existing folder; finite weights only."""

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    check_finite(state, f"the {model.config.name} model to export")
    save_file(state, folder / WEIGHTS, metadata={"format": "pt", "variant": model.config.name})
    model.config.save(folder / CONFIG)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, folder / TOKENIZER)
        eos = eos_id(Path(tokenizer).parent)
        if eos is not None:
            (folder / SPECIAL_TOKENS).write_text(json.dumps({"eos_id": eos}) + "\n")
    (folder / "checksums.json").write_text(json.dumps({WEIGHTS: sha256_file(folder / WEIGHTS)}, indent=2) + "\n")


def check_finite(state: Mapping[str, torch.Tensor], where: str | Path) -> None:
    """Refuse weights holding NaN or inf (they would train, generate or export garbage without a word)."""
    bad = [name for name, value in state.items() if value.is_floating_point() and not bool(value.isfinite().all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(f"{where} holds NaN or inf weights in {shown}; use another checkpoint")


def model_dir(path: str | Path) -> Path:
    """A model folder, or a training run directory holding one under `model/`."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / WEIGHTS).exists() and (candidate / CONFIG).exists():
            return candidate
    raise CheckpointError(
        f"{path} holds no exported model ({CONFIG} + {WEIGHTS}); point to a directory written by "
        "`phd train` (its model/ folder) or `phd export`"
    )


def is_phd_model(path: str | Path) -> bool:
    """Whether `path` (or its run directory's model/) holds a phd model: native, or PHDForCausalLM (`--to phd-hf`)."""
    try:
        root = model_dir(path)
    except CheckpointError:
        return False
    return "repeat_k" in json.loads((root / CONFIG).read_text())


def load_model(path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> PHDTransformer:
    """Rebuild the model from its config and load the weights (checksums verified when present)."""

    root = model_dir(path)
    config, prefix = _read_config(root / CONFIG)
    sums = root / "checksums.json"
    if verify and sums.exists():
        expected = json.loads(sums.read_text()).get(WEIGHTS)
        if expected and sha256_file(root / WEIGHTS) != expected:
            raise CheckpointError(f"{root / WEIGHTS} does not match its checksum: the file is corrupted or truncated")
    try:
        state = load_file(root / WEIGHTS, device=str(device))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{root / WEIGHTS} cannot be read ({err}): corrupted or truncated") from None
    check_finite(state, root / WEIGHTS)
    with torch.device("meta"):
        model = PHDTransformer(config)
    model = model.to_empty(device=device)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    missing, unexpected = model.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()}, strict=False)
    missing = [m for m in missing if not (config.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"{root / WEIGHTS} does not fit {config.name}: missing {missing}, unexpected {unexpected}"
        )
    return model.eval()


def _read_config(file: Path) -> tuple[PHDConfig, str]:
    """The native config of an export, or of a PHDForCausalLM folder (`--to phd-hf`, weights under `model.`)."""
    from .hfnames import config_from_transformers_fields, is_transformers_config

    try:
        fields = json.loads(file.read_text())
    except (OSError, ValueError):
        fields = {}  # PHDConfig.load says what is wrong
    if is_transformers_config(fields):
        return config_from_transformers_fields(fields), "model."
    return PHDConfig.load(file), ""


def generation_eos_ids(folder: str | Path) -> list[int] | None:
    """The eos ids of a model folder's generation_config.json (all of them: a chat model stops at its turn end as
    well as at end-of-text), the tokens transformers' generate() stops at; None when the folder names none."""
    file = Path(folder) / GENERATION_CONFIG
    if not file.exists():
        return None
    try:
        value = json.loads(file.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{file} cannot be read as a JSON object ({err}); fix or delete it") from None
    ids = [value] if isinstance(value, int) else value
    if value is None or ids == []:
        return None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise CheckpointError(f"{file}: eos_token_id must be a token id or a list of ids, not {value!r}; fix it")
    return ids


def load_tokenizer(path: str | Path):
    """The `tokenizers.Tokenizer` saved beside an export (or a data directory)."""

    path = Path(path)
    file = path if path.suffix == ".json" else path / TOKENIZER
    if not file.exists() and (path / "model" / TOKENIZER).exists():
        file = path / "model" / TOKENIZER
    if not file.exists():
        raise CheckpointError(f"no {TOKENIZER} at {path}; pass --tokenizer or export the model with its tokenizer")
    return Tokenizer.from_file(str(file))


def eos_id(folder: str | Path) -> int | None:
    """The end-of-text id of the tokenizer in a model, checkpoint or data folder: the one recorded there
    (special_tokens.json of a model folder, meta.json of a data folder), else, for folders written before it was
    recorded, the first usual spelling in tokenizer.json's vocabulary (the rule `phd data` applies to a tokenizer
    that names none). None when the folder has neither."""
    folder = Path(folder)
    for name in (SPECIAL_TOKENS, "meta.json"):
        try:
            value = json.loads((folder / name).read_text()).get("eos_id")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int):
            return value
    if not (folder / TOKENIZER).exists():
        return None
    vocab = load_tokenizer(folder).get_vocab()
    return next((vocab[t] for t in EOS_CANDIDATES if t in vocab), None)

