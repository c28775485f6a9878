"""One typed config for the architecture and the PHD variant (spec sections 2-4, 7).

Every constant the model needs lives here; the config is validated on construction and saved as JSON next
to every checkpoint, so a model can always be rebuilt from its directory.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PHDError

POSITIONS = ("expanded", "shared")
NORMS = ("pre", "post")
BACKENDS = ("auto", "dense", "split", "flex")


class ConfigError(PHDError, ValueError):
    """A config value is invalid; the message names the field, the value and what is allowed."""


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{name}={value!r} is invalid: {allowed}")


@dataclass
class PHDConfig:
    """Architecture (Llama / OLMo2 family) plus the PHD variant.

    Variant fields (spec section 3):
      repeat_k: K, copies of every token (1 = vanilla).
      window:   W, hidden queries also see the hidden copies of the W preceding positions (None = PHD).
      chunk:    C, the window is clipped to chunks of C positions starting at 0 (CSWA; needs a window).
      positions: "expanded" (copy s of position n at RoPE position K*n + s - 1) or "shared" (all at n).
      naive:    the repeat-K baseline: plain causal attention over the K*T interleaved tokens.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    repeat_k: int = 1
    window: int | None = None
    chunk: int | None = None
    positions: str = "expanded"
    naive: bool = False
    norm: str = "pre"
    qk_norm: bool = False
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    max_seq_len: int = 2048
    attn_backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "must be an integer >= 1")
        if self.d_model % self.n_heads:
            _fail("n_heads", self.n_heads, f"must divide d_model={self.d_model}")
        if self.n_heads % self.n_kv_heads:
            _fail("n_kv_heads", self.n_kv_heads, f"must divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            _fail("n_heads", self.n_heads, f"head_dim={self.head_dim} must be even for RoPE")
        if not isinstance(self.repeat_k, int) or isinstance(self.repeat_k, bool) or self.repeat_k < 1:
            _fail("repeat_k", self.repeat_k, "K must be an integer >= 1 (1 = vanilla)")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            _fail("window", self.window, "W must be None (PHD) or an integer >= 1 (SWA)")
        if self.window is not None and self.window > self.max_seq_len:
            # no sequence reaches such a window: the model would compute PHD-K under another variant's name
            _fail("window", self.window, f"W must be <= max_seq_len={self.max_seq_len}; lower window (or "
                  "use PHD-K, no window)")
        if self.chunk is not None:
            if not isinstance(self.chunk, int) or self.chunk < 1:
                _fail("chunk", self.chunk, "C must be None or an integer >= 1 (CSWA)")
            if self.window is None:
                _fail("chunk", self.chunk, "a chunk needs a window (CSWA is PHD-CSWA-K-W-C); set window")
        if self.naive and (self.window is not None or self.chunk is not None):
            _fail("naive", self.naive, "naive repetition is plain causal attention; it takes no window/chunk")
        if self.positions not in POSITIONS:
            _fail("positions", self.positions, f"allowed: {', '.join(POSITIONS)}")
        if self.norm not in NORMS:
            _fail("norm", self.norm, "allowed: 'pre' (Llama) or 'post' (OLMo2)")
        if self.attn_backend not in BACKENDS:
            _fail("attn_backend", self.attn_backend, f"allowed: {', '.join(BACKENDS)}")
        if not self.rope_theta > 0:
            _fail("rope_theta", self.rope_theta, "must be > 0")
        if not self.norm_eps > 0:
            _fail("norm_eps", self.norm_eps, "must be > 0")
        if not self.init_std > 0:
            _fail("init_std", self.init_std, "must be > 0")

    # ----- derived -----
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def is_causal(self) -> bool:
        """Plain causal attention over the tokens: vanilla (K = 1) or naive repetition; no hidden window."""
        return self.naive or self.repeat_k == 1

    @property
    def name(self) -> str:
        """The paper's name of the variant: vanilla, repeat-K, PHD-K, PHD-SWA-K-W-inf, PHD-CSWA-K-W-C."""
        k = self.repeat_k
        if k == 1:
            return "vanilla"
        if self.naive:
            return f"repeat-{k}"
        if self.window is None:
            return f"PHD-{k}"
        if self.chunk is None:
            return f"PHD-SWA-{k}-{self.window}-inf"
        return f"PHD-CSWA-{k}-{self.window}-{self.chunk}"

    def num_params(self, embeddings: bool = True) -> int:
        d, f, hd = self.d_model, self.d_ff, self.head_dim
        attn = d * d * 2 + 2 * d * self.n_kv_heads * hd
        norms = 2 * d + (d + self.n_kv_heads * hd if self.qk_norm else 0)
        per_layer = attn + 3 * d * f + norms
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + d + (emb if embeddings else 0)

    # ----- names and presets -----
    @staticmethod
    def parse_name(name: str) -> dict[str, Any]:
        """Variant fields from a paper name; raises ConfigError naming the accepted forms."""
        text = name.strip()
        low = text.lower()
        if low == "vanilla":
            return {"repeat_k": 1, "window": None, "chunk": None, "naive": False}
        patterns = [
            (r"repeat-(\d+)", lambda m: {"repeat_k": int(m[1]), "naive": True}),
            (r"phd-(\d+)", lambda m: {"repeat_k": int(m[1])}),
            (r"phd-swa-(\d+)-(\d+)(?:-inf)?", lambda m: {"repeat_k": int(m[1]), "window": int(m[2])}),
            (
                r"phd-cswa-(\d+)-(\d+)-(\d+)",
                lambda m: {"repeat_k": int(m[1]), "window": int(m[2]), "chunk": int(m[3])},
            ),
        ]
        for pattern, build in patterns:
            match = re.fullmatch(pattern, low)
            if match:
                fields = {"window": None, "chunk": None, "naive": False}
                fields.update(build(match))
                return fields
        raise ConfigError(
            f"variant name {name!r} is unknown: use vanilla, repeat-K, PHD-K, PHD-SWA-K-W-inf or "
            "PHD-CSWA-K-W-C (e.g. PHD-CSWA-3-16-32)"
        )

    @classmethod
    def build(cls, preset: str | None = None, variant: str | None = None, **fields: Any) -> PHDConfig:
        """The one way to assemble a config: preset < variant name < explicit fields.

        An explicit variant field (repeat_k, window, chunk, naive) that contradicts the variant name of the same
        call raises ConfigError instead of silently winning or losing.
        """
        merged = preset_arch(preset) if preset is not None else {}
        if variant is not None:
            named = cls.parse_name(variant)
            for key in VARIANT_FIELDS:
                if key in fields and fields[key] != named[key]:
                    raise ConfigError(
                        f"{key}={fields[key]!r} contradicts variant {variant!r}, which sets {key}={named[key]!r}: "
                        f"drop {key}, or give the variant name that has it"
                    )
            merged.update(named)
        merged.update(fields)
        return cls(**merged)

    @classmethod
    def from_name(cls, name: str, preset: str | None = None, **fields: Any) -> PHDConfig:
        """Config for a paper variant name; `fields` give the sizes, or `preset=` one of PRESETS."""
        return cls.build(preset, name, **fields)

    @classmethod
    def preset(cls, preset: str, variant: str | None = None, **fields: Any) -> PHDConfig:
        return cls.build(preset, variant, **fields)

    def with_variant(self, name: str) -> PHDConfig:
        """The same architecture with another variant (for side-by-side baselines)."""
        return dataclasses.replace(self, **self.parse_name(name))

    # ----- serialisation -----
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["variant"] = self.name
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PHDConfig:
        data = dict(data)
        data.pop("variant", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PHDConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no model config at {path}: expected the config.json saved by phd") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err}); re-export the checkpoint") from None
        return cls.from_dict(data.get("model", data))

    def differences(self, other: PHDConfig, fields: tuple[str, ...] | None = None) -> dict[str, tuple]:
        """Fields whose values differ (used to refuse resuming with another shape or variant)."""
        names = fields or tuple(f.name for f in dataclasses.fields(self))
        return {n: (getattr(self, n), getattr(other, n)) for n in names if getattr(self, n) != getattr(other, n)}


# The fields a variant name sets (`parse_name`).
VARIANT_FIELDS = ("repeat_k", "window", "chunk", "naive")

SHAPE_FIELDS = (
    "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "repeat_k", "window", "chunk",
    "positions", "naive", "norm", "qk_norm", "tie_embeddings",
)

# Sizes: the paper's models (spec section 7; OLMo2 architecture, dolma2 tokenizer) and CPU-sized models.
PRESETS: dict[str, dict[str, Any]] = {
    "paper-550m": dict(
        vocab_size=100352, d_model=1536, n_layers=16, n_heads=16, n_kv_heads=4, d_ff=8192,
        norm="post", qk_norm=True, rope_theta=500000.0, norm_eps=1e-6, max_seq_len=4096,
    ),
    "paper-1.2b": dict(
        vocab_size=100352, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=16384,
        norm="post", qk_norm=True, rope_theta=500000.0, norm_eps=1e-6, max_seq_len=4096,
    ),
    "bench-100m": dict(
        vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048,
        tie_embeddings=True, max_seq_len=4096,
    ),
    "cpu-30m": dict(
        vocab_size=16384, d_model=384, n_layers=11, n_heads=6, n_kv_heads=2, d_ff=1536,
        tie_embeddings=True, max_seq_len=1024,
    ),
    "cpu-10m": dict(
        vocab_size=8192, d_model=256, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=1024,
        tie_embeddings=True, max_seq_len=1024,
    ),
    "cpu-1m": dict(
        vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384,
        tie_embeddings=True, max_seq_len=512,
    ),
    # the smallest model that still learns (0.33M parameters, 0.2M outside the embedding): many tokens per parameter
    "cpu-tiny": dict(
        vocab_size=2048, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=192,
        tie_embeddings=True, max_seq_len=512,
    ),
    # cpu-1m in the paper's architecture (OLMo2: the norm after attention / MLP outputs, QK-norm)
    "cpu-1m-olmo2": dict(
        vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384,
        tie_embeddings=True, max_seq_len=512, norm="post", qk_norm=True, norm_eps=1e-6,
    ),
}


def preset_arch(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is unknown: allowed: {', '.join(PRESETS)}")
    return dict(PRESETS[name])
