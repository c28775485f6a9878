"""TrainConfig: every knob of a training run in one typed, validated dataclass.

Loaded from a JSON or TOML file, overridden from the command line (`--lr 1e-3`, `--model.repeat_k 3` or
`model.variant=PHD-CSWA-3-16-32`), and saved as `config.json` in the run directory, so a run can always be
resumed or reproduced from its folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import VARIANT_FIELDS, PHDConfig
from ..errors import PHDError

NAN_POLICIES = ("skip", "stop")
DTYPES = ("auto", "float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
DATA_PARALLEL = ("fsdp", "ddp")
BOOL_FIELDS = ("compile", "activation_checkpointing", "progress")
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds both take it; a negative one crashed numpy mid-setup


class TrainConfigError(PHDError, ValueError):
    """A training config value is invalid; the message names the field, the value and the fix."""


def _fail(name: str, value: Any, allowed: str) -> None:
    raise TrainConfigError(f"{name}={value!r} is invalid: {allowed}")


@dataclass
class ModelSpec:
    """The model to train: a preset and a paper variant name, plus explicit PHDConfig fields.

    `fields` may hold any PHDConfig field (vocab_size, d_model, window, positions...); without a preset it
    must hold the full architecture. Built by `PHDConfig.build` (preset < variant name < fields; a variant field
    that contradicts the name is an error). Without a name the variant fields default to vanilla.
    """

    preset: str | None = None
    variant: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    def build(self) -> PHDConfig:
        try:
            return PHDConfig.build(self.preset or None, self.variant, **self.fields)
        except TypeError as err:
            raise TrainConfigError(f"model: {err}; give a preset or all architecture fields") from None
        except ValueError as err:
            raise TrainConfigError(f"model: {err}") from None


@dataclass
class TrainConfig:
    """One training run. Batch sizes count sequences of `seq_len` tokens.

    `batch_size` is the global batch of one optimizer step, the same at any number of processes: each of the
    `world` ranks runs `batch_size / (micro_batch * world)` accumulation micro-steps. This is what lets a run
    resume on another process count with the same optimisation.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    data: str = ""
    out: str = "runs/run"
    init_from: str | None = None
    seq_len: int = 256
    batch_size: int = 16
    micro_batch: int = 16
    max_steps: int | None = None
    max_tokens: int | None = None
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8
    clip: float | None = 1.0
    z_loss: float = 0.0
    eval_every: int = 100
    eval_iters: int = 4
    checkpoint_every: int = 200
    checkpoint_keep: int = 2
    log_every: int = 10
    diagnostics_every: int = 0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    nan_policy: str = "skip"
    max_skipped_steps: int = 10
    data_parallel: str = "fsdp"
    compile: bool = False
    activation_checkpointing: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = model_spec_from_dict(self.model)
        for name in ("lr", "min_lr", "weight_decay", "eps", "clip", "z_loss"):
            value = getattr(self, name)
            if not (value is None and name == "clip") and not _is_number(value):
                _fail(name, value, "must be a number" + (" or null" if name == "clip" else ""))
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2 or not all(map(_is_number, self.betas)):
            _fail("betas", self.betas, "must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        self.betas = tuple(self.betas)
        for name in ("seq_len", "batch_size", "micro_batch", "eval_iters", "checkpoint_keep", "log_every"):
            _positive_int(name, getattr(self, name))
        for name in ("eval_every", "checkpoint_every", "warmup_steps", "max_skipped_steps", "diagnostics_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _fail(name, value, "must be an integer >= 0 (0 disables it)" if "every" in name else "must be >= 0")
        for name in ("max_steps", "max_tokens"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.max_steps is None and self.max_tokens is None:
            _fail("max_steps", None, "set max_steps or max_tokens (the length of the run)")
        if self.batch_size % self.micro_batch:
            _fail("micro_batch", self.micro_batch, f"must divide batch_size={self.batch_size}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            _fail("lr", self.lr, "must be a finite number > 0")
        if not 0 <= self.min_lr <= self.lr:
            _fail("min_lr", self.min_lr, f"must be in [0, lr={self.lr}]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            _fail("betas", self.betas, "must be two numbers in [0, 1)")
        if not 0 <= self.weight_decay < math.inf:
            _fail("weight_decay", self.weight_decay, "must be a finite number >= 0")
        if not 0 < self.eps < math.inf:
            _fail("eps", self.eps, "must be a finite number > 0 (AdamW's epsilon, e.g. 1e-8)")
        if not 0 <= self.z_loss < math.inf:
            _fail("z_loss", self.z_loss, "must be a finite number >= 0 (the weight of mean logsumexp(logits)^2; "
                  "1e-4 is usual, 0 turns it off)")
        if self.clip is not None and not self.clip > 0:
            _fail("clip", self.clip, "must be > 0, or null to disable clipping")
        if self.nan_policy not in NAN_POLICIES:
            _fail("nan_policy", self.nan_policy, f"allowed: {', '.join(NAN_POLICIES)}")
        if self.dtype not in DTYPES:
            _fail("dtype", self.dtype, f"allowed: {', '.join(DTYPES)}")
        if self.data_parallel not in DATA_PARALLEL:
            _fail("data_parallel", self.data_parallel, f"allowed: {', '.join(DATA_PARALLEL)} (with torchrun)")
        if self.device not in DEVICES:
            _fail("device", self.device, f"allowed: {', '.join(DEVICES)}")
        self._check_types()
        model = self.model.build()  # validates the model now, with the model's own error message
        if self.seq_len > model.max_seq_len:
            _fail("seq_len", self.seq_len, f"must be <= model.max_seq_len={model.max_seq_len}; lower seq_len or "
                  "raise model.max_seq_len")

    def _check_types(self) -> None:
        """Switches, seed and paths: `compile=maybe` once counted as true and `seed=abc` crashed torch mid-setup, so
        each is refused here with its field, value and what is allowed."""
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be true or false")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
            _fail("seed", self.seed, f"must be an integer in [0, {MAX_SEED}]")
        if not isinstance(self.data, str) or not self.data:
            _fail("data", self.data, "give the data directory written by `phd data` (data=DIR)")
        if not isinstance(self.out, str) or not self.out:
            _fail("out", self.out, "give the run folder to write (out=DIR)")
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
            _fail("init_from", self.init_from, "give a model folder written by `phd train` / `phd export`, or null")

    # ----- derived -----
    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        steps = [s for s in (self.max_steps, self.max_tokens and -(-self.max_tokens // self.tokens_per_step)) if s]
        return min(steps)

    def grad_accum(self, world: int) -> int:
        per_step = self.micro_batch * world
        if self.batch_size % per_step:
            raise TrainConfigError(
                f"batch_size={self.batch_size} is not a multiple of micro_batch * processes = {self.micro_batch} * "
                f"{world}; change micro_batch or the number of processes"
            )
        return self.batch_size // per_step

    # ----- serialisation -----
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The config of a dict (a run's config.json included: its `resumes` history is not a field)."""
        data = {k: v for k, v in data.items() if k != "resumes"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainConfigError(f"unknown training config fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path, resumes: list[dict[str, Any]] | None = None) -> None:
        """Write the config as JSON (atomically); a run folder's copy adds its `resumes` history."""
        path = Path(path)
        data = self.to_dict() if resumes is None else {**self.to_dict(), "resumes": resumes}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(name, value, "must be an integer >= 1")


def model_spec_from_dict(data: dict[str, Any]) -> ModelSpec:
    """`{"preset": ..., "variant": ..., "d_model": ...}`: anything else than preset/variant is a PHDConfig field."""
    data = dict(data)
    fields = dict(data.pop("fields", {}))
    preset = data.pop("preset", None)
    variant = data.pop("variant", None)
    fields.update(data)
    known = {f.name for f in dataclasses.fields(PHDConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TrainConfigError(f"unknown model fields {unknown}; known: preset, variant, {', '.join(sorted(known))}")
    return ModelSpec(preset=preset, variant=variant, fields=fields)


def load_file(path: str | Path) -> dict[str, Any]:
    """A config file as a dict: `.json`, or `.toml` (read with the standard library)."""
    path = Path(path)
    if not path.exists():
        raise TrainConfigError(f"config file {path} does not exist")
    if path.suffix not in (".json", ".toml"):
        raise TrainConfigError(f"{path}: config files are .json or .toml")
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise TrainConfigError(f"{path}: TOML configs need Python >= 3.11; use a .json config") from None
            return tomllib.loads(path.read_text())
        return json.loads(path.read_text())
    except (json.JSONDecodeError, ValueError) as err:
        if isinstance(err, TrainConfigError):
            raise
        raise TrainConfigError(f"{path} cannot be parsed ({err})") from None


_KEY_VALUE = re.compile(r"^[A-Za-z_][\w.]*=")


def parse_value(text: str) -> Any:
    """`3` -> 3, `1e-3` -> 0.001, `true` -> True, `null` -> None, `[0.9, 0.95]` -> list, anything else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        low = text.lower()
        if low in ("true", "false", "none", "null"):
            return {"true": True, "false": False}.get(low)
        return text


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--a.b 3`, `--a.b=3` and `a.b=3` -> {"a.b": 3}; a flag without a value (`--compile`) means true."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key = arg[2:]
            if "=" in key:
                key, text = key.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--") and not _KEY_VALUE.match(args[i + 1]):
                text, i = args[i + 1], i + 1
            else:
                text = "true"
        elif "=" in arg:
            key, text = arg.split("=", 1)
        else:
            raise TrainConfigError(f"cannot read override {arg!r}: use --key value, --key=value or key=value")
        out[key.replace("-", "_")] = parse_value(text)
        i += 1
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (`model.repeat_k`) into a nested copy of `data`."""
    data = json.loads(json.dumps(data))
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"override {key}: {part} is not a section")
        node[parts[-1]] = value
    return data


def layer_variant(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The file's model variant made ready for command-line overrides, so that the later layer wins.

    An overridden `model.variant` replaces the file's variant fields; an overridden variant field (`model.window`)
    applies to the file's variant name spelled out as fields. Within one layer a contradiction stays an error.
    """
    model = data.get("model")
    keys = {key.split(".", 1)[1] for key in overrides if key.startswith("model.")}
    if not isinstance(model, dict) or not keys:
        return data
    model = {**model, "fields": dict(model.get("fields", {}))}
    if "variant" in keys:
        for key in VARIANT_FIELDS:
            model.pop(key, None)
            model["fields"].pop(key, None)
    elif keys & set(VARIANT_FIELDS) and model.get("variant"):
        model.update(PHDConfig.parse_name(model.pop("variant")))
    if not model["fields"]:
        del model["fields"]
    return {**data, "model": model}


def build_config(path: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """The run's config: the file (if any), then the overrides (which win over it), validated."""
    data = load_file(path) if path else {}
    return TrainConfig.from_dict(apply_overrides(layer_variant(data, overrides), overrides))
