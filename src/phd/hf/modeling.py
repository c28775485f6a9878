"""`PHDForCausalLM` and `PHDModel`: thin transformers adapters over the native `PHDTransformer`.

The weights live in `self.model`, a plain `PHDTransformer` (whose projections also answer to Llama's names, see
llama_names.py); these classes only translate the transformers calling convention (attention masks, shifted
labels, the `Cache`) to the native one. Generation is transformers' own `GenerationMixin.generate`, decoding
through `PHDHFCache` (the native PHD cache and engine). `PHDModel` (what `AutoModel` loads) returns the hidden
states the LM head would read.

Padding: the PHD rule never lets a token see a later position, so a right-padded row gives its real tokens exactly
the outputs of the unpadded row. A left-padded batch (the transformers convention for generation) is therefore
moved to the right, run without any mask, and moved back: every row sees positions 0..len-1 as if alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..checks import warn_past_max_len
from ..errors import InputError
from ..inference.padding import padding_offsets, shift_rows
from ..io import check_saved_weights, record_config
from ..model import PHDTransformer
from .cache import PHDHFCache
from .configuration import PHDHFConfig
from .llama_names import add_llama_names, named_modules_with_aliases


class PHDPreTrainedModel(PreTrainedModel):
    """What both PHD classes share: the native model in `self.model` (the same weight names in both, so either
    loads the other's folder), the Llama names of its projections, and the checks of forward's inputs."""

    config_class = PHDHFConfig
    config: PHDHFConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: PHDHFConfig) -> None:
        super().__init__(config)
        self.model = self._native(PHDTransformer(config.to_phd()))
        self.post_init()

    @staticmethod
    def _native(model: PHDTransformer) -> PHDTransformer:
        add_llama_names(model)
        return model

    @classmethod
    def from_native(cls, model: PHDTransformer, **special_tokens: int | None) -> Any:
        """Wrap a native model (its weights are shared, not copied)."""
        config = PHDHFConfig.from_phd(model.config, **special_tokens)
        with torch.device("meta"):
            hf_model = cls(config)
        hf_model.model = cls._native(model)
        return hf_model.train(model.training)

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> None:
        """transformers' save, plus the configuration / modeling files `trust_remote_code=True` loads, and the config
        recorded in the weights' metadata (io.record_config), so that loading refuses a config.json edited later."""
        from .remote_code import AUTO_MAP, write_remote_code

        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory)
        if kwargs.get("is_main_process", True):
            record_config(save_directory, self.config.to_phd())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' load, refused (CheckpointError, one line) when a local folder's config.json contradicts the
        config its weights were written with: the model would run as another variant (io.check_recorded_config)."""
        folder = None if pretrained_model_name_or_path is None else Path(pretrained_model_name_or_path)
        check_saved_weights(folder and folder / (kwargs.get("subfolder") or ""))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        # The native model initialises itself (PHDTransformer.reset_parameters); from_pretrained overwrites it.
        if isinstance(module, PHDTransformer):
            module.reset_parameters()

    def named_modules(self, memo: set | None = None, prefix: str = "", remove_duplicate: bool = True) -> Any:
        """torch's list, then each projection again under its Llama name (q_proj, ..., down_proj), which is how
        PEFT finds `target_modules=["q_proj", "v_proj"]` (llama_names.py). Only when duplicates are removed (the
        default): a caller asking for every name of every module (functional_call, export) gets torch's own."""
        named = super().named_modules(memo, prefix, remove_duplicate)
        return named_modules_with_aliases(named) if remove_duplicate else named

    def modules(self) -> Any:
        """Every module once (the Llama-name aliases of named_modules left out)."""
        for _, module in super().named_modules():
            yield module

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embed = value

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> torch.nn.Embedding:
        """transformers' resize, then the native config follows (the engine checks token ids against it)."""
        embeddings = super().resize_token_embeddings(*args, **kwargs)
        self.model.config = self.config.to_phd()
        return embeddings

    # transformers' activation-checkpointing switch (gradient_checkpointing_enable, Trainer) sets these two; the
    # native model's own switch (`checkpoint_fn`, also what `phd train` sets) does the work.
    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.checkpoint_fn is not None

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        function: Callable | None = getattr(self, "_gradient_checkpointing_func", None)
        self.model.checkpoint_fn = function if enable else None

    def _unpadded(self, run: Callable[[Tensor], Tensor], input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """run(input_ids) [B, T, ...] for a padded batch: rows moved to the right (each row as if alone), run, and
        moved back; padding positions get 0."""
        if attention_mask is None:
            return run(input_ids)
        starts, _ = padding_offsets(attention_mask)
        return shift_rows(run(shift_rows(input_ids, starts, fill=0)), -starts, fill=0.0)


# forward() keywords that ask for something a PHD forward does not compute.
_REFUSED = {
    "position_ids": "positions follow from each row's tokens (left padding is moved away), not from position_ids",
    "output_attentions": "attention weights are not returned",
    "output_hidden_states": "hidden states are not returned",
}


def _check_inputs(model: str, input_ids: Tensor | None, inputs_embeds: Tensor | None, kwargs: dict[str, Any]) -> None:
    """forward() of either class: token ids in, and nothing asked for that a PHD forward does not compute."""
    if input_ids is None:
        raise ValueError(f"{model} needs input_ids: every token is repeated K times from its embedding")
    if inputs_embeds is not None:
        raise ValueError(f"{model} takes no inputs_embeds: a PHD model repeats each token's embedding")
    for name, why in _REFUSED.items():
        if kwargs.get(name) is not None and kwargs.get(name) is not False:
            raise ValueError(f"{model}.forward does not take {name}: {why}")


class PHDModel(PHDPreTrainedModel):
    """The base model (`AutoModel`): hidden states of the final copies after the final norm [B, T, d], what the
    LM head reads, as Llama's `last_hidden_state`. It reads a `PHDForCausalLM` folder as is (same weight names;
    the LM head's weight is loaded but not used)."""

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """Padding as in PHDForCausalLM (left padding moved away; padding positions get 0). No cache: decoding
        with one is PHDForCausalLM's (its cache is the native engine's, which returns logits)."""
        _check_inputs(type(self).__name__, input_ids, inputs_embeds, kwargs)
        if past_key_values is not None or use_cache:
            raise ValueError("PHDModel has no cache: decode with PHDForCausalLM (AutoModelForCausalLM)")
        hidden = self._unpadded(self.model.final_states, input_ids, attention_mask)
        return BaseModelOutputWithPast(last_hidden_state=hidden)


class PHDForCausalLM(PHDPreTrainedModel, GenerationMixin):
    """Causal LM with the transformers interface, a `PHDHFCache` in forward, and transformers' own generate()."""

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.model.lm_head = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: PHDHFCache | None = None,
        labels: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits [B, T, vocab]; with `labels` the mean next-token loss (shifted inside, -100 ignored).

        Without a cache it is the full training-time forward. With `use_cache` (default in eval mode without
        labels, like Llama) the prompt fills a new `PHDHFCache`, returned as `past_key_values`; passing it back
        decodes the new tokens against it, each at its row's next position. Positions where `attention_mask` is
        0 get logits 0 and no loss. Decoding against a filled cache computes no gradients, so it is refused
        while gradients are on (_check_decode_without_grad). Past max_position_embeddings: a LengthWarning.
        """
        _check_inputs(type(self).__name__, input_ids, inputs_embeds, kwargs)
        cache = past_key_values
        if cache is not None and not isinstance(cache, PHDHFCache):
            raise ValueError(
                f"past_key_values is a {type(cache).__name__}; a PHD model decodes with its own cache: pass "
                "use_cache=True (it returns a PHDHFCache) or a PHDHFCache, or none"
            )
        if use_cache is None:
            use_cache = cache is not None or (self.config.use_cache and not self.training and labels is None)
        if cache is None and use_cache:
            cache = PHDHFCache(self.model.config)
        if kwargs.get("cache_position") is not None:  # the columns the new tokens take: after what the cache holds
            start = cache.columns if cache is not None and cache.is_initialized else 0
            _check_cache_position(kwargs["cache_position"], start, input_ids.shape[1])
        from_engine = cache is not None and (cache.is_initialized or not torch.is_grad_enabled())
        if cache is not None and cache.is_initialized:
            _check_continuation(input_ids, attention_mask)
            self._check_decode_without_grad()
            warn_past_max_len(self.config.max_position_embeddings, cache.columns + input_ids.shape[1])
            logits = cache.append(self.model, input_ids)
        elif from_engine:  # one pass fills the cache and gives the logits
            warn_past_max_len(self.config.max_position_embeddings, input_ids.shape[1])
            every = logits_to_keep != 1 or labels is not None
            logits = cache.prefill(self.model, input_ids, attention_mask, all_logits=every)
            logits = _back_to_padding(logits, attention_mask) if every else logits[:, None]
        else:  # gradients need the autograd forward; the engine (inference mode) then fills the cache
            logits = self._unpadded(lambda ids: self.model(ids).logits, input_ids, attention_mask)
            if cache is not None:
                cache.prefill(self.model, input_ids, attention_mask, all_logits=False)
        loss = None
        if labels is not None:
            loss = self._loss(logits, labels, attention_mask, kwargs.get("num_items_in_batch"))
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        # The engine runs under inference_mode; callers may edit logits in place. (Asked only of the engine's
        # logits: `is_inference()` would break a compiled graph of the training forward.)
        if from_engine and logits.is_inference():
            logits = logits.clone()
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)

    def _check_decode_without_grad(self) -> None:
        """Decode steps run in the native engine under inference mode: their logits carry no gradient. With
        gradients on (and parameters that want them) that is refused, rather than handing back logits a loss
        cannot reach (a loss over prompt and decode logits would silently get only the prompt's gradient)."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            raise InputError(
                "decoding against a PHDHFCache computes no gradients (the cache is filled and read by the native "
                "inference engine), so it is refused while gradients are enabled: run the decode loop under "
                "torch.no_grad() (as generate() does), or, for differentiable logits, run the whole sequence "
                "through forward without a cache (use_cache=False)"
            )

    @staticmethod
    def _loss(logits: Tensor, labels: Tensor, attention_mask: Tensor | None, num_items: Any) -> Tensor:
        targets = labels[:, 1:].clone()
        if attention_mask is not None:
            keep = attention_mask.to(torch.bool)
            targets = targets.masked_fill(~keep[:, 1:] | ~keep[:, :-1], -100)
        flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        if num_items is None:
            return F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100)
        # Trainer's gradient accumulation: the sum over the accumulated batches' tokens, divided once
        total = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100, reduction="sum")
        return total / torch.as_tensor(num_items, device=total.device)

    def _prepare_cache_for_generation(
        self, generation_config: GenerationConfig, model_kwargs: dict, *args: Any, **kwargs: Any
    ) -> None:
        """transformers' generate() would make a DynamicCache: a PHD model decodes with a `PHDHFCache`, sized to
        the generation's max_length (it still grows if needed)."""
        if model_kwargs.get("past_key_values") is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not available for PHD models: "
                "they decode with their own cache (PHDHFCache); leave cache_implementation unset"
            )
        model_kwargs["past_key_values"] = PHDHFCache(self.model.config, max_len=generation_config.max_length)


def _check_continuation(input_ids: Tensor, attention_mask: Tensor | None) -> None:
    """New tokens after a filled cache: no padding among them (the cache places them after its last column)."""
    n = input_ids.shape[1]
    if attention_mask is not None and not bool(attention_mask[:, -n:].bool().all()):
        raise ValueError(
            "attention_mask marks padding among the new tokens: after the prompt, every new token is real "
            "(pad the prompt instead, on the left)"
        )


def _check_cache_position(cache_position: Tensor, start: int, n: int) -> None:
    """A PHD model places new tokens after the columns its cache holds (`start`, 0 without one); a cache_position
    saying otherwise (behind: tokens again, ahead: a gap) would silently score them at other positions."""
    cache_position = torch.as_tensor(cache_position)
    expected = torch.arange(start, start + n, device=cache_position.device)
    if cache_position.dim() in (1, 2) and cache_position.shape[-1] == n and bool((cache_position == expected).all()):
        return
    flat = cache_position.reshape(-1).tolist()
    given = f"{flat[0]}..{flat[-1]} ({len(flat)} values)" if flat else "empty"
    raise InputError(
        f"cache_position is {given} but the {n} new tokens come after the {start} columns the cache holds: pass "
        f"cache_position=torch.arange({start}, {start + n}), or none (a PHD cache places the tokens itself)"
    )


def _back_to_padding(logits: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Logits of right-moved rows [B, T, V] back to the input's padding layout (padding positions: 0)."""
    if attention_mask is None:
        return logits
    starts, _ = padding_offsets(attention_mask)
    return shift_rows(logits, -starts, fill=0.0)
