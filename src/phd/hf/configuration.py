"""`PHDHFConfig`: the transformers config of a PHD model (`model_type = "phd"`).

It carries every field of the native `PHDConfig` (derived from its dataclass fields) under the names
transformers tools expect (hidden_size, num_hidden_layers, ...), so `config.json` written by `save_pretrained`
rebuilds the native model exactly.

The attributes that tools written for Llama-family configs read (`head_dim`, `hidden_act`, `rope_parameters` and
transformers' `rope_scaling` alias of it, `attention_bias`, `attention_dropout`, `mlp_bias`) are properties
derived from those fields: a PHD model has exactly one value for each (SwiGLU, no biases, no dropout, plain RoPE),
so they are not stored twice and cannot disagree with the native config. Setting one (a config.json or a
script that names them) is accepted when it says the same thing and refused otherwise.
"""

from __future__ import annotations

import types
from typing import Any

from transformers import PreTrainedConfig

from ..config import ConfigError, PHDConfig
from ..hfnames import RENAMED, SAME, config_from_transformers_fields, transformers_fields


class _Fixed:
    """A Llama-family attribute with one value for every PHD model (or one derived from its fields, if callable):
    reading gives it, setting it to anything else is refused (see the module docstring)."""

    def __init__(self, value: Any, why: str) -> None:
        self.value, self.why = value, why

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, config: Any, owner: type | None = None) -> Any:
        if config is None:
            return self
        return self.value(config) if callable(self.value) else self.value

    def __set__(self, config: Any, value: Any) -> None:
        _same(self.name, value, self.__get__(config), self.why)


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

    # ----- the Llama-family attributes (read-only views of the native fields; see the module docstring) -----
    head_dim = _Fixed(lambda c: c.hidden_size // c.num_attention_heads,
                      "a PHD model's head_dim is hidden_size / num_attention_heads")
    hidden_act = _Fixed("silu", "the MLP of a PHD model is SwiGLU")
    attention_bias = _Fixed(False, "the attention projections of a PHD model have no bias")
    mlp_bias = _Fixed(False, "the MLP projections of a PHD model have no bias")
    attention_dropout = _Fixed(0.0, "a PHD model has no attention dropout")

    @property
    def rope_parameters(self) -> dict[str, Any]:
        """transformers 5's RoPE description (also read as `rope_scaling`): plain RoPE with `rope_theta`."""
        return {"rope_type": "default", "rope_theta": self.rope_theta}

    @rope_parameters.setter
    def rope_parameters(self, value: Any) -> None:
        """Plain RoPE only; a `rope_theta` in it sets the native field (the one place the value lives)."""
        if value is None:
            return
        given = dict(value) if isinstance(value, dict) else value
        if not isinstance(given, dict):
            raise ConfigError(f"rope_parameters={value!r} is invalid: give a dict like {self.rope_parameters}")
        rope_type = given.pop("rope_type", given.pop("type", "default"))
        if rope_type != "default" or set(given) - {"rope_theta"}:
            raise ConfigError(
                f"rope_parameters={value!r} is not supported: PHD models use plain RoPE (rope_type 'default', "
                "no scaling); only rope_theta can be set"
            )
        if "rope_theta" in given:
            self.rope_theta = given["rope_theta"]


def _same(name: str, value: Any, expected: Any, why: str) -> None:
    """A Llama-family attribute may be set only to the value a PHD model has (see the module docstring)."""
    if value != expected or isinstance(value, bool) != isinstance(expected, bool):
        raise ConfigError(f"{name}={value!r} is not supported: {why} ({name}={expected!r})")


def _phd_fields(namespace: dict[str, Any]) -> None:
    """Class body of PHDHFConfig: every PHDConfig field under its transformers name (transformers makes the
    class a dataclass of these annotations when it is created, hence `types.new_class`)."""
    fields = transformers_fields()
    namespace["__annotations__"] = {name: kind for name, (kind, _) in fields.items()}
    namespace.update({name: default for name, (_, default) in fields.items()})
    namespace["__module__"] = __name__
    namespace["__doc__"] = "transformers view of `phd.PHDConfig`; `to_phd()` / `from_phd()` convert without loss."


PHDHFConfig = types.new_class("PHDHFConfig", (_PHDHFBase,), exec_body=_phd_fields)
