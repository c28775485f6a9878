"""`PHDForCausalLM` for vLLM: the native `PHDTransformer` (its modules, its weights), with vLLM's paged attention
as one more attention callable of the layer.

One forward step runs, per layer, ONE block call over [the batch's originals | the hidden set]:
- originals (copy 1, the tokens vLLM scheduled): their K/V go to vLLM's paged KV cache through vLLM's
  `Attention` layer, which also attends them (exactly vanilla; the cache is exactly a vanilla model's);
- the hidden set (copies 2..K) of each request: the positions the future reads (the native engine's bounded
  prefill widths, `hidden_widths`; one position in decode). Its queries attend, with the mask of
  `masks.allowed`, the request's originals read back from the paged cache, its hidden window (per-request
  state, `HiddenWindows`) and the hidden set itself; the closure then moves the window forward.
Logits come from copy K of each request's last position, placed on the row vLLM samples from.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention

from ..config import PHDConfig
from ..hfnames import config_from_transformers_fields
from ..inference.engine import hidden_widths
from ..masks import allowed, rope_position
from ..model import Attend, PHDTransformer
from .state import HiddenWindows, PagedReader, WindowBatch, block_size


@dataclass
class _Step:
    """What one forward step knows about its requests (host-side sizes, device tensors)."""

    query_start: Tensor  # [R + 1] token offsets of the requests in the batch
    seq_lens: Tensor  # [R] tokens of each request after this step
    block_table: Tensor  # [R, blocks]
    last: Tensor  # [R] position of each request's last token
    floor: Tensor  # [R] first position whose hidden tokens this step computes (>= the step's first position)
    fresh: Tensor  # [R] the step starts the request at position 0 (a prefill or a recompute after preemption)


class PHDForCausalLM(nn.Module):
    """vLLM model class of model_type "phd"; weights as saved by `PHDForCausalLM.save_pretrained` (`model.*`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        hf_config = vllm_config.model_config.hf_config
        cfg = config_from_transformers_fields(hf_config.to_dict())
        if cfg.naive and cfg.repeat_k > 1:
            raise ValueError("naive repetition (repeat-K) caches all K copies; vLLM serving covers PHD variants only")
        self.config = cfg
        self.model = PHDTransformer(cfg)
        prefix = f"{prefix}." if prefix else ""
        self.paged = nn.ModuleList(
            Attention(cfg.n_heads, cfg.head_dim, cfg.head_dim**-0.5, cfg.n_kv_heads,
                      cache_config=vllm_config.cache_config, prefix=f"{prefix}paged.{i}")
            for i in range(cfg.n_layers)
        )
        self.windows = HiddenWindows(cfg) if cfg.repeat_k > 1 and cfg.window else None
        self.reader: PagedReader | None = None  # probed once the cache exists (every layer stores alike)

    # ----- the vLLM model interface -----
    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return self.model.embed(input_ids)

    def forward(self, input_ids: Tensor, positions: Tensor, intermediate_tensors: object = None,
                inputs_embeds: Tensor | None = None, **_: object) -> Tensor:
        """Hidden states [N, d] after the final norm; each request's last row holds its copy K's."""
        model, cfg = self.model, self.config
        x = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        n = x.shape[0]
        step = self._step()
        if step is None or cfg.repeat_k == 1:  # vanilla, or a profiling run without metadata
            cos, sin = model.rope(rope_position(positions, 1, model.config.repeat_k, model.config.positions))
            h = x[None]
            for block, paged in zip(model.layers, self.paged, strict=True):
                h = block(h, cos, sin, _paged_attend(paged, n))
            return model.norm(h[0])
        return self._forward_phd(x, positions, step)

    def compute_logits(self, hidden_states: Tensor) -> Tensor:
        return self.model.lm_head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """Copy the checkpoint's `model.*` tensors into the native model; every parameter must be given."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name not in params:
                if self.config.tie_embeddings and name == "model.lm_head.weight":
                    continue
                raise ValueError(f"checkpoint tensor {name} has no place in {self.config.name}")
            params[name].data.copy_(tensor)
            loaded.add(name)
        missing = [name for name in params if name.startswith("model.") and name not in loaded]
        if missing:
            raise ValueError(f"the checkpoint lacks {missing[:5]} for {self.config.name}")
        return set(params)

    # ----- PHD -----
    def _step(self) -> _Step | None:
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, list):
            raise NotImplementedError("PHD models do not support micro-batching (ubatching)")
        meta = None if metadata is None else metadata.get(self.paged[0].layer_name)
        if meta is None:
            return None
        r = meta.seq_lens.shape[0]
        query_start = meta.query_start_loc[: r + 1].long()
        seq_lens = meta.seq_lens.long()
        last = seq_lens - 1
        start = seq_lens - (query_start[1:] - query_start[:-1])
        chunk = self.config.chunk
        floor = torch.maximum(start, last // chunk * chunk) if chunk else start
        return _Step(query_start, seq_lens, meta.block_table[:r], last, floor, start == 0)

    def _reader(self) -> PagedReader:
        if self.reader is None:
            self.reader = PagedReader.probe(self.paged[0])
        return self.reader

    def _forward_phd(self, x: Tensor, positions: Tensor, step: _Step) -> Tensor:
        model, cfg = self.model, self.config
        k1 = cfg.repeat_k - 1
        n = x.shape[0]
        longest = int((step.last - step.floor).max()) + 1
        widths = [min(keys, longest) for keys, _ in hidden_widths(cfg, longest)]
        hidden = _HiddenSet.build(model, x, step, widths[0], k1)
        windows = None
        if self.windows is not None:
            size = block_size(self.paged[0].kv_cache)
            windows = self.windows.load(step.block_table, step.seq_lens, step.fresh, size, x)
        cos_o, sin_o = model.rope(rope_position(positions, 1, model.config.repeat_k, model.config.positions))
        h_o = x
        for i, (block, paged) in enumerate(zip(model.layers, self.paged, strict=True)):
            if i:
                hidden = hidden.last(widths[i] * k1)
            cos, sin = torch.cat([cos_o, hidden.cos]), torch.cat([sin_o, hidden.sin])
            attend = _phd_attend(paged, self._reader(), n, hidden, step, cfg, windows, i)
            h = block(torch.cat([h_o, hidden.x.flatten(0, 1)])[None], cos, sin, attend)[0]
            h_o, hidden.x = h[:n], h[n:].view_as(hidden.x)
        if windows is not None:
            self.windows.store(step.block_table, windows)
        out = h_o.clone()
        out[step.query_start[1:] - 1] = hidden.x[:, -1]
        return model.norm(out)


@dataclass
class _HiddenSet:
    """Hidden tokens of every request, [R, P*(K-1)] position-major, ending at the request's last position; a row's
    positions before its floor are padding (`valid` False)."""

    x: Tensor  # [R, M, d]
    pos: Tensor  # [R, M]
    copy: Tensor  # [M]
    valid: Tensor  # [R, M]
    cos: Tensor  # [R*M, D]
    sin: Tensor

    @classmethod
    def build(cls, model: PHDTransformer, x: Tensor, step: _Step, width: int, k1: int) -> _HiddenSet:
        offsets = torch.arange(1 - width, 1, device=x.device)
        pos = (step.last[:, None] + offsets).repeat_interleave(k1, dim=1)
        copy = torch.arange(2, k1 + 2, device=x.device).repeat(width)
        valid = pos >= step.floor[:, None]
        # Token of position p in this step's batch: the request's row + p - its first position.
        start = step.seq_lens - (step.query_start[1:] - step.query_start[:-1])
        row = (step.query_start[:-1, None] + pos - start[:, None]).clamp(min=0, max=x.shape[0] - 1)
        cos, sin = model.rope(rope_position(pos, copy, model.config.repeat_k, model.config.positions).flatten())
        return cls(x[row], pos, copy, valid, cos, sin)

    def last(self, m: int) -> _HiddenSet:
        r = self.pos.shape[0]
        keep = self.pos.shape[1] - m
        cos, sin = (t.view(r, -1, t.shape[-1])[:, keep:].flatten(0, 1) for t in (self.cos, self.sin))
        return _HiddenSet(self.x[:, keep:], self.pos[:, keep:], self.copy[keep:], self.valid[:, keep:], cos, sin)


def _paged_attend(paged: Attention, n: int) -> Attend:
    """Attention of the n originals through vLLM (writes their K/V to the paged cache): [1, H, n, D] in and out."""

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        h, d = q.shape[1], q.shape[-1]
        flat = [t[0, :, :n].transpose(0, 1).reshape(n, -1) for t in (q, k, v)]
        return paged(*flat).view(n, h, d).transpose(0, 1)[None]

    return attend


def _phd_attend(paged: Attention, reader: PagedReader, n: int, hidden: _HiddenSet, step: _Step, cfg: PHDConfig,
                windows: WindowBatch | None, layer: int) -> Attend:
    """Attention of [n originals | hidden set] (q, k, v [1, heads, n + R*M, D]): the originals through vLLM,
    the hidden set against its request's paged originals, hidden window and itself (rule: `masks.allowed`).
    Afterwards the layer's hidden window moves forward to the set's last W positions."""
    originals = _paged_attend(paged, n)

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        o_o = originals(q, k, v)  # first: the cache then holds this step's originals
        r, m = hidden.pos.shape
        q_h, k_h, v_h = (t[0, :, n:].unflatten(1, (r, m)).transpose(0, 1) for t in (q, k, v))  # [R, heads, M, D]
        length = int(step.seq_lens.max())
        k_o, v_o = reader.read(paged.kv_cache, step.block_table, step.seq_lens, length)
        o_pos = torch.arange(length, device=q.device).expand(r, -1)
        keys, values = [k_o, k_h], [v_o, v_h]
        key_pos, key_copy = [o_pos, hidden.pos], [torch.ones_like(o_pos[0]), hidden.copy]
        key_valid = [o_pos < step.seq_lens[:, None], hidden.valid]
        if windows is not None:
            w_k, w_v = windows.kv_of(layer)
            keys.insert(1, w_k)
            values.insert(1, w_v)
            key_pos.insert(1, windows.pos[layer])
            key_copy.insert(1, windows.copy)
            key_valid.insert(1, windows.pos[layer] >= 0)
        key_pos_t, key_copy_t, key_valid_t = (torch.cat(t, dim=-1) for t in (key_pos, key_copy, key_valid))
        mask = allowed(hidden.pos[..., None], hidden.copy[:, None], key_pos_t[:, None], key_copy_t,
                       cfg.window, cfg.chunk)
        # Padding queries may see any allowed key (no empty softmax row); real queries see only real keys.
        mask = mask & (key_valid_t[:, None] | ~hidden.valid[..., None])
        o_h = F.scaled_dot_product_attention(q_h, torch.cat(keys, 2), torch.cat(values, 2), attn_mask=mask[:, None],
                                             enable_gqa=q_h.shape[1] != k_h.shape[1])
        if windows is not None:
            windows.advance(layer, k_h, v_h, hidden.pos, hidden.valid)
        return torch.cat([o_o, o_h.transpose(0, 1).flatten(1, 2)[None]], dim=2)

    return attend
