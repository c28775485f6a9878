"""Training health signals, cheap enough to log every few steps, to tell a run that is going wrong from one
that is not: the largest attention logit of each layer and the largest output logit (a probe forward over one
sequence of the step's batch), and each layer's update-to-weight ratio (the relative size of the step AdamW
took). The gradient norm before clipping and skipped steps are logged by the trainer itself, every step.

The probe runs the model's own blocks with a dense attention that also records its scores, outside any
compiled graph, on a single process (FSDP's sharded parameters are not probed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..attention import repeat_kv
from ..masks import AttentionLayout

PROBE_TOKENS = 256  # the probe reads the first tokens of one sequence: bounded cost at any seq_len and model size


@dataclass
class ScoreProbe:
    """A dense PHD attention (same rule, same result as the reference) that records its largest allowed
    score q.k / sqrt(D)."""

    layout: AttentionLayout
    maxima: list[float] = field(default_factory=list)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n_rep = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, n_rep).float(), repeat_kv(v, n_rep).float()
        scores = (q.float() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(~self.layout.dense_mask(q.device), float("-inf"))
        self.maxima.append(float(scores.amax()))
        return (torch.softmax(scores, dim=-1) @ v).to(q.dtype)


@torch.no_grad()
def probe_logits(model: nn.Module, input_ids: Tensor) -> dict[str, Any]:
    """{"attn_logit_max": per layer, "out_logit_max": largest |logit| of copy K} for `input_ids` [B, T]."""
    was_training = model.training
    model.eval()
    try:
        probes = [ScoreProbe(model.layout(input_ids.shape[1])) for _ in model.layers]
        h = model.hidden_states(input_ids, attention=lambda i: probes[i], eager=True)
        logits = model.lm_head(model.norm(model.layout(input_ids.shape[1]).final_copies(h)))
    finally:
        model.train(was_training)
    return {"attn_logit_max": [round(p.maxima[0], 3) for p in probes],
            "out_logit_max": round(float(logits.abs().amax()), 3)}


def layer_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The parameters of the embedding (with a tied head), of each block, and of the final norm and head."""
    groups: dict[str, list[nn.Parameter]] = {"embed": list(model.embed.parameters())}
    for i, block in enumerate(model.layers):
        groups[f"layer{i}"] = list(block.parameters())
    seen = {id(p) for ps in groups.values() for p in ps}
    groups["head"] = [p for p in [*model.norm.parameters(), *model.lm_head.parameters()] if id(p) not in seen]
    return groups


def grad_norms(model: nn.Module) -> dict[str, float]:
    """The gradient norm of each layer group (before clipping): which part of the model a spike comes from."""
    out = {}
    for name, params in layer_groups(model).items():
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            out[name] = float(f"{sum(float(g.float().pow(2).sum()) for g in grads) ** 0.5:.4g}")
    return out


class UpdateRatio:
    """||W_after - W_before|| / ||W_before|| per layer group around one optimizer step."""

    def __init__(self, model: nn.Module) -> None:
        self.groups = layer_groups(model)
        self.before = {name: [p.detach().clone() for p in ps] for name, ps in self.groups.items()}

    def ratios(self) -> dict[str, float]:
        out = {}
        for name, params in self.groups.items():
            if not params:
                continue
            delta = sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(params, self.before[name], strict=True))
            norm = sum(float(b.pow(2).sum()) for b in self.before[name])
            out[name] = float(f"{(delta / norm) ** 0.5 if norm else 0.0:.4g}")
        return out


def summarize_health(records: list[dict[str, Any]], clip: float | None, early_steps: int = 50) -> dict[str, Any]:
    """A run's health in a few numbers (for the results row), from its metrics records."""
    steps = [r for r in records if "step" in r and "lr" in r]
    norms = [r["grad_norm"] for r in steps if r.get("grad_norm") is not None]
    probes = [r for r in records if "out_logit_max" in r]
    updates = [r for r in records if "update_ratio" in r]
    early = [r for r in steps if r["step"] <= early_steps]
    health: dict[str, Any] = {
        "skipped": sum(1 for r in steps if r.get("skipped")),
        "grad_norm_max": max(norms, default=None),
        "grad_norm_median": sorted(norms)[len(norms) // 2] if norms else None,
        "clipped_fraction": round(sum(n > clip for n in norms) / len(norms), 4) if norms and clip else None,
        "early_grad_norm_max": max((r["grad_norm"] for r in early if r.get("grad_norm") is not None), default=None),
    }
    if probes:
        health["attn_logit_max"] = max(max(r["attn_logit_max"]) for r in probes)
        health["out_logit_max"] = max(r["out_logit_max"] for r in probes)
    if updates:
        health["update_ratio_max"] = max(max(r["update_ratio"].values()) for r in updates)
    return health
