"""vLLM plugin: serve PHD checkpoints (`phd convert --to phd-hf` folders, model_type "phd") with vLLM.

Installed with the package, `register` is found through the `vllm.general_plugins` entry point in every vLLM
process, so `LLM(model=DIR)` and `vllm serve DIR` need no user code. The model is `phd.vllm.model` (the
native modules and weights, vLLM's paged attention for the originals); docs/serving.md has the design.
Needs vLLM >= 0.32 (`pip install "phd[vllm]"`, or scripts/setup-vllm.sh for the CPU build).
"""

from __future__ import annotations

ARCHITECTURE = "PHDForCausalLM"


def register() -> None:
    """The entry point: the config class for model_type "phd", the model class and its config hook.

    Idempotent (vLLM may load plugins more than once per process); imports stay lazy so that the engine
    process does not build the model module before it forks workers.
    """
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    import phd.hf  # noqa: F401  registers model_type "phd" with transformers' AutoConfig

    from .config import PHDServingConfig

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "phd.vllm.model:PHDForCausalLM")
    MODELS_CONFIG_MAP[ARCHITECTURE] = PHDServingConfig
