"""Tiny PHD checkpoints for the vLLM tests, and the native engine's greedy tokens to hold vLLM's to.

head_dim 64 (vLLM's CPU attention takes 32, 64, 80, ...; not 16); weights drawn wider than the training init
so that greedy choices are far from ties. Runs in the vLLM virtual environment (transformers < 5.20).
"""

from __future__ import annotations

from pathlib import Path

import torch

import phd
from phd.bench.serving import write_byte_tokenizer  # noqa: F401  re-exported for the tests
from phd.hf import PHDForCausalLM

TINY = dict(vocab_size=256, d_model=128, n_layers=3, n_heads=2, n_kv_heads=1, d_ff=256, max_seq_len=256,
            init_std=0.08)


def write_tiny(folder: Path, seed: int = 0, **variant: object) -> phd.PHDTransformer:
    """A random PHD model of the given variant fields, saved as `phd convert --to phd-hf` saves it."""
    torch.manual_seed(seed)
    model = phd.PHDTransformer(phd.PHDConfig(**{**TINY, **variant})).eval()
    PHDForCausalLM.from_native(model).save_pretrained(folder)
    return model


def native_greedy(model: phd.PHDTransformer, prompt: list[int], new_tokens: int) -> list[int]:
    """The native engine's greedy continuation (new tokens only)."""
    out = phd.generate(model, torch.tensor(prompt), max_new_tokens=new_tokens)
    return out[len(prompt):].tolist()


def prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, TINY["vocab_size"], (n,), generator=g).tolist() for n in lengths]
