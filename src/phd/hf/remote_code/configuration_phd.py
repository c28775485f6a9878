"""PHD-Transformer config for transformers' `trust_remote_code=True`: the installed `phd` package's PHDHFConfig.

The one import of `phd` for both remote files (modeling_phd.py takes it from here), guarded so that a missing
package is one line saying what to install.
"""

try:
    import phd.hf as phd_hf
except ModuleNotFoundError as err:
    if not (err.name or "").startswith("phd"):
        raise
    raise ModuleNotFoundError(
        'this PHD model needs the phd package with its transformers extra: pip install "phd[hf]"', name="phd"
    ) from None


class PHDHFConfig(phd_hf.PHDHFConfig):
    pass
