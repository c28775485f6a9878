"""Llama's module names for a PHD model's projections, for PEFT and other tools that find layers by name.

A PHD model's projections are `attn.wq/wk/wv/wo` and `mlp.w_gate/w_up/w_down` (the native module names: the
checkpoints, the conversion and the vLLM plugin all use them, so they stay). Tools written for Llama-family models
look for `q_proj`, `v_proj`, `gate_proj`, ...: PEFT's LoRA matches `target_modules` against the names
`named_modules()` lists, then replaces the module with `setattr(parent, name, wrapped)`. So a transformers-side PHD
model gives each projection its Llama name as an alias, in three places and nowhere else:

- reading and replacing: the native `Attention` / `SwiGLU` modules of a phd-hf model take a subclass
  (`LlamaNamedAttention` / `LlamaNamedMLP`, same data) where `attn.q_proj` *is* `attn.wq` and setting `q_proj`
  sets `wq`;
- listing: `PHDPreTrainedModel.named_modules()` lists every projection a second time under its Llama name
  (`model.layers.0.attn.q_proj`); `parameters()`, `state_dict()` and `modules()` are unchanged (no key of a
  checkpoint changes, nothing is counted twice);
- PEFT's default targets: PEFT picks LoRA's (and its other methods') default `target_modules` by `model_type`;
  model_type "phd" gets Llama's defaults in the native names (LoRA: `wq`, `wv`), registered when `phd.hf` is
  imported with PEFT installed (PEFT has no other registration point).

So `LoraConfig()` (defaults), `LoraConfig(target_modules=["q_proj", "v_proj"])` and
`LoraConfig(target_modules=["wq", "wv"])` all adapt the same two projections, and an adapter saved one way loads
the same (its weights are saved under the native names).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any, ClassVar

from torch import nn

from ..model import Attention, PHDTransformer, SwiGLU

ATTENTION_NAMES = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo"}
MLP_NAMES = {"gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}
LLAMA_NAMES = {**ATTENTION_NAMES, **MLP_NAMES}  # Llama name -> native name


class _LlamaNamed:
    """Mixin: `llama_names` (Llama name -> native name) read and set the native child module."""

    llama_names: ClassVar[dict[str, str]] = {}

    def __getattr__(self, name: str) -> Any:
        return super().__getattr__(type(self).llama_names.get(name, name))

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(type(self).llama_names.get(name, name), value)

    def __delattr__(self, name: str) -> None:
        super().__delattr__(type(self).llama_names.get(name, name))

    def llama_aliases(self, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        """(prefix.llama_name, the native module) of every projection."""
        for alias, native in type(self).llama_names.items():
            yield f"{prefix}.{alias}" if prefix else alias, self._modules[native]


class LlamaNamedAttention(_LlamaNamed, Attention):
    """The native attention, also answering to q_proj / k_proj / v_proj / o_proj."""

    llama_names = ATTENTION_NAMES


class LlamaNamedMLP(_LlamaNamed, SwiGLU):
    """The native SwiGLU MLP, also answering to gate_proj / up_proj / down_proj."""

    llama_names = MLP_NAMES


def add_llama_names(model: PHDTransformer) -> None:
    """Give every layer's attention and MLP their Llama names (in place; the modules and weights stay the same
    objects, so a native model wrapped by `PHDForCausalLM.from_native` keeps working as before)."""
    for block in model.layers:
        if type(block.attn) is Attention:
            block.attn.__class__ = LlamaNamedAttention
        if type(block.mlp) is SwiGLU:
            block.mlp.__class__ = LlamaNamedMLP


def named_modules_with_aliases(named: Iterator[tuple[str, nn.Module]]) -> Iterator[tuple[str, nn.Module]]:
    """`named` (a named_modules() traversal), then every Llama-named projection again under its alias."""
    found = []
    for name, module in named:
        if isinstance(module, _LlamaNamed):
            found.append((name, module))
        yield name, module
    for name, module in found:
        yield from module.llama_aliases(name)


def register_peft_defaults() -> None:
    """PEFT's default target modules for model_type "phd": Llama's, in the native names (see the module
    docstring). Only the mappings that hold a list of Llama names are extended; nothing when PEFT is absent."""
    if importlib.util.find_spec("peft") is None:
        return
    try:
        from peft.utils import constants
    except Exception:  # noqa: BLE001 - a PEFT that does not import (another transformers) must not break phd.hf
        return

    for name in dir(constants):
        mapping = getattr(constants, name)
        if not (name.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(mapping, dict)):
            continue
        llama = mapping.get("llama")
        if isinstance(llama, list | tuple) and llama and all(n in LLAMA_NAMES for n in llama):
            mapping.setdefault("phd", [LLAMA_NAMES[n] for n in llama])
