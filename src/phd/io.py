"""The model folder: config.json + model.safetensors (+ tokenizer.json) in one directory.

This is what inference, conversion and evaluation read; `phd train` writes one at the end of training (its
model/ folder) and `phd export` consolidates a training checkpoint (sharded, with optimizer state) into one.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from .config import SHAPE_FIELDS, ConfigError, PHDConfig
from .data.tokenizer import EOS_CANDIDATES
from .errors import PHDError
from .fsutil import WriteError, atomic_file, output_dir, reporting_write_errors, sha256_file, write_error
from .hfnames import RENAMED
from .model import PHDTransformer

MODEL_KIND = "phd-export"  # the fsutil marker of a model folder (on disk: kept as written)
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
SPECIAL_TOKENS = "special_tokens.json"  # {"eos_id": E}: the document separator the model was trained with
GENERATION_CONFIG = "generation_config.json"  # transformers' generation defaults, kept from a converted source
RECORDED_CONFIG = "phd_config"  # safetensors metadata: the config (JSON) the weights were written with
# The fields that change what the weights compute: config.json must agree with the weights' recorded config on
# each (an edited repeat_k or chunk once loaded as another variant without a word). max_seq_len (a longer context),
# attn_backend (how attention is computed, not what) and init_std (unused once trained) may be edited.
RECORDED_FIELDS = (*SHAPE_FIELDS, "rope_theta", "norm_eps")


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
    """The model folder's files (weights, config, checksums, tokenizer) into an existing folder; finite weights only.
    A full disk is one line naming the file (WriteError), not safetensors' or the OS's traceback."""

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    check_finite(state, f"the {model.config.name} model to export")
    try:
        save_file(state, folder / WEIGHTS, metadata=weights_metadata(model.config))
    except SafetensorError as err:  # safetensors wraps the OS error (ENOSPC...) in its own type
        raise _os_error_of(err, folder / WEIGHTS) or err from None
    with reporting_write_errors(folder):
        _write_side_files(model.config, folder, tokenizer)


def weights_metadata(config: PHDConfig) -> dict[str, str]:
    """The safetensors metadata of phd's weights: the variant and the whole config they were written with, so that
    loading can refuse a config.json edited afterwards (check_recorded_config)."""
    return {"format": "pt", "variant": config.name, RECORDED_CONFIG: json.dumps(config.to_dict(), sort_keys=True)}


def record_config(folder: str | Path, config: PHDConfig) -> None:
    """Add weights_metadata(config) to every safetensors file of a folder written by another library
    (transformers' save_pretrained writes only {"format": "pt"}), so phd-hf folders are checked like native ones."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        _set_metadata(file, weights_metadata(config))


def _set_metadata(file: Path, extra: dict[str, str]) -> None:
    """Rewrite the header of a safetensors file with `extra` added to its metadata, through a temporary file renamed
    over it; the tensor bytes are copied unchanged (their offsets count from the end of the header)."""
    with open(file, "rb") as src, atomic_file(file, "wb") as dst:
        header = json.loads(src.read(int.from_bytes(src.read(8), "little")))
        header["__metadata__"] = {**header.get("__metadata__", {}), **extra}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned
        dst.write(len(text).to_bytes(8, "little") + text)
        shutil.copyfileobj(src, dst, 1 << 24)


def check_recorded_config(weights: Path, config: PHDConfig, config_file: Path, hf_names: bool = False) -> None:
    """Refuse a config.json that contradicts the config recorded in its weights' metadata (RECORDED_FIELDS): the
    model would load, and generate, as another variant. Weights without a record (older or foreign files) pass.
    `hf_names`: name the fields as a PHDForCausalLM config.json spells them."""
    recorded, variant = _recorded_config(weights)
    theirs = {native: hf for hf, native in RENAMED.items()} if hf_names else {}
    for name, value in recorded.items():
        if name in RECORDED_FIELDS and getattr(config, name) != value:
            field, now, was = theirs.get(name, name), json.dumps(getattr(config, name)), json.dumps(value)
            raise CheckpointError(  # values as config.json spells them (null, true, "shared")
                f"{config_file} sets {field}={now}, but {weights.name} was written as {variant} with {field}={was}: "
                f"config.json was edited or belongs to another model; set {field} back to {was} (or use the "
                "config.json written with these weights)"
            )


def check_saved_weights(folder: str | Path | None) -> None:
    """check_recorded_config of a local folder's config.json (phd's, native or PHDForCausalLM) against each of its
    safetensors files, before `from_pretrained` loads it. Anything else passes: a hub id, no folder, a config.json
    that is not phd's, and a config the caller passes itself (an explicit choice, not an edited file)."""
    file = None if folder is None else Path(folder) / CONFIG
    if file is None or not file.is_file():
        return
    try:
        fields = json.loads(file.read_text())
    except (OSError, ValueError):
        return  # transformers says what is wrong with it
    if not isinstance(fields, dict) or "repeat_k" not in fields:
        return
    config, prefix = _read_config(file)
    for weights in sorted(file.parent.glob("*.safetensors")):
        check_recorded_config(weights, config, file, hf_names=bool(prefix))


def _recorded_config(weights: Path) -> tuple[dict[str, Any], str]:
    """(fields, variant name) the weights were written with, from their safetensors metadata: the whole config, or
    for exports written before it was recorded, the variant fields of the recorded name; ({}, "") without either."""
    try:
        with safe_open(weights, "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights} cannot be read ({err}): corrupted or truncated") from None
    variant = metadata.get("variant", "")
    try:
        if RECORDED_CONFIG in metadata:
            fields = json.loads(metadata[RECORDED_CONFIG])
            if not isinstance(fields, dict):
                raise ValueError("not a JSON object")
            return fields, fields.get("variant", variant)
        return (PHDConfig.parse_name(variant), variant) if variant else ({}, "")
    except (ValueError, ConfigError) as err:
        raise CheckpointError(f"{weights}: the recorded config cannot be read ({err}); re-export the model") from None


def _os_error_of(err: SafetensorError, path: Path) -> WriteError | None:
    """The WriteError of a SafetensorError that wraps an OS error ("I/O error: No space left on device (os error
    28) at path ..."); None for any other (a bug, whose traceback is wanted)."""
    match = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(err))
    if match is None:
        return None
    return write_error(path, OSError(int(match[2]), match[1]))


def _write_side_files(config: PHDConfig, folder: Path, tokenizer: str | Path | None) -> None:
    """config.json, the tokenizer with its eos id, and the weights' checksum."""
    config.save(folder / CONFIG)
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
    check_recorded_config(root / WEIGHTS, config, root / CONFIG, hf_names=bool(prefix))
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
    try:
        if is_transformers_config(fields):
            return config_from_transformers_fields(fields), "model."
        return PHDConfig.load(file), ""
    except ConfigError as err:  # an impossible config (window > max_seq_len...): say which file holds it
        if str(file) in str(err):
            raise
        raise ConfigError(f"{file}: {err}") from None


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

