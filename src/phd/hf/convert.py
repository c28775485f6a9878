"""Weights between transformers `LlamaForCausalLM` / `Olmo2ForCausalLM` and the native `PHDTransformer`.

A vanilla checkpoint becomes a PHD model of any variant: the weights are the same, only the token layout and the
attention rule change (spec section 3). With K = 1 the converted model IS the original (same logits). For K > 1,
`positions="shared"` (the default here) gives every copy of token n the RoPE position n, so the original stream
keeps exactly the positions the checkpoint was trained with (spec section 4); "expanded" (K*n + s - 1) is the
layout of models pretrained as PHD from scratch.

Name map (native <- transformers, per layer i):
  embed <- model.embed_tokens; norm <- model.norm; lm_head <- lm_head (absent when tied)
  attn.{wq,wk,wv,wo} <- self_attn.{q,k,v,o}_proj; mlp.{w_gate,w_up,w_down} <- mlp.{gate,up,down}_proj
  Llama (norm="pre"):  attn_norm <- input_layernorm;          mlp_norm <- post_attention_layernorm
  OLMo2 (norm="post"): attn_norm <- post_attention_layernorm; mlp_norm <- post_feedforward_layernorm;
                       attn.{q_norm,k_norm} <- self_attn.{q_norm,k_norm} (over the whole projection)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import PHDConfig
from ..errors import PHDError
from ..model import PHDTransformer

FAMILIES = {"llama": "pre", "olmo2": "post"}


class ConversionError(PHDError, ValueError):
    """A checkpoint cannot be converted exactly; the message names the feature and what is supported."""


def _rope(hf_config: Any) -> tuple[float, str]:
    """(rope_theta, rope_type) from a transformers config (`rope_parameters` in v5, `rope_theta` before)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if theta is None:
        raise ConversionError("the transformers config has no rope_theta; cannot rebuild the rotary embedding")
    return float(theta), rope_type


def config_from_transformers(hf_config: Any, **variant: Any) -> PHDConfig:
    """The native config of a Llama / OLMo2 transformers config, refusing what the native model cannot express."""
    family = getattr(hf_config, "model_type", None)
    if family not in FAMILIES:
        raise ConversionError(
            f"model_type={family!r} is not supported: phd converts 'llama' (LlamaForCausalLM) and 'olmo2' "
            "(Olmo2ForCausalLM) checkpoints"
        )
    theta, rope_type = _rope(hf_config)
    if rope_type != "default":
        raise ConversionError(
            f"rope_type={rope_type!r} (rope scaling) is not supported: the native RoPE is the plain one; convert a "
            "checkpoint without rope_scaling"
        )
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConversionError(f"hidden_act={act!r} is not supported: the native MLP is SwiGLU (silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, flag, False):
            raise ConversionError(f"{flag}=True is not supported: the native projections have no bias")
    d, heads = hf_config.hidden_size, hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or d // heads
    if head_dim * heads != d:
        raise ConversionError(
            f"head_dim={head_dim} with {heads} heads does not equal hidden_size={d}: the native model needs "
            "head_dim = hidden_size / num_attention_heads"
        )
    fields: dict[str, Any] = dict(
        vocab_size=hf_config.vocab_size,
        d_model=d,
        n_layers=hf_config.num_hidden_layers,
        n_heads=heads,
        n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        d_ff=hf_config.intermediate_size,
        norm=FAMILIES[family],
        qk_norm=family == "olmo2",
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        rope_theta=theta,
        norm_eps=float(hf_config.rms_norm_eps),
        init_std=float(getattr(hf_config, "initializer_range", 0.02) or 0.02),
        max_seq_len=int(getattr(hf_config, "max_position_embeddings", 2048)),
        positions="shared",
    )
    fields.update(variant)
    return PHDConfig(**fields)


def _layer_names(norm: str, qk_norm: bool) -> dict[str, str]:
    """native suffix -> transformers suffix, inside one layer."""
    names = {
        "attn.wq.weight": "self_attn.q_proj.weight",
        "attn.wk.weight": "self_attn.k_proj.weight",
        "attn.wv.weight": "self_attn.v_proj.weight",
        "attn.wo.weight": "self_attn.o_proj.weight",
        "mlp.w_gate.weight": "mlp.gate_proj.weight",
        "mlp.w_up.weight": "mlp.up_proj.weight",
        "mlp.w_down.weight": "mlp.down_proj.weight",
    }
    if norm == "pre":
        names["attn_norm.weight"] = "input_layernorm.weight"
        names["mlp_norm.weight"] = "post_attention_layernorm.weight"
    else:
        names["attn_norm.weight"] = "post_attention_layernorm.weight"
        names["mlp_norm.weight"] = "post_feedforward_layernorm.weight"
    if qk_norm:
        names.update({"attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight"})
    return names


def name_map(config: PHDConfig) -> dict[str, str]:
    """Every native parameter name -> its transformers name (lm_head left out when tied)."""
    mapping = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not config.tie_embeddings:
        mapping["lm_head.weight"] = "lm_head.weight"
    per_layer = _layer_names(config.norm, config.qk_norm)
    for i in range(config.n_layers):
        mapping.update({f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in per_layer.items()})
    return mapping


def _dequantized_state(hf_model: nn.Module) -> dict[str, Tensor]:
    state = hf_model.state_dict()
    return {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}


def from_transformers(
    hf_model: nn.Module,
    repeat_k: int = 1,
    window: int | None = None,
    chunk: int | None = None,
    positions: str = "shared",
    naive: bool = False,
    attn_backend: str = "auto",
    dtype: torch.dtype = torch.float32,
) -> PHDTransformer:
    """A native PHD model of the given variant with the weights of a transformers Llama / OLMo2 causal LM.

    With repeat_k=1 its logits equal the original's. Raises ConversionError for features the native model lacks
    (rope scaling, biases, other activations, head_dim != hidden/heads) or weights that do not fit.
    """
    config = config_from_transformers(
        hf_model.config, repeat_k=repeat_k, window=window, chunk=chunk, positions=positions, naive=naive,
        attn_backend=attn_backend,
    )
    state = _dequantized_state(hf_model)
    mapping = name_map(config)
    missing = sorted(theirs for theirs in mapping.values() if theirs not in state)
    used = set(mapping.values()) | ({"lm_head.weight"} if config.tie_embeddings else set())
    unexpected = sorted(set(state) - used)
    if missing or unexpected:
        raise ConversionError(
            f"the checkpoint does not fit a {config.norm}-norm Llama/OLMo2 layout: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]} (biases and extra modules are not supported)"
        )
    with torch.device("meta"):
        model = PHDTransformer(config)
    model = model.to_empty(device="cpu").to(dtype)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    ours = {name: state[theirs] for name, theirs in mapping.items()}
    result = model.load_state_dict(ours, strict=False)
    missing_native = [m for m in result.missing_keys if not (config.tie_embeddings and m == "lm_head.weight")]
    if missing_native or result.unexpected_keys:
        raise ConversionError(f"internal name map is incomplete: {missing_native} {result.unexpected_keys}")
    return model.eval()


def to_transformers(model: PHDTransformer, **special_tokens: Any) -> nn.Module:
    """The transformers LlamaForCausalLM (pre-norm) or Olmo2ForCausalLM (post-norm + QK-norm) of a K = 1 model.

    `special_tokens` (bos_token_id, eos_token_id, pad_token_id) go into the transformers config. A model with
    K > 1 is not a vanilla transformer: save it with `PHDForCausalLM.from_native(model).save_pretrained(...)`.
    """
    config = model.config
    if config.repeat_k != 1:
        raise ConversionError(
            f"{config.name} has K={config.repeat_k}: only K = 1 models are vanilla Llama/OLMo2; export it as a "
            "PHD transformers model instead (`phd convert --to phd-hf`, or PHDForCausalLM.from_native)"
        )
    if config.norm == "pre" and config.qk_norm:
        raise ConversionError("a pre-norm model with qk_norm has no transformers equivalent (Llama has no QK-norm)")
    if config.norm == "post" and not config.qk_norm:
        raise ConversionError("a post-norm model without qk_norm has no transformers equivalent (OLMo2 has QK-norm)")
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        initializer_range=config.init_std,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=False,
        **special_tokens,
    )
    if config.norm == "pre":
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_config, cls = LlamaConfig(**common, mlp_bias=False, head_dim=config.head_dim), LlamaForCausalLM
    else:
        from transformers import Olmo2Config, Olmo2ForCausalLM

        hf_config, cls = Olmo2Config(**common), Olmo2ForCausalLM
    hf_model = cls(hf_config)
    ours = model.state_dict()
    theirs = {hf_name: ours[name].detach().clone() for name, hf_name in name_map(config).items()}
    if config.tie_embeddings:
        theirs["lm_head.weight"] = theirs["model.embed_tokens.weight"]
    hf_model.load_state_dict(theirs, strict=True)
    return hf_model.eval()


def load_transformers(source: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a transformers directory or a GGUF file (dequantized by transformers + gguf)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(source)
    if source.suffix == ".gguf":
        if not source.is_file():
            raise ConversionError(f"GGUF file {source} does not exist")
        kwargs: dict[str, Any] = {"gguf_file": source.name}
        root = source.parent
    elif source.is_dir():
        if not (source / "config.json").exists():
            raise ConversionError(f"{source} has no config.json: not a transformers checkpoint directory")
        kwargs, root = {}, source
    else:
        raise ConversionError(f"{source} is neither a transformers checkpoint directory nor a .gguf file")
    if source.suffix == ".gguf":
        _check_gguf_architecture(source)
    # ignore_mismatched_sizes: a tensor of the wrong shape is reported below (transformers would raise, after
    # printing its report) instead of a traceback; the report itself is left out, the line below says it all
    with _quiet_loading_report():
        model, info = AutoModelForCausalLM.from_pretrained(root, dtype=dtype, output_loading_info=True,
                                                           ignore_mismatched_sizes=True, **kwargs)
    # transformers fills weights the file lacks with random ones: a conversion must not invent weights
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k.split("_")[0]: [_describe_key(n) for n in v] for k, v in problems.items() if v}
    if problems:
        shown = "; ".join(f"{kind} {', '.join(names[:4])}{' ...' if len(names) > 4 else ''} ({len(names)})"
                          for kind, names in problems.items())
        raise ConversionError(f"{source} does not hold a complete model: {shown}; convert an unmodified checkpoint")
    try:
        tokenizer = AutoTokenizer.from_pretrained(root, **kwargs)
    except (OSError, ValueError):
        tokenizer = None
    return model.eval(), tokenizer


def _describe_key(key: Any) -> str:
    """A key of transformers' loading info: a name, or for a mismatched tensor (name, file's shape, model's shape)."""
    if isinstance(key, tuple) and len(key) == 3:
        name, found, wanted = key
        return f"{name} (shape {list(found)} in the file, {list(wanted)} for its config.json)"
    return str(key)


@contextlib.contextmanager
def _quiet_loading_report() -> Iterator[None]:
    """Leave out transformers' multi-line LOAD REPORT (a warning of its modeling_utils logger) while loading:
    ConversionError names every missing, unexpected or mismatched weight in one line. Other warnings pass."""
    logger = logging.getLogger("transformers.modeling_utils")
    report = _DropLoadReport()
    logger.addFilter(report)
    try:
        yield
    finally:
        logger.removeFilter(report)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def _check_gguf_architecture(path: Path) -> None:
    """Refuse a GGUF of another architecture before transformers tries to load it."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return  # transformers itself asks for the gguf package
    try:
        field = GGUFReader(str(path)).fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode() if field else None
    except (ValueError, OSError, IndexError) as err:
        raise ConversionError(f"{path} cannot be read as a GGUF file ({err})") from None
    if arch not in FAMILIES:
        raise ConversionError(
            f"{path} holds a {arch!r} GGUF model; phd converts 'llama' and 'olmo2' architectures only"
        )
