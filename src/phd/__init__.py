"""phd: the PHD-Transformer (Parallel Hidden Decoding, arXiv 2504.14992) in PyTorch."""

from . import masks
from .config import PRESETS, ConfigError, PHDConfig
from .model import CausalLMOutput, PHDTransformer

__all__ = ["PHDConfig", "PHDTransformer", "CausalLMOutput", "ConfigError", "PRESETS", "masks"]
__version__ = "0.1.0"
