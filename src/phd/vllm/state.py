"""What a PHD request keeps between vLLM steps besides vLLM's paged cache: its hidden window, and how the
hidden queries read the originals back from that paged cache.

`HiddenWindows`: SWA / CSWA hidden queries see the hidden copies of the W preceding positions, (K-1)*W entries
per layer per request (spec section 6). The plugin keeps them per request, keyed by the request's first KV
block: with prefix caching off (the plugin turns it off) a block belongs to one live request, so the key is
unique while the request lives, and a request that starts again at position 0 (a new request, or a recompute
after preemption) starts with an empty window. An entry whose key block shows up inside another request's
block table belonged to a finished request and is dropped. docs/serving.md says why not vLLM's own
per-request state (the mamba-style state spec) yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import PHDConfig


class PagedReader:
    """Reads the originals' K/V of each request back from vLLM's paged cache, in whatever order the attention
    backend stores a block (the CPU kernel keeps a block's keys transposed, [D, block_size], for its dot products).

    The order is not hard-coded: `probe` lets the backend write known K/V (the token offset, then the dimension,
    as small integers, exact in any float type) into a one-block scratch cache and reads where each landed.
    Covers caches laid out [blocks, Hkv, ...] (one slab of K and V per block and head: the CPU backend); the
    GPU backends' layouts are the plan in docs/serving.md.
    """

    def __init__(self, key_index: Tensor, value_index: Tensor) -> None:
        self.key_index, self.value_index = key_index, value_index  # [block_size, D] -> place in a block's slab
        # Where each index is affine (place = base + offset * s_t + d * s_d: the CPU backend's keys [D, size] and
        # values [size, D]), keys and values are strided views of whole copied blocks, which is several times
        # faster than an element-wise gather (measured: the gather took 22% of a PHD-CSWA-2 SmolLM2 serving run).
        self.strides = [_affine(key_index), _affine(value_index)]

    @classmethod
    @torch.no_grad()
    def probe(cls, layer: torch.nn.Module) -> PagedReader:
        cache = layer.kv_cache
        if cache.dim() != 4:
            raise NotImplementedError(f"PHD cannot read a paged KV cache of shape {tuple(cache.shape)} yet")
        _, heads, size, _ = cache.shape
        dim = layer.head_size
        seen = []
        for code in (torch.arange(size)[:, None].expand(size, dim), torch.arange(dim).expand(size, dim)):
            scratch = torch.zeros((1, *cache.shape[1:]), dtype=cache.dtype, device=cache.device)
            key = code[:, None].expand(size, heads, dim).to(cache.dtype).to(cache.device).contiguous()
            slots = torch.arange(size, device=cache.device)
            layer.impl.do_kv_cache_update(layer, key, -1 - key, scratch, slots)
            seen.append(scratch[0, 0].flatten().long().cpu())
        offset, d = seen
        is_key = offset >= 0
        key_index = torch.empty(size, dim, dtype=torch.long)
        value_index = torch.empty(size, dim, dtype=torch.long)
        place = torch.arange(offset.numel())
        key_index[offset[is_key], d[is_key]] = place[is_key]
        value_index[-1 - offset[~is_key], -1 - d[~is_key]] = place[~is_key]
        return cls(key_index.to(cache.device), value_index.to(cache.device))

    def read(self, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """Keys and values [R, Hkv, length, D] of positions 0..length-1 of each request; positions a request does
        not hold yet are zeros (finite: padding queries may attend them)."""
        if None not in self.strides:
            return self._read_blocks(kv_cache, block_table, seq_lens, length)
        return self.read_gather(kv_cache, block_table, seq_lens, length)

    def _read_blocks(self, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor, length: int
                     ) -> tuple[Tensor, Tensor]:
        """`read` for affine layouts: copy the requests' blocks whole, then view keys and values by strides."""
        size, dim = self.key_index.shape
        n_blocks = -(-length // size)
        heads, slab = kv_cache.shape[1], kv_cache[0].numel() // kv_cache.shape[1]
        r = block_table.shape[0]
        table = block_table[:, :n_blocks].long().flatten()  # index_select: 4x faster here than indexing with []
        blocks = kv_cache.view(kv_cache.shape[0], -1).index_select(0, table).view(r, n_blocks, -1)
        held = int(seq_lens.min())  # positions every request holds need no zeroing
        empty = (torch.arange(held, length, device=blocks.device) >= seq_lens[:, None])[:, None, :, None]
        out = []
        for base, s_t, s_d in self.strides:
            x = blocks.as_strided((r, heads, n_blocks, size, dim), (n_blocks * heads * slab, slab, heads * slab, s_t,
                                  s_d), blocks.storage_offset() + base)
            x = x.reshape(r, heads, n_blocks * size, dim)[:, :, :length]
            x[:, :, held:].masked_fill_(empty, 0)
            out.append(x)
        return out[0], out[1]

    def read_gather(self, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor, length: int
                    ) -> tuple[Tensor, Tensor]:
        """`read` for any layout the probe saw: an element-wise gather (the reference of the strided path)."""
        size = self.key_index.shape[0]
        pos = torch.arange(length, device=block_table.device)
        block = block_table.long().gather(1, (pos // size).expand(block_table.shape[0], -1))[..., None]
        slab = kv_cache.view(kv_cache.shape[0], kv_cache.shape[1], -1)
        held = (pos < seq_lens[:, None])[..., None, None]
        out = []
        for index in (self.key_index, self.value_index):
            x = slab[block, :, index[pos % size]]  # [R, length, D, Hkv]
            out.append(torch.where(held, x, 0).permute(0, 3, 1, 2))
        return out[0], out[1]


def _affine(index: Tensor) -> tuple[int, int, int] | None:
    """(base, s_t, s_d) when index[t, d] == base + t * s_t + d * s_d for every block offset t and dimension d."""
    size, dim = index.shape
    base = int(index[0, 0])
    s_t = int(index[1, 0]) - base if size > 1 else 0
    s_d = int(index[0, 1]) - base if dim > 1 else 0
    grid = base + torch.arange(size, device=index.device)[:, None] * s_t + torch.arange(dim, device=index.device) * s_d
    return (base, s_t, s_d) if torch.equal(grid, index) else None


def block_size(kv_cache: Tensor) -> int:
    """Tokens per block of a [blocks, Hkv, block_size, 2*D] paged cache."""
    return kv_cache.shape[2]


@dataclass
class WindowBatch:
    """The hidden windows of one step's requests: kv [L, 2, R, Hkv, S, D], positions [L, R, S] (-1: empty);
    slot j holds copy j % (K-1) + 2, position-major, oldest first."""

    kv: Tensor
    pos: Tensor
    copy: Tensor

    def kv_of(self, layer: int) -> tuple[Tensor, Tensor]:
        return self.kv[layer, 0], self.kv[layer, 1]

    def advance(self, layer: int, k: Tensor, v: Tensor, pos: Tensor, valid: Tensor) -> None:
        """Keep the last W positions of [window | the step's hidden set]: k, v [R, Hkv, M, D], pos / valid [R, M]
        (the set's valid entries are a suffix, its positions follow the window's)."""
        s, m = self.pos.shape[-1], pos.shape[1]
        n_valid = valid.sum(1, keepdim=True)
        t = n_valid + torch.arange(s, device=pos.device)  # kept entries in [window | valid part of the set]
        index = torch.where(t < s, t, t + m - n_valid)  # ... in [window | whole set]
        both_pos = torch.cat([self.pos[layer], torch.where(valid, pos, -1)], dim=1)
        self.pos[layer] = both_pos.gather(1, index)
        gather = index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        for i, new in enumerate((k, v)):
            self.kv[layer, i] = torch.cat([self.kv[layer, i], new], dim=2).gather(2, gather)


class HiddenWindows:
    """Per-request hidden windows of a PHD-SWA / CSWA model, keyed by each request's first KV block."""

    def __init__(self, cfg: PHDConfig) -> None:
        self.cfg = cfg
        self.slots = (cfg.repeat_k - 1) * cfg.window
        self.entries: dict[int, tuple[Tensor, Tensor]] = {}  # key -> (kv [L, 2, Hkv, S, D], pos [L, S])

    def load(self, block_table: Tensor, seq_lens: Tensor, fresh: Tensor, size: int, like: Tensor) -> WindowBatch:
        """The windows of a step's requests (empty for those that start at position 0)."""
        cfg = self.cfg
        used = (seq_lens + size - 1) // size
        table = block_table.tolist()
        for row, n_used in zip(table, used.tolist(), strict=True):
            for block in row[1:n_used]:
                self.entries.pop(block, None)  # that block now belongs to a live request: its key's owner ended
        empty_kv = like.new_zeros(cfg.n_layers, 2, cfg.n_kv_heads, self.slots, cfg.head_dim)
        empty_pos = torch.full((cfg.n_layers, self.slots), -1, dtype=torch.long, device=like.device)
        kv, pos = [], []
        for row, is_fresh in zip(table, fresh.tolist(), strict=True):
            entry = None if is_fresh else self.entries.get(row[0])
            kv.append(empty_kv if entry is None else entry[0])
            pos.append(empty_pos if entry is None else entry[1])
        copy = torch.arange(self.slots, device=like.device) % (cfg.repeat_k - 1) + 2
        return WindowBatch(torch.stack(kv, dim=2), torch.stack(pos, dim=1), copy)

    def store(self, block_table: Tensor, batch: WindowBatch) -> None:
        for r, key in enumerate(block_table[:, 0].tolist()):
            self.entries[key] = (batch.kv[:, :, r].clone(), batch.pos[:, r].clone())
