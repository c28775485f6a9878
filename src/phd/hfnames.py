"""The transformers names of `PHDConfig` fields, without importing transformers.

`phd.hf.PHDHFConfig` writes a config.json under these names; `phd.io` reads such a folder (`phd convert --to
phd-hf`) back into the native model with them, so the CLI needs no transformers to load it.
"""

from __future__ import annotations

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
# Native fields stored under their own names.
SAME = ("vocab_size", "repeat_k", "window", "chunk", "positions", "naive", "norm", "qk_norm", "rope_theta",
        "attn_backend")


def is_transformers_config(fields: dict[str, Any]) -> bool:
    """Whether a config.json was written by `PHDForCausalLM.save_pretrained` (model_type "phd")."""
    return fields.get("model_type") == MODEL_TYPE


def config_from_transformers_fields(fields: dict[str, Any]) -> PHDConfig:
    """The native config of a PHDForCausalLM config.json (transformers' own fields are left out)."""
    native = {ours: fields[theirs] for theirs, ours in RENAMED.items() if theirs in fields}
    native.update({name: fields[name] for name in SAME if name in fields})
    return PHDConfig(**native)
