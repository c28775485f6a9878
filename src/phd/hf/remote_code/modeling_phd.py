"""PHD-Transformer for transformers' `trust_remote_code=True`: the installed `phd` package's PHDForCausalLM."""

try:
    from phd.hf.modeling import PHDForCausalLM as _PHDForCausalLM
except ModuleNotFoundError as err:
    if not (err.name or "").startswith("phd"):
        raise
    raise ModuleNotFoundError(
        'this PHD model needs the phd package with its transformers extra: pip install "phd[hf]"', name="phd"
    ) from None

from .configuration_phd import PHDHFConfig


class PHDForCausalLM(_PHDForCausalLM):
    config_class = PHDHFConfig
