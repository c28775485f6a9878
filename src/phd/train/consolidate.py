"""Consolidation (`phd export`): a training checkpoint (sharded DCP) -> a model folder (config.json +
model.safetensors + tokenizer.json, phd.io), the format inference, evaluation and conversion read. Runs in one
process, whatever number of processes wrote the checkpoint."""

from __future__ import annotations

from pathlib import Path

from ..config import PHDConfig
from ..io import TOKENIZER, CheckpointError, save_model
from ..model import PHDTransformer
from .checkpoint import latest_checkpoint, load_checkpoint, step_dir_name


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The latest committed checkpoint of a run (or the one of `step`)."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    if step is not None:
        path = root / step_dir_name(step)
        if not path.exists():
            have = ", ".join(p.name for p in sorted(root.glob("step_*"))) or "none"
            raise CheckpointError(f"{path} does not exist; checkpoints there: {have}")
        return path
    if not root.exists():
        raise CheckpointError(f"{run_dir} has no checkpoints/ folder: it is not a `phd train` run directory")
    path = latest_checkpoint(root)
    if path is None:
        raise CheckpointError(f"{root} holds no committed checkpoint (no `latest` marker)")
    return path


def consolidate_checkpoint(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Load the model weights of `checkpoint` (checksums verified) and write them with save_model (never into or
    over the checkpoint)."""
    checkpoint = Path(checkpoint)
    config = PHDConfig.load(checkpoint / "config.json")
    model = PHDTransformer(config)
    load_checkpoint(checkpoint, model)
    tokenizer = checkpoint / TOKENIZER
    return save_model(model, out, tokenizer if tokenizer.exists() else None, overwrite, [checkpoint])
