"""Hugging Face transformers integration: `PHDForCausalLM` (model_type "phd") and checkpoint conversion.

Importing this package registers the classes with `AutoConfig` / `AutoModelForCausalLM` / `AutoModel`, so that
`AutoModelForCausalLM.from_pretrained(dir)` rebuilds a PHD model saved with `save_pretrained` (and
`AutoModel.from_pretrained(dir)` its base model, `PHDModel`), and, where PEFT is installed, gives model_type "phd"
PEFT's default target modules (llama_names.py).
Needs the `hf` extra: `pip install "phd[hf]"`.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        'phd.hf needs Hugging Face transformers: install the extra with `pip install "phd[hf]"`', name=err.name
    ) from None

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration import PHDHFConfig
from .llama_names import register_peft_defaults
from .modeling import PHDForCausalLM, PHDModel

AutoConfig.register(PHDHFConfig.model_type, PHDHFConfig, exist_ok=True)
AutoModelForCausalLM.register(PHDHFConfig, PHDForCausalLM, exist_ok=True)
AutoModel.register(PHDHFConfig, PHDModel, exist_ok=True)
register_peft_defaults()

__all__ = ["PHDHFConfig", "PHDForCausalLM", "PHDModel"]
