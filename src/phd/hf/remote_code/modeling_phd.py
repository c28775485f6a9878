"""PHD-Transformer for transformers' `trust_remote_code=True`: the installed `phd` package's PHDForCausalLM."""

from .configuration_phd import PHDHFConfig, phd_hf


class PHDForCausalLM(phd_hf.PHDForCausalLM):
    config_class = PHDHFConfig
