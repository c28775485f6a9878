"""Public conversion API between transformers Llama / OLMo2 checkpoints and native PHD models.

    from phd.convert import from_transformers, to_transformers
    phd_model = from_transformers(llama, repeat_k=2, window=16, chunk=32)   # any variant, same weights
    llama_again = to_transformers(from_transformers(llama))                 # K = 1 only

Needs the `hf` extra (`pip install "phd[hf]"`); the implementation lives in `phd.hf.convert`.
"""

from __future__ import annotations

from .hf.convert import ConversionError, config_from_transformers, from_transformers, load_transformers, to_transformers

__all__ = ["ConversionError", "config_from_transformers", "from_transformers", "load_transformers", "to_transformers"]
