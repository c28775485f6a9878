"""PHD-Transformer for transformers' `trust_remote_code=True`: the installed `phd` package's PHDForCausalLM
(AutoModelForCausalLM) and PHDModel (AutoModel, the base model)."""

from .configuration_phd import PHDHFConfig, phd_hf


class PHDForCausalLM(phd_hf.PHDForCausalLM):
    config_class = PHDHFConfig


class PHDModel(phd_hf.PHDModel):
    config_class = PHDHFConfig
