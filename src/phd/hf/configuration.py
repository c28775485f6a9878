"""`PHDHFConfig`: the transformers config of a PHD model (`model_type = "phd"`).

It carries every field of the native `PHDConfig` under the names transformers tools expect (hidden_size,
num_hidden_layers, ...), so `config.json` written by `save_pretrained` rebuilds the native model exactly.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ..config import PHDConfig
from ..hfnames import RENAMED, SAME, config_from_transformers_fields


class PHDHFConfig(PreTrainedConfig):
    """transformers view of `phd.PHDConfig`; `to_phd()` / `from_phd()` convert without loss."""

    model_type = "phd"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    repeat_k: int = 1
    window: int | None = None
    chunk: int | None = None
    positions: str = "expanded"
    naive: bool = False
    norm: str = "pre"
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    max_position_embeddings: int = 2048
    attn_backend: str = "auto"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    use_cache: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.to_phd()  # validates every field with the native rules and their error messages

    def to_phd(self) -> PHDConfig:
        return config_from_transformers_fields({name: getattr(self, name) for name in (*RENAMED, *SAME)})

    @classmethod
    def from_phd(cls, config: PHDConfig, **special_tokens: Any) -> PHDHFConfig:
        """The transformers config of a native config; `special_tokens` sets bos/eos/pad_token_id."""
        fields = {hf: getattr(config, native) for hf, native in RENAMED.items()}
        fields.update({name: getattr(config, name) for name in SAME})
        return cls(**fields, **special_tokens)
