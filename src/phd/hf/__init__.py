"""Hugging Face transformers integration: `PHDForCausalLM` (model_type "phd") and checkpoint conversion.

Importing this package registers the classes with `AutoConfig` / `AutoModelForCausalLM`, so that
`AutoModelForCausalLM.from_pretrained(dir)` rebuilds a PHD model saved with `save_pretrained`.
Needs the `hf` extra: `pip install "phd[hf]"`.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        'phd.hf needs Hugging Face transformers: install the extra with `pip install "phd[hf]"`', name=err.name
    ) from None

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration import PHDHFConfig
from .modeling import PHDForCausalLM

AutoConfig.register(PHDHFConfig.model_type, PHDHFConfig, exist_ok=True)
AutoModelForCausalLM.register(PHDHFConfig, PHDForCausalLM, exist_ok=True)

__all__ = ["PHDHFConfig", "PHDForCausalLM"]
