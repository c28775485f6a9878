"""`PHDForCausalLM`: a thin transformers adapter over the native `PHDTransformer`.

The weights live in `self.model`, a plain `PHDTransformer`; this class only translates the transformers calling
convention (attention masks, shifted labels, `generate`) to the native one.

Padding: the PHD rule never lets a token see a later position, so a right-padded row gives its real tokens exactly
the outputs of the unpadded row. A left-padded batch (the transformers convention for generation) is therefore
moved to the right, run without any mask, and moved back: every row sees positions 0..len-1 as if alone.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..model import PHDTransformer
from .configuration import PHDHFConfig


def padding_offsets(attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Start and length of the real tokens of every row; raises unless each row is one contiguous run of 1s."""
    mask = attention_mask.to(torch.bool)
    lengths = mask.sum(dim=1)
    starts = torch.where(lengths > 0, mask.int().argmax(dim=1), torch.zeros_like(lengths))
    cols = torch.arange(mask.shape[1], device=mask.device)
    expected = (cols >= starts[:, None]) & (cols < (starts + lengths)[:, None])
    if not torch.equal(expected, mask):
        raise ValueError(
            "attention_mask must mark one contiguous run of tokens per row (left or right padding); masks with "
            "holes (packed sequences) are not supported by PHD models"
        )
    return starts, lengths


def shift_rows(x: Tensor, shifts: Tensor, fill: int | float = 0) -> Tensor:
    """out[b, t] = x[b, t + shifts[b]] where that index is in range, else `fill` ([B, T, ...] tensors)."""
    t = x.shape[1]
    src = torch.arange(t, device=x.device)[None, :] + shifts[:, None]
    valid = (src >= 0) & (src < t)
    index = src.clamp(0, t - 1)
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    out = torch.gather(x, 1, index)
    return out.masked_fill(~valid.view(*valid.shape, *([1] * (x.dim() - 2))), fill)


class PHDPreTrainedModel(PreTrainedModel):
    config_class = PHDHFConfig
    config: PHDHFConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        # The native model initialises itself (PHDTransformer.reset_parameters); from_pretrained overwrites it.
        if isinstance(module, PHDTransformer):
            module.reset_parameters()


class PHDForCausalLM(PHDPreTrainedModel, GenerationMixin):
    """Causal LM with the transformers interface; `generate()` runs the native PHD cache (see `generate`)."""

    # GenerationConfig fields generate() honours.
    _GENERATION_FIELDS = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p",
                          "repetition_penalty", "eos_token_id", "pad_token_id", "num_beams", "num_return_sequences",
                          "bos_token_id", "use_cache")
    # GenerationConfig fields that would change the result and that generate() does not implement: refused when set
    # (typical_p also counts as unset at 1.0, its "off" value).
    _UNSUPPORTED_GENERATION = ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
                               "output_hidden_states", "min_new_tokens", "min_length", "no_repeat_ngram_size",
                               "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "stop_strings",
                               "penalty_alpha", "typical_p", "epsilon_cutoff", "eta_cutoff", "min_p")

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

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        past_key_values: object | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: object,
    ) -> CausalLMOutputWithPast:
        """Logits [B, T, vocab] of the full training-time forward; `labels` as in transformers (shifted inside).

        Positions where `attention_mask` is 0 get logits 0 and are left out of the loss.
        """
        if input_ids is None:
            raise ValueError("PHDForCausalLM needs input_ids: every token is repeated K times from its embedding")
        if inputs_embeds is not None or past_key_values is not None:
            raise ValueError(
                "PHDForCausalLM.forward takes neither inputs_embeds nor past_key_values: it is the full training-time "
                "forward; use generate() for cached decoding"
            )
        if attention_mask is None:
            logits = self.model(input_ids).logits
            keep = None
        else:
            starts, _ = padding_offsets(attention_mask)
            right = shift_rows(input_ids, starts, fill=0)
            logits = shift_rows(self.model(right).logits, -starts, fill=0.0)
            keep = attention_mask.to(torch.bool)
        loss = None
        if labels is not None:
            targets = labels[:, 1:].clone()
            if keep is not None:
                targets = targets.masked_fill(~keep[:, 1:] | ~keep[:, :-1], -100)
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
            )
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        seed: int | None = None,
        **kwargs: object,
    ) -> Tensor:
        """Greedy or sampled decoding with the PHD KV cache (`phd.generate`): prefill once, then one step per token.

        Memory is a vanilla KV cache plus the hidden window (spec section 6), not K times the cache. Takes
        transformers' usual arguments (max_new_tokens / max_length, do_sample, temperature, top_k, top_p,
        repetition_penalty, eos_token_id, pad_token_id) and a left- or right-padded batch with its
        attention_mask; returns [B, T + new] like transformers: each row's input, then its new tokens, then
        pad_token_id after its end-of-sequence token. Beam search and logits processors are not supported.
        """
        from ..inference import generate as phd_generate

        if input_ids is None:
            raise ValueError("generate() needs input_ids (the prompt token ids, [batch, seq_len])")
        config = copy.deepcopy(generation_config or self.generation_config)
        unknown = config.update(**kwargs)
        if unknown:
            raise ValueError(
                f"generate() does not support {sorted(unknown)}: PHDForCausalLM.generate takes input_ids, "
                f"attention_mask, seed and the GenerationConfig fields {list(self._GENERATION_FIELDS)}"
            )
        if (config.num_beams or 1) != 1 or (config.num_return_sequences or 1) != 1:
            raise ValueError("beam search / several sequences per prompt are not supported: use num_beams=1")
        unsupported = [
            name for name in self._UNSUPPORTED_GENERATION
            if getattr(config, name, None) and not (name == "typical_p" and config.typical_p == 1.0)
        ]
        if unsupported:
            raise ValueError(
                f"generate() does not support {unsupported}: it returns the token ids of greedy or sampled decoding "
                f"and honours only {list(self._GENERATION_FIELDS)}"
            )
        b, t = input_ids.shape
        if config.max_new_tokens is not None:
            max_new = config.max_new_tokens
        else:
            max_new = max((config.max_length or 20) - t, 0)
        eos = config.eos_token_id if config.eos_token_id is not None else self.config.eos_token_id
        stops = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        pad = config.pad_token_id if config.pad_token_id is not None else (stops[0] if stops else 0)
        if attention_mask is None:
            starts = torch.zeros(b, dtype=torch.long, device=input_ids.device)
            lengths = torch.full((b,), t, dtype=torch.long, device=input_ids.device)
        else:
            starts, lengths = padding_offsets(attention_mask)
        sampled = bool(config.do_sample)
        out = phd_generate(
            self.model,
            shift_rows(input_ids, starts, fill=pad),
            max_new,
            temperature=float(config.temperature or 1.0) if sampled else 0.0,
            top_k=(config.top_k or None) if sampled else None,
            top_p=(config.top_p if config.top_p is not None and config.top_p < 1 else None) if sampled else None,
            repetition_penalty=float(config.repetition_penalty or 1.0),
            stop_tokens=stops,
            seed=seed,
            lengths=lengths,
            pad_id=pad,
        )
        steps = out.shape[1] - t
        new = torch.gather(out, 1, lengths[:, None] + torch.arange(steps, device=out.device))
        return torch.cat([input_ids, new], dim=1)
