"""`PHDForCausalLM` for vLLM: the native `PHDTransformer` (its modules, its weights), with vLLM's paged attention
as one more attention callable of the layer.

One forward step runs, per layer, ONE block call over [the batch's originals | the hidden set]:
- originals (copy 1, the tokens vLLM scheduled): their K/V go to vLLM's paged KV cache through vLLM's
  `Attention` layer, which also attends them (exactly vanilla; the cache is exactly a vanilla model's);
- the hidden set (copies 2..K) of each request: the positions the future reads (the native engine's bounded
  prefill widths, `hidden_widths`; one position in decode). Its queries attend, with the mask of
  `masks.allowed`, the request's originals read back from the paged cache, its hidden window (per-request
  state, `WindowPool`) and the hidden set itself; then the set's newest entries go to the window.
Logits come from copy K of each request's last position, placed on the row vLLM samples from.

Cost: everything that does not depend on the layer (the hidden set's positions, RoPE, the mask, the block ids
to read, the windows' rows) is built once per step (`_StepPlan`); a layer adds one read of the paged blocks
into the buffer the hidden queries attend, one SDPA and the window write. In decode the hidden set keeps its
size across layers, so [originals | hidden set] stays one tensor from the first layer to the last.

Decode steps where the hidden_attention kernel serves the cache (float32 CPU) take `_forward_decode` instead: the
native engine's decode step over vLLM's cache. Each request's K copies are one sequence of the block (layer 0
projects their shared input once, the last layer queries copy K alone); per layer vLLM's cache update writes the
originals' K/V, and one kernel call attends all K copies, the original included (vLLM's attention is not called:
it would attend the same keys a second time). Its reference is the path above (tests/test_vllm.py runs both).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.attention.attention import unified_kv_cache_update

from ..config import PHDConfig
from ..hfnames import config_from_transformers_fields
from ..inference.engine import decode_layers, hidden_widths
from ..inference.kernels import hidden_attention_op
from ..inference.weights import kernel_linears, packed_linears, packing_available
from ..masks import allowed, rope_position, visible
from ..model import Attend, PHDTransformer
from .config import logger
from .state import PagedReader, ReadPlan, WindowPool, WindowStep, block_size


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
        self.windows = WindowPool(cfg) if cfg.repeat_k > 1 and cfg.window else None
        self.reader: PagedReader | None = None  # probed once the cache exists (every layer stores alike)
        self.kernel: Callable | None = None  # hidden_attention where it serves this cache (decided with the reader)
        self.no_window: tuple[Tensor, Tensor] | None = None  # the kernel's window arguments without a window: empty
        self.max_rows = cfg.repeat_k * vllm_config.scheduler_config.max_num_seqs  # the largest decode step's rows

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
        if self._fuses(step, n):
            return self._forward_decode(x, step)
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
            with torch.no_grad():
                params[name].copy_(tensor)  # not through .data: the copy bumps the version, so no pack outlives it
            loaded.add(name)
        missing = [name for name in params if name.startswith("model.") and name not in loaded]
        if missing:
            raise ValueError(f"the checkpoint lacks {missing[:5]} for {self.config.name}")
        kernel_linears(self.model)  # float32 on the CPU: steps of up to 8 rows on the rows kernel (PHD_KERNELS=0: off)
        self._pack_linears()
        return set(params)

    def _pack_linears(self) -> None:
        """Steps above the rows kernel's 8 rows (K rows per request), up to the largest decode step's, on MKL packs
        made once for that step: what the native engine does per batch, for vLLM's batches that change size every
        step. One more copy of the linears' weights, said in the log; `PHD_VLLM_PACKS=0` turns it off."""
        if os.environ.get("PHD_VLLM_PACKS", "1") == "0":
            return
        if not packing_available():
            logger.info("PHD: no MKL packed GEMM in this PyTorch: steps of more than 8 rows run PyTorch's GEMM")
            return
        n = packed_linears(self.model, min(max(self.max_rows, 16), 256))
        if n:
            size = sum(m.weight.numel() * m.weight.element_size() for m in self.model.modules()
                       if getattr(m, "packed_any", False))
            logger.info("PHD: %d linears packed by MKL for steps of more than 8 rows (%.0f MiB more memory; "
                        "PHD_VLLM_PACKS=0 turns this off)", n, size / 2**20)

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
        return _Step(query_start, seq_lens, meta.block_table[:r], last, floor, start == 0, int(seq_lens.max()))

    def _reader(self) -> PagedReader:
        if self.reader is None:
            self.reader = PagedReader.probe(self.paged[0])
            cache = self.paged[0].kv_cache
            if (None not in self.reader.strides and cache.device.type == "cpu" and cache.dtype == torch.float32
                    and cache.is_contiguous()):  # the kernel reads affine float32 CPU layouts in place
                self.kernel = hidden_attention_op()  # None: no kernels here (or PHD_KERNELS=0): the SDPA path
                cfg = self.config
                self.no_window = (cache.new_zeros(0, 2, cfg.n_kv_heads, 0, cfg.head_dim),
                                  torch.zeros(0, dtype=torch.long, device=cache.device))
        return self.reader

    def _fuses(self, step: _Step, n: int) -> bool:
        """Whether this step takes `_forward_decode`: every request decodes one token, and the kernel serves this
        cache with vLLM's cache update apart from its attention (the CPU backend). Probes the cache first (sets
        `reader` and `kernel`, which `_forward_decode` uses). A request's first step (position 0: a 1-token prompt,
        or a recompute after preemption) is left to the general path, a conservative choice: it would be exact
        here too (an emptied window, no originals before it)."""
        self._reader()
        return (self.kernel is not None and n == step.seq_lens.shape[0] and not bool(step.fresh.any())
                and not self.paged[0].attn_backend.forward_includes_kv_cache_update)

    def _forward_decode(self, x: Tensor, step: _Step) -> Tensor:
        """A decode step as the native engine's (`engine.decode_step`), over vLLM's cache: each request's K
        copies are one sequence [R, K] of the block, so layer 0 projects the shared input once and the last layer
        queries only copy K; per layer, vLLM's update writes the originals' K/V to the paged cache and one kernel
        call attends all K copies (the original sees the originals before it in the cache, itself in the set)."""
        plan = _DecodePlan.build(self, x, step)
        cos, sin = self.model.rope_at(plan.pos, plan.copy)
        last = self.config.n_layers - 1
        return decode_layers(self.model, x[:, None], cos, sin,
                             lambda i: _DecodeAttention(self, plan, self.paged[i], i, i == last))

    def _forward_phd(self, x: Tensor, positions: Tensor, step: _Step) -> Tensor:
        """Per step, once: the hidden set, the read plan, the windows' rows and, per hidden-set width, RoPE and
        mask. Per layer: the block over [originals | hidden set] (one tensor, rebuilt only where the set shrinks:
        never in decode) with `_PHDAttention`. Only the set's valid entries go through the block (a mixed step
        pads a decoding request's one position to the width of a prompt's); the attention sees them padded."""
        model, cfg = self.model, self.config
        n = x.shape[0]
        longest = int((step.last - step.floor).max()) + 1
        widths = [min(keys, longest) for keys, _ in hidden_widths(cfg, longest)]
        plan = _StepPlan.build(self, x, positions, step, widths[0])
        h, shape = None, None
        window_out = None if plan.window is None or plan.buffer is None else plan.window_view()
        for i, (block, paged) in enumerate(zip(model.layers, self.paged, strict=True)):
            new = plan.shape(widths[i] * plan.k1)
            if h is None:
                h = torch.cat([x, plan.compact(plan.hidden_x, new)])
            elif new.m != shape.m:  # prefill: the next layer needs fewer hidden positions
                h = torch.cat([h[:n], h[n:][plan.kept(shape, new.m)]])
            shape = new
            h = block(h[None], shape.cos, shape.sin, _PHDAttention(self, plan, shape, paged, i, window_out))[0]
        out = h[:n].clone()
        out[step.query_start[1:] - 1] = h[n:][plan.kept(shape, 1)]  # each request's last entry (always valid)
        return model.norm(out)


@dataclass
class _Step:
    """What one forward step knows about its requests (host-side sizes, device tensors)."""

    query_start: Tensor  # [R + 1] token offsets of the requests in the batch
    seq_lens: Tensor  # [R] tokens of each request after this step
    block_table: Tensor  # [R, blocks]
    last: Tensor  # [R] position of each request's last token
    floor: Tensor  # [R] first position whose hidden tokens this step computes (>= the step's first position)
    fresh: Tensor  # [R] the step starts the request at position 0 (a prefill or a recompute after preemption)
    length: int  # the longest request after this step


@dataclass
class _Shape:
    """What a hidden set of M entries per request (a suffix of the widest) shares across the layers that use it:
    RoPE of [originals | set] and the additive masks of its queries. SDPA path: the mask [R, 1, M, keys] over
    [originals | window | set] and the views of the step's buffer that the set's K/V go to and that its queries
    attend. Kernel path: how many originals each query sees, and the mask [R, M, S + M] over [window | set]."""

    m: int
    cos: Tensor
    sin: Tensor
    mask: Tensor
    keys: Tensor | None = None  # [R, Hkv, length + S + M, D]
    values: Tensor | None = None
    set_keys: Tensor | None = None  # [R, Hkv, M, D], the last M of keys / values
    set_values: Tensor | None = None
    limit: Tensor | None = None  # [R, M] int64: query sees originals 0..limit-1
    rows: Tensor | None = None  # the valid entries' indices in the padded [R * M] (None: every entry is valid)
    column: Tensor | None = None  # each valid entry's column in the widest set (the block's hidden rows)


@dataclass
class _StepPlan:
    """Everything of a PHD step that does not depend on the layer: built once, used by every layer."""

    n: int  # originals (the tokens vLLM scheduled)
    k1: int
    m: int  # entries per request of the widest hidden set
    hidden_x: Tensor  # [R, m, d] inputs of the widest hidden set
    pos: Tensor  # [R, m] its positions (position-major, K-1 copies each)
    copy: Tensor  # [m]
    valid: Tensor  # [R, m] False: padding (positions before the request's floor)
    cos_o: Tensor  # RoPE of the originals
    sin_o: Tensor
    cos_h: Tensor  # [R, m, D] of the widest set
    sin_h: Tensor
    buffer: Tensor | None  # [2, R, Hkv, length + S + m, D]: K / V of [originals | window | widest set] (SDPA path)
    read: ReadPlan | None
    table: Tensor | None  # [R, blocks] int64 block table (kernel path)
    window: WindowStep | None
    pool: WindowPool | None
    step: _Step
    cfg: PHDConfig
    shapes: dict[int, _Shape]

    @classmethod
    def build(cls, owner: PHDForCausalLM, x: Tensor, positions: Tensor, step: _Step, width: int) -> _StepPlan:
        """The plan of a step whose widest hidden set has `width` positions per request (layer 0's)."""
        model, cfg = owner.model, owner.config
        k1 = cfg.repeat_k - 1
        offsets = torch.arange(1 - width, 1, device=x.device)
        pos = (step.last[:, None] + offsets).repeat_interleave(k1, dim=1)
        copy = torch.arange(2, k1 + 2, device=x.device).repeat(width)
        valid = pos >= step.floor[:, None]
        # Token of position p in this step's batch: the request's row + p - its first position.
        start = step.seq_lens - (step.query_start[1:] - step.query_start[:-1])
        row = (step.query_start[:-1, None] + pos - start[:, None]).clamp(min=0, max=x.shape[0] - 1)
        cos_o, sin_o = model.rope(rope_position(positions, 1, cfg.repeat_k, cfg.positions))
        cos_h, sin_h = model.rope(rope_position(pos, copy, cfg.repeat_k, cfg.positions))
        window, s, cache = None, 0, owner.paged[0].kv_cache
        if owner.windows is not None:
            window = owner.windows.begin(step.block_table, step.seq_lens, step.fresh, block_size(cache), x, pos,
                                         valid, step.last)
            s = owner.windows.slots
        reader, buffer, read, table = owner._reader(), None, None, None
        if owner.kernel is None:  # every layer reads into the same buffer: its attention is done before the next's
            buffer = x.new_empty(2, pos.shape[0], cfg.n_kv_heads, step.length + s + pos.shape[1], cfg.head_dim)
            read = reader.plan(cache, step.block_table, step.seq_lens, step.length, buffer[0, :, :, : step.length],
                               buffer[1, :, :, : step.length])
        else:
            table = step.block_table.long().contiguous()
        return cls(x.shape[0], k1, pos.shape[1], x[row], pos, copy, valid, cos_o, sin_o, cos_h, sin_h, buffer, read,
                   table, window, owner.windows, step, cfg, {})

    def window_view(self) -> Tensor:
        """[R, 2, Hkv, S, D]: where the windows go in the buffer."""
        length = self.read.length
        return self.buffer[:, :, :, length : length + self.window.pos.shape[1]].transpose(0, 1)

    def shape(self, m: int) -> _Shape:
        """The `_Shape` of the set's last m entries per request (built at its first layer)."""
        if m not in self.shapes:
            keep = self.m - m
            valid = self.valid[:, keep:].flatten()
            rows = None if bool(valid.all()) else valid.nonzero().squeeze(1)
            column = torch.arange(keep, self.m, device=valid.device).repeat(self.valid.shape[0])
            cos_h, sin_h = (t[:, keep:].flatten(0, 1) for t in (self.cos_h, self.sin_h))
            if rows is not None:
                cos_h, sin_h, column = cos_h[rows], sin_h[rows], column[rows]
            cos, sin = torch.cat([self.cos_o, cos_h]), torch.cat([self.sin_o, sin_h])
            if self.buffer is None:  # the kernel: originals by count, the window and the set by mask
                mask = self._mask(keep, originals=False)[:, 0].masked_fill(~self.valid[:, keep:, None], float("-inf"))
                self.shapes[m] = _Shape(m, cos, sin, mask.contiguous(), limit=self._originals_seen(keep), rows=rows,
                                        column=column)  # padding sees no key: the kernel skips it
            else:
                end = self.buffer.shape[3] - keep
                keys, values = self.buffer[0, :, :, :end], self.buffer[1, :, :, :end]
                self.shapes[m] = _Shape(m, cos, sin, self._mask(keep), keys, values, keys[:, :, end - m :],
                                        values[:, :, end - m :], rows=rows, column=column)
        return self.shapes[m]

    def compact(self, hidden: Tensor, shape: _Shape) -> Tensor:
        """[R, m, ...] (the widest set) -> the rows of `shape`'s valid entries, request-major."""
        flat = hidden[:, self.m - shape.m :].flatten(0, 1)
        return flat if shape.rows is None else flat[shape.rows]

    def kept(self, shape: _Shape, m: int) -> Tensor:
        """Which rows of `shape`'s valid entries are in the set's last m entries (the next, narrower set's)."""
        return shape.column >= self.m - m

    def pad(self, t: Tensor, shape: _Shape) -> Tensor:
        """[heads, valid entries, D] -> [heads, R * M, D], zeros where an entry is padding."""
        if shape.rows is None:
            return t
        out = t.new_zeros(t.shape[0], self.valid.shape[0] * shape.m, t.shape[2])
        return out.index_copy_(1, shape.rows, t)

    def _originals_seen(self, keep: int) -> Tensor:
        """[R, M] int64: how many of its request's originals each query of the set's last M entries sees (none for
        padding: the kernel skips a request's leading queries that see no key)."""
        seen = _originals_seen(self.cfg, self.pos[:, keep:], self.copy[keep:], self.step.seq_lens, self.step.length)
        return seen * self.valid[:, keep:]

    def _mask(self, keep: int, originals: bool = True) -> Tensor:
        """Additive mask (0 / -inf) [R, 1, M, length + S + M] by `masks.allowed` ([R, 1, M, S + M] without the
        originals) for the set's last M entries."""
        step = self.step
        q_pos, q_copy, q_valid = self.pos[:, keep:], self.copy[keep:], self.valid[:, keep:]
        keys = [(q_pos, q_copy, q_valid)]
        if self.window is not None:
            keys.insert(0, (self.window.pos, self.window.copy, self.window.pos >= 0))
        if originals:
            o_pos = torch.arange(step.length, device=q_pos.device).expand(q_pos.shape[0], -1)
            keys.insert(0, (o_pos, torch.ones_like(o_pos[0]), o_pos < step.seq_lens[:, None]))
        return _rule_mask(self.cfg, q_pos, q_copy, q_valid, keys, self.cos_o.dtype)[:, None]


@dataclass
class _DecodePlan:
    """What `_forward_decode`'s layers share: the K copies of each request's position, the kernel's arguments
    (block table, originals seen, mask over [window | the K copies]; and the same for copy K alone, the last
    layer's query) and the windows' rows and writes."""

    pos: Tensor  # [R, K]
    copy: Tensor  # [K]
    table: Tensor  # [R, blocks] int64
    limit: Tensor  # [R, K] int64: originals each copy sees in the cache (those before its position)
    mask: Tensor  # [R, K, S + K] additive
    limit_last: Tensor  # [R, 1], [R, 1, S + K]: copy K's
    mask_last: Tensor
    window: WindowStep | None
    pool: WindowPool | None

    @classmethod
    def build(cls, owner: PHDForCausalLM, x: Tensor, step: _Step) -> _DecodePlan:
        cfg = owner.config
        r, k = x.shape[0], cfg.repeat_k
        copy = torch.arange(1, k + 1, device=x.device)
        pos = step.last[:, None].expand(r, k)
        valid = torch.ones_like(pos, dtype=torch.bool)
        keys = [(pos, copy, valid)]
        window = None
        if owner.windows is not None:
            window = owner.windows.begin(step.block_table, step.seq_lens, step.fresh,
                                         block_size(owner.paged[0].kv_cache), x, pos[:, 1:], valid[:, 1:], step.last)
            keys.insert(0, (window.pos, window.copy, window.pos >= 0))
        mask = _rule_mask(cfg, pos, copy, valid, keys, x.dtype)
        limit = _originals_seen(cfg, pos, copy, step.last, step.length)
        return cls(pos, copy, step.block_table.long().contiguous(), limit, mask, limit[:, -1:].contiguous(),
                   mask[:, -1:].contiguous(), window, owner.windows)


def _originals_seen(cfg: PHDConfig, q_pos: Tensor, q_copy: Tensor, held: Tensor, length: int) -> Tensor:
    """[R, M] int64: how many originals each query (q_pos [R, M], q_copy [M]) sees by `masks.allowed`, among the
    first held[r] of its request (a prefix of the positions: a hidden copy sees every original up to its own
    position); `length` >= every held."""
    o_pos = torch.arange(length, device=q_pos.device)
    seen = allowed(q_pos[..., None], q_copy[:, None], o_pos, torch.ones_like(o_pos), cfg.window,
                   cfg.chunk) & (o_pos < held[:, None, None])
    count = seen.sum(-1)
    if not torch.equal(seen, o_pos < count[..., None]):  # the kernel takes a count: the rule must give a prefix
        raise RuntimeError("masks.allowed gives hidden queries originals that are not a prefix of the positions; "
                           "the hidden_attention kernel cannot serve it (PHD_KERNELS=0 runs the SDPA path)")
    return count


def _rule_mask(cfg: PHDConfig, q_pos: Tensor, q_copy: Tensor, q_valid: Tensor,
               keys: list[tuple[Tensor, Tensor, Tensor]], dtype: torch.dtype) -> Tensor:
    """Additive mask (0 / -inf) [R, M, N] by `masks.visible` of queries (q_pos [R, M], q_copy [M], q_valid
    [R, M]) over the keys, the concatenation of (pos [R, n], copy [n], valid [R, n]) parts."""
    key_pos, key_copy, key_valid = (torch.cat(t, dim=-1) for t in zip(*keys, strict=True))
    mask = visible(q_pos, q_copy, q_valid, key_pos, key_copy, key_valid, cfg.window, cfg.chunk)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _kernel_attend(owner: PHDForCausalLM, paged: Attention, layer: int, table: Tensor, window: WindowStep | None,
                   q: Tensor, limit: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """The hidden_attention kernel: q [R, Hq, M, D] over [each request's first limit [R, M] originals, read in its
    blocks of `paged`'s cache (block table `table`) | its window in the pool (none without one) | the set k, v
    [R, Hkv, Ms, D]], the last two by the additive mask [R, M, S + Ms]. Returns [Hq, R * M, D]."""
    cache = paged.kv_cache
    pool, rows = owner.no_window if window is None else (owner.windows.kv[layer], window.rows)
    key_layout, value_layout = owner.reader.strides
    return owner.kernel(q, cache.view(cache.shape[0], cache.shape[1], -1), list(key_layout), list(value_layout),
                        block_size(cache), table, limit, pool, rows, k, v, mask, q.shape[-1] ** -0.5)


def _paged_attend(paged: Attention, n: int) -> Attend:
    """Attention of the n originals through vLLM (writes their K/V to the paged cache): [1, H, n, D] in and out."""

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        h, d = q.shape[1], q.shape[-1]
        flat = [t[0, :, :n].transpose(0, 1).reshape(n, -1) for t in (q, k, v)]
        return paged(*flat).view(n, h, d).transpose(0, 1)[None]

    return attend


class _PHDAttention:
    """Layer `layer`'s attention over [n originals | hidden set] (q, k, v [1, heads, n + R*M, D]): the originals
    through vLLM, then the hidden set against the step's buffer of K and V, [its request's paged originals |
    hidden window | the set], filled in place through views made once per step (no concatenation), by the
    step's mask. Afterwards the set's new entries go to the window pool."""

    def __init__(self, owner: PHDForCausalLM, plan: _StepPlan, shape: _Shape, paged: Attention, layer: int,
                 window_out: Tensor | None) -> None:
        self.owner, self.plan, self.shape, self.paged, self.layer = owner, plan, shape, paged, layer
        self.window_out = window_out

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        plan, shape, n = self.plan, self.shape, self.plan.n
        o_o = _paged_attend(self.paged, n)(q, k, v)  # first: the cache then holds this step's originals
        r = plan.pos.shape[0]
        q_h, k_h, v_h = (plan.pad(t[0, :, n:], shape).unflatten(1, (r, shape.m)).transpose(0, 1)
                         for t in (q, k, v))  # [R, heads, M, D]
        o_h = self._sdpa(q_h, k_h, v_h) if plan.buffer is not None else self._kernel(q_h, k_h, v_h)  # [Hq, R*M, D]
        if plan.window is not None:  # after the attention: it read the windows as they were before this step
            plan.pool.write(self.layer, plan.window, k_h, v_h, plan.m - shape.m)
        if shape.rows is not None:
            o_h = o_h[:, shape.rows]
        return torch.cat([o_o, o_h[None]], dim=2)

    def _sdpa(self, q_h: Tensor, k_h: Tensor, v_h: Tensor) -> Tensor:
        """The hidden queries by SDPA over the step's buffer, filled here: the originals read back from the paged
        blocks, the windows, the set's own K/V (the reference path, and where the kernel cannot serve)."""
        plan, shape = self.plan, self.shape
        self.owner._reader().read_into(self.paged.kv_cache, plan.read)
        if plan.window is not None:
            plan.pool.read_into(self.layer, plan.window, self.window_out)
        shape.set_keys.copy_(k_h)
        shape.set_values.copy_(v_h)
        o_h = F.scaled_dot_product_attention(q_h, shape.keys, shape.values, attn_mask=shape.mask,
                                             enable_gqa=q_h.shape[1] != k_h.shape[1])
        return o_h.transpose(0, 1).flatten(1, 2)

    def _kernel(self, q_h: Tensor, k_h: Tensor, v_h: Tensor) -> Tensor:
        """The hidden queries by the hidden_attention kernel: the originals read in the paged blocks, the window in
        its pool row, the set where the projection left it (no copies)."""
        return _kernel_attend(self.owner, self.paged, self.layer, self.plan.table, self.plan.window, q_h,
                              self.shape.limit, k_h, v_h, self.shape.mask)


class _DecodeAttention:
    """Layer `layer`'s attention in `_forward_decode`: q [R, Hq, Q, D] (Q = K; 1, copy K's, in the last layer),
    k [R, Hkv, K, D] and v alike (in layer 0 [R, Hkv, 1, D]: the K copies' shared value), copy 1 first. The
    originals' K/V go to vLLM's paged cache by vLLM's own update (not its attention); the kernel attends all the
    queries; then the hidden copies' K/V go to the window pool."""

    def __init__(self, owner: PHDForCausalLM, plan: _DecodePlan, paged: Attention, layer: int, last: bool) -> None:
        self.owner, self.plan, self.paged, self.layer, self.last = owner, plan, paged, layer, last

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        plan = self.plan
        v = v.expand_as(k)  # layer 0 projects the K copies' shared input once: one value row stands for K
        unified_kv_cache_update(k[:, :, 0].contiguous(), v[:, :, 0].contiguous(), self.paged.layer_name)
        r, heads, queries, dim = q.shape
        limit, mask = (plan.limit_last, plan.mask_last) if self.last else (plan.limit, plan.mask)
        o = _kernel_attend(self.owner, self.paged, self.layer, plan.table, plan.window, q, limit, k, v, mask)
        if plan.window is not None:  # after the attention: it read the windows as they were before this step
            plan.pool.write(self.layer, plan.window, k[:, :, 1:], v[:, :, 1:], 0)
        return o.view(heads, r, queries, dim).transpose(0, 1)
