"""Training: config, resumable sharded loader, AdamW + schedule, FSDP2 parallelize, DCP checkpoints, the loop."""

from .config import ModelSpec, TrainConfig, TrainConfigError, build_config
from .trainer import Trainer, TrainingError, train

__all__ = ["ModelSpec", "TrainConfig", "TrainConfigError", "Trainer", "TrainingError", "build_config", "train"]
