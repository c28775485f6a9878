"""`PHDForCausalLM`: a thin transformers adapter over the native `PHDTransformer`.

The weights live in `self.model`, a plain `PHDTransformer`; this class only translates the transformers calling
convention (attention masks, shifted labels, the `Cache`) to the native one. Generation is transformers' own
`GenerationMixin.generate`, decoding through `PHDHFCache` (the native PHD cache and engine).

Padding: the PHD rule never lets a token see a later position, so a right-padded row gives its real tokens exactly
the outputs of the unpadded row. A left-padded batch (the transformers convention for generation) is therefore
moved to the right, run without any mask, and moved back: every row sees positions 0..len-1 as if alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..errors import InputError
from ..inference.padding import padding_offsets, shift_rows
from ..model import PHDTransformer
from .cache import PHDHFCache
from .configuration import PHDHFConfig


class PHDPreTrainedModel(PreTrainedModel):
    config_class = PHDHFConfig
    config: PHDHFConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        # The native model initialises itself (PHDTransformer.reset_parameters); from_pretrained overwrites it.
        if isinstance(module, PHDTransformer):
            module.reset_parameters()


# forward() keywords that ask for something a PHD forward does not compute.
_REFUSED = {
    "position_ids": "positions follow from each row's tokens (left padding is moved away), not from position_ids",
    "output_attentions": "attention weights are not returned",
    "output_hidden_states": "hidden states are not returned",
}


class PHDForCausalLM(PHDPreTrainedModel, GenerationMixin):
    """Causal LM with the transformers interface, a `PHDHFCache` in forward, and transformers' own generate()."""

    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: PHDHFConfig) -> None:
        super().__init__(config)
        self.model = PHDTransformer(config.to_phd())
        self.post_init()

    @classmethod
    def from_native(cls, model: PHDTransformer, **special_tokens: int | None) -> PHDForCausalLM:
        """Wrap a native model (its weights are shared, not copied)."""
        config = PHDHFConfig.from_phd(model.config, **special_tokens)
        with torch.device("meta"):
            hf_model = cls(config)
        hf_model.model = model
        return hf_model.train(model.training)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.model.lm_head = value

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

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> None:
        """transformers' save, plus the configuration / modeling files `trust_remote_code=True` loads."""
        from .remote_code import AUTO_MAP, write_remote_code

        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory)

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
        0 get logits 0 and no loss.
        """
        if input_ids is None:
            raise ValueError("PHDForCausalLM needs input_ids: every token is repeated K times from its embedding")
        if inputs_embeds is not None:
            raise ValueError("PHDForCausalLM takes no inputs_embeds: a PHD model repeats each token's embedding")
        for name, why in _REFUSED.items():
            if kwargs.get(name) is not None and kwargs.get(name) is not False:
                raise ValueError(f"PHDForCausalLM.forward does not take {name}: {why}")
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
        if cache is not None and cache.is_initialized:
            _check_continuation(input_ids, attention_mask)
            logits = cache.append(self.model, input_ids)
        elif cache is not None and not torch.is_grad_enabled():  # one pass fills the cache and gives the logits
            every = logits_to_keep != 1 or labels is not None
            logits = cache.prefill(self.model, input_ids, attention_mask, all_logits=every)
            logits = _back_to_padding(logits, attention_mask) if every else logits[:, None]
        else:  # gradients need the autograd forward; the engine (inference mode) then fills the cache
            logits = self._forward_full(input_ids, attention_mask)
            if cache is not None:
                cache.prefill(self.model, input_ids, attention_mask, all_logits=False)
        loss = None
        if labels is not None:
            loss = self._loss(logits, labels, attention_mask, kwargs.get("num_items_in_batch"))
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        if logits.is_inference():  # the engine runs under inference_mode; callers may edit logits in place
            logits = logits.clone()
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)

    def _forward_full(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        if attention_mask is None:
            return self.model(input_ids).logits
        starts, _ = padding_offsets(attention_mask)
        return shift_rows(self.model(shift_rows(input_ids, starts, fill=0)).logits, -starts, fill=0.0)

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
