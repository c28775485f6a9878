"""Inference for PHD: the KV cache, bounded prefill, parallel hidden decoding, sampling and generation."""

from .cache import PHDCache
from .engine import PREFILL_MODES, decode_step, prefill
from .generate import generate, generate_stream
from .sampling import SamplingConfig, sample
from .weights import decode_linears, kernel_linears, plain_linears

__all__ = [
    "PHDCache", "PREFILL_MODES", "prefill", "decode_step", "generate", "generate_stream", "SamplingConfig", "sample",
    "decode_linears", "kernel_linears", "plain_linears",
]
