"""`PHDHFConfig`: the transformers config of a PHD model (`model_type = "phd"`).

It carries every field of the native `PHDConfig` (derived from its dataclass fields) under the names
transformers tools expect (hidden_size, num_hidden_layers, ...), so `config.json` written by `save_pretrained`
rebuilds the native model exactly.
"""

from __future__ import annotations

import types
from typing import Any

from transformers import PreTrainedConfig

from ..config import PHDConfig
from ..hfnames import RENAMED, SAME, config_from_transformers_fields, transformers_fields


class _PHDHFBase(PreTrainedConfig):
    """The methods of PHDHFConfig; its fields are added from PHDConfig's below."""

    model_type = "phd"
    keys_to_ignore_at_inference = ["past_key_values"]

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


def _phd_fields(namespace: dict[str, Any]) -> None:
    """Class body of PHDHFConfig: every PHDConfig field under its transformers name (transformers makes the
    class a dataclass of these annotations when it is created, hence `types.new_class`)."""
    fields = transformers_fields()
    namespace["__annotations__"] = {name: kind for name, (kind, _) in fields.items()}
    namespace.update({name: default for name, (_, default) in fields.items()})
    namespace["__module__"] = __name__
    namespace["__doc__"] = "transformers view of `phd.PHDConfig`; `to_phd()` / `from_phd()` convert without loss."


PHDHFConfig = types.new_class("PHDHFConfig", (_PHDHFBase,), exec_body=_phd_fields)
