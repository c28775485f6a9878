"""The transformers names of `PHDConfig` fields, without importing transformers.

`phd.hf.PHDHFConfig` writes a config.json under these names; `phd.io` reads such a folder (`phd convert --to
phd-hf`) back into the native model with them, so the CLI needs no transformers to load it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import PHDConfig

MODEL_TYPE = "phd"
# transformers name -> native PHDConfig name, for the fields whose names differ.
RENAMED = {
    "hidden_size": "d_model",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "intermediate_size": "d_ff",
    "tie_word_embeddings": "tie_embeddings",
    "rms_norm_eps": "norm_eps",
    "initializer_range": "init_std",
    "max_position_embeddings": "max_seq_len",
}
# Native fields stored under their own names: every other PHDConfig field.
SAME = tuple(f.name for f in dataclasses.fields(PHDConfig) if f.name not in RENAMED.values())
# Defaults of the transformers config for the fields PHDConfig requires (a bench-100m sized model).
REQUIRED_DEFAULTS = {"vocab_size": 32000, "d_model": 768, "n_layers": 12, "n_heads": 12, "n_kv_heads": 12,
                     "d_ff": 2048}


def transformers_fields() -> dict[str, tuple[Any, Any]]:
    """transformers name -> (annotation, default) of every PHDConfig field, so the two configs cannot drift."""
    theirs = {native: hf for hf, native in RENAMED.items()}
    out = {}
    for f in dataclasses.fields(PHDConfig):
        default = REQUIRED_DEFAULTS[f.name] if f.default is dataclasses.MISSING else f.default
        out[theirs.get(f.name, f.name)] = (f.type, default)
    return out


def is_transformers_config(fields: dict[str, Any]) -> bool:
    """Whether a config.json was written by `PHDForCausalLM.save_pretrained` (model_type "phd")."""
    return fields.get("model_type") == MODEL_TYPE


def config_from_transformers_fields(fields: dict[str, Any]) -> PHDConfig:
    """The native config of a PHDForCausalLM config.json (transformers' own fields are left out)."""
    native = {ours: fields[theirs] for theirs, ours in RENAMED.items() if theirs in fields}
    native.update({name: fields[name] for name in SAME if name in fields})
    return PHDConfig(**native)
