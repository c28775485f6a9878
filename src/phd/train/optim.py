"""AdamW and the learning-rate schedule (linear warmup, then cosine down to min_lr)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-indexed): warmup to lr, cosine to min_lr at the last step."""
    total = cfg.total_steps
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(total - cfg.warmup_steps - 1, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / decay_steps, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, norm gains (1-d parameters) do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / cfg.lr)


# The TrainConfig fields that set the optimiser and schedule; on resume they follow the new config (apply_config).
OPTIM_FIELDS = ("lr", "min_lr", "warmup_steps", "total_steps", "betas", "eps", "weight_decay")


def optim_settings(cfg: TrainConfig) -> dict:
    """The values of OPTIM_FIELDS, as saved in a checkpoint to report what a resume changes."""
    return {name: list(v) if isinstance(v := getattr(cfg, name), tuple) else v for name in OPTIM_FIELDS}


def apply_config(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                 cfg: TrainConfig) -> None:
    """After loading a checkpoint's optimiser and scheduler state, make them follow `cfg` exactly: the state
    carries the old base lr, betas, eps and weight decay, which would silently rescale the new schedule. From
    here the lr of step s is lr_at(s, cfg), the same value LambdaLR computes."""
    decay, _ = optimizer.param_groups
    for group in optimizer.param_groups:
        group["initial_lr"], group["betas"], group["eps"] = cfg.lr, tuple(cfg.betas), cfg.eps
        group["weight_decay"] = cfg.weight_decay if group is decay else 0.0
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * fn(scheduler.last_epoch)
