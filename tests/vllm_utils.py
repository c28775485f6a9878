"""Tiny PHD checkpoints for the vLLM tests, and the native engine's greedy tokens to hold vLLM's to.

head_dim 64 (vLLM's CPU attention takes 32, 64, 80, ...; not 16); weights drawn wider than the training init
so that greedy choices are far from ties. Runs in the vLLM virtual environment (transformers < 5.20).
"""

from __future__ import annotations

from pathlib import Path

import torch

import phd
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


def write_byte_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer (ids = the 256 bytes, no merges) with a small chat template, beside a tiny model, so
    that `vllm serve` can take text and chat messages."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer emits): id i is byte i.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    order = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    tok = Tokenizer(models.BPE({ch: i for i, ch in enumerate(order)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=order[0])
    fast.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    fast.save_pretrained(folder)
