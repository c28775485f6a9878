"""PHD-Transformer config for transformers' `trust_remote_code=True`: the installed `phd` package's PHDHFConfig."""

try:
    from phd.hf.configuration import PHDHFConfig as _PHDHFConfig
except ModuleNotFoundError as err:
    if not (err.name or "").startswith("phd"):
        raise
    raise ModuleNotFoundError(
        'this PHD model needs the phd package with its transformers extra: pip install "phd[hf]"', name="phd"
    ) from None


class PHDHFConfig(_PHDHFConfig):
    pass
