"""Tiny transformers and PHD models for the transformers-integration tests (d 64, 2 layers, GQA 4/2 heads)."""

from __future__ import annotations

import pytest
import torch

import phd

transformers = pytest.importorskip("transformers")

VOCAB = 101


def tiny_transformers(family: str = "llama", tie: bool = True, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised transformers model with GQA (4 query / 2 kv heads) and non-trivial norm weights."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie, rms_norm_eps=1e-6, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    fields.update(overrides)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    else:
        model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**fields))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.15)
    return model.eval()


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def tiny_phd(variant: str = "PHD-CSWA-3-2-4", tie: bool = True, seed: int = 0, **overrides) -> phd.PHDTransformer:
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, tie_embeddings=tie,
                  init_std=0.15, max_seq_len=256)
    config = phd.PHDConfig.from_name(variant, **{**fields, **overrides})
    return phd.PHDTransformer(config).eval()
