"""phd: the PHD-Transformer (Parallel Hidden Decoding, arXiv 2504.14992) in PyTorch."""

from . import masks
from .config import PRESETS, ConfigError, PHDConfig
from .inference import PHDCache, generate
from .model import CausalLMOutput, PHDTransformer

__all__ = [
    "PHDConfig", "PHDTransformer", "CausalLMOutput", "ConfigError", "PRESETS", "masks", "PHDCache", "generate",
]
__version__ = "0.1.0"
