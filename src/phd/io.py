"""The single-file model export: config.json + model.safetensors (+ tokenizer.json) in one directory.

This is what inference, Hugging Face conversion and evaluation read. Training checkpoints (sharded, with
optimizer state) live elsewhere and are exported to this format.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from .config import PHDConfig
from .fsutil import sha256_file, swap_in_dir
from .model import PHDTransformer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or corrupted; the message names the file."""


def save_model(model: PHDTransformer, out_dir: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write an export atomically: a temporary sibling directory, renamed over `out_dir` when complete."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, tmp / WEIGHTS, metadata={"format": "pt", "variant": model.config.name})
        model.config.save(tmp / CONFIG)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER)
        (tmp / "checksums.json").write_text(json.dumps({WEIGHTS: sha256_file(tmp / WEIGHTS)}, indent=2) + "\n")
        swap_in_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def resolve_export(path: str | Path) -> Path:
    """An export directory, or a training run directory holding one under `model/`."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / WEIGHTS).exists() and (candidate / CONFIG).exists():
            return candidate
    raise CheckpointError(
        f"{path} holds no exported model ({CONFIG} + {WEIGHTS}); point to a directory written by "
        "`phd train` (its model/ folder) or `phd export`"
    )


def load_model(path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> PHDTransformer:
    """Rebuild the model from its config and load the weights (checksums verified when present)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = resolve_export(path)
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


def load_tokenizer(path: str | Path):
    """The `tokenizers.Tokenizer` saved beside an export (or a data directory)."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path if path.suffix == ".json" else path / TOKENIZER
    if not file.exists() and (path / "model" / TOKENIZER).exists():
        file = path / "model" / TOKENIZER
    if not file.exists():
        raise CheckpointError(f"no {TOKENIZER} at {path}; pass --tokenizer or export the model with its tokenizer")
    return Tokenizer.from_file(str(file))
