"""What a PHD request keeps between vLLM steps besides vLLM's paged cache: its hidden window, and how the
hidden queries read the originals back from that paged cache.

`PagedReader`: one `ReadPlan` per step (the requests' block ids, flattened once), then per layer one copy of
the requests' blocks and one strided copy of their keys and values into the buffer the hidden queries attend.

`WindowPool`: SWA / CSWA hidden queries see the hidden copies of the W preceding positions, (K-1)*W entries
per layer per request (spec section 6). They live in one preallocated pool, a ring per request (position p's
copy s in slot (p % W)*(K-1) + s-2, as the native cache's ring), so a step reads a request's window by its row
and writes only the new positions; nothing is stacked or cloned per step. A request's row is keyed by its first
KV block: with prefix caching off (the plugin turns it off) a block belongs to one live request, so the key is
unique while the request lives, and a request that starts again at position 0 (a new request, or a recompute
after preemption) starts with an empty window. A key whose block shows up inside another request's block
table belonged to a finished request: its row goes back to the free list. docs/serving.md says why not vLLM's
own per-request state (the mamba-style state spec) yet.
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

    def plan(self, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor, length: int, keys: Tensor,
             values: Tensor) -> ReadPlan:
        """A step's read of positions 0..length-1 of each request into `keys` / `values` [R, Hkv, length, D]
        (views of the buffers the hidden queries attend), the same for every layer: the block ids, a buffer for
        the copied blocks and every view between them are made here once, so a layer's read is one index_select
        and a few copies (`read_into`). `kv_cache`: any layer's (they share one shape)."""
        n_blocks = -(-length // self.key_index.shape[0])
        table = block_table[:, :n_blocks].long().flatten()
        plan = ReadPlan(table, block_table, seq_lens, length, keys, values, None, [])
        if None in self.strides:
            return plan
        size, dim = self.key_index.shape
        r, heads, slab = block_table.shape[0], kv_cache.shape[1], kv_cache[0].numel() // kv_cache.shape[1]
        plan.blocks = blocks = kv_cache.new_empty(r * n_blocks, heads * slab)
        full = length // size  # whole blocks, then the part of the last one
        for out, (base, s_t, s_d) in zip((keys, values), self.strides, strict=True):
            x = blocks.as_strided((r, heads, n_blocks, size, dim), (n_blocks * heads * slab, slab, heads * slab,
                                  s_t, s_d), base)
            if full:
                plan.copies.append((x[:, :, :full], out[:, :, : full * size].unflatten(2, (full, size))))
            if full < n_blocks:
                plan.copies.append((x[:, :, full, : length - full * size], out[:, :, full * size :]))
        return plan

    def read_into(self, kv_cache: Tensor, plan: ReadPlan) -> None:
        """Write one layer's keys and values of the plan's positions into the plan's `keys` / `values`. Positions
        a request does not hold yet get whatever its blocks hold there (zeros or stale K/V: finite, vLLM
        allocates the cache zeroed); the plugin's mask hides them (`read` zeroes them, for callers without one)."""
        if plan.blocks is None:
            for out, x in zip((plan.keys, plan.values), self.read_gather(kv_cache, plan.block_table, plan.seq_lens,
                                                                         plan.length), strict=True):
                out.copy_(x)
            return
        torch.index_select(kv_cache.view(kv_cache.shape[0], -1), 0, plan.table, out=plan.blocks)  # 4x faster than []
        for x, out in plan.copies:
            out.copy_(x)

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




@dataclass
class ReadPlan:
    """A step's read of the originals (`PagedReader.plan`): the same for every layer."""

    table: Tensor  # [R * n_blocks] the requests' first n_blocks block ids, long
    block_table: Tensor  # [R, blocks]
    seq_lens: Tensor  # [R]
    length: int  # positions read per request (the longest request)
    keys: Tensor  # [R, Hkv, length, D] where they go
    values: Tensor
    blocks: Tensor | None  # [R * n_blocks, block numel] the copied blocks (None: the layout takes the gather)
    copies: list[tuple[Tensor, Tensor]]  # (view of blocks, view of keys / values)


def block_size(kv_cache: Tensor) -> int:
    """Tokens per block of a [blocks, Hkv, block_size, 2*D] paged cache."""
    return kv_cache.shape[2]


@dataclass
class WindowStep:
    """One step's view of the pool: the requests' rows, their windows' positions before the step (the mask's),
    and where the step's new hidden entries go (the same entries in every layer: see `WindowPool.begin`)."""

    rows: Tensor  # [R] pool rows
    pos: Tensor  # [R, S] position of each slot before this step, -1: empty
    copy: Tensor  # [S] copy held by each slot
    src: tuple[Tensor, Tensor] | None  # (request, entry of the widest hidden set) of each new entry [E]; None:
    # every entry of every request, in order (decode)
    index: Tensor  # [E * 2 * Hkv] rows of a layer's pool viewed [rows * 2 * Hkv * S, D] that the entries' K/V fill


class WindowPool:
    """The hidden windows of a PHD-SWA / CSWA model: K/V [L, rows, 2, Hkv, S, D] and positions [rows, S] (shared
    by the layers: every layer's hidden set holds the same last W positions), a ring of S = (K-1)*W slots per
    request. Rows are handed out by the request's first KV block and reused; the pool doubles when full."""

    def __init__(self, cfg: PHDConfig) -> None:
        self.cfg = cfg
        self.k1, self.window = cfg.repeat_k - 1, cfg.window
        self.slots = self.k1 * cfg.window
        self.rows: dict[int, int] = {}  # first block -> row
        self.free: list[int] = []
        self.kv: Tensor | None = None
        self.pos: Tensor | None = None
        self.flat: list[Tensor] = []  # per layer, kv[layer] viewed [rows * 2 * Hkv * S, D] (for index_copy_)

    def _grow(self, like: Tensor) -> None:
        """Double the pool (start at 8 rows); K/V start zeroed (finite: masked slots must not poison the sum)."""
        cfg, old = self.cfg, 0 if self.kv is None else self.kv.shape[1]
        new = max(8, 2 * old)
        kv = like.new_zeros(cfg.n_layers, new, 2, cfg.n_kv_heads, self.slots, cfg.head_dim)
        pos = torch.full((new, self.slots), -1, dtype=torch.long, device=like.device)
        if self.kv is not None:
            kv[:, :old], pos[:old] = self.kv, self.pos
        self.kv, self.pos = kv, pos
        self.flat = [layer.view(-1, cfg.head_dim) for layer in kv]
        self.free.extend(range(new - 1, old - 1, -1))

    def _row_of(self, key: int, fresh: bool, like: Tensor) -> tuple[int, bool]:
        """The row of the request whose first block is `key`, and whether its window starts empty."""
        row = self.rows.get(key)
        if row is None:
            if not self.free:
                self._grow(like)
            row = self.rows[key] = self.free.pop()
            fresh = True  # a request the pool has not seen (never after its first step): empty window
        return row, fresh

    def _rows(self, block_table: Tensor, seq_lens: Tensor, fresh: Tensor, size: int, like: Tensor) -> Tensor:
        """The step's rows; rows of keys that left are handed back, windows of fresh requests emptied."""
        used = ((seq_lens + size - 1) // size).tolist()
        table = block_table.tolist()
        for row, n_used in zip(table, used, strict=True):
            for block in row[1:n_used]:
                if block in self.rows:  # that block now belongs to a live request: its key's owner ended
                    self.free.append(self.rows.pop(block))
        rows, reset = [], []
        for row, is_fresh in zip(table, fresh.tolist(), strict=True):
            r, empty = self._row_of(row[0], is_fresh, like)
            rows.append(r)
            if empty:
                reset.append(r)
        if reset:
            self.pos[torch.tensor(reset, device=like.device)] = -1
        return torch.tensor(rows, device=like.device)

    def begin(self, block_table: Tensor, seq_lens: Tensor, fresh: Tensor, size: int, like: Tensor,
              set_pos: Tensor, set_valid: Tensor, last: Tensor) -> WindowStep:
        """A step's rows (windows emptied for requests starting at position 0) and its writes: the hidden set's
        (set_pos / set_valid [R, M], the widest layer's) valid entries among the last W positions. Every layer
        writes those same entries (each layer's set holds at least the last min(W, valid) positions), so the
        slots' positions move forward here, once; the returned `pos` is the mask's view before the step."""
        device = like.device
        rows = self._rows(block_table, seq_lens, fresh, size, like)
        before = self.pos.index_select(0, rows)
        write = set_valid & (set_pos > last[:, None] - self.window)
        if set_pos.shape[1] == self.k1 and bool(write.all()):  # decode: each request's one position, all written
            src, req, entry = None, torch.arange(rows.shape[0], device=device)[:, None], torch.arange(self.k1,
                                                                                                     device=device)
            pos = set_pos
        else:
            src = req, entry = write.nonzero(as_tuple=True)
            pos = set_pos[req, entry]
        slot = pos % self.window * self.k1 + entry % self.k1  # entries are position-major: copy = entry % (K-1) + 2
        self.pos[rows[req], slot] = pos
        # K/V of entry e go to rows ((row * 2 + kv) * Hkv + head) * S + slot of the layer's flat view, ordered as
        # the entries' K/V stacked [E, 2, Hkv] (decode: [R, 2, Hkv, M]).
        kv_head = torch.arange(2 * self.cfg.n_kv_heads, device=device)
        base = (rows[req] * 2 * self.cfg.n_kv_heads)[..., None] + kv_head  # [E, 2Hkv] (decode: [R, 1, 2Hkv])
        if src is None:
            index = base.view(rows.shape[0], -1, 1) * self.slots + slot[:, None]  # [R, 2Hkv, M]
        else:
            index = base * self.slots + slot[:, None]
        copy = torch.arange(self.slots, device=device) % self.k1 + 2
        return WindowStep(rows, before, copy, src, index.flatten())

    def read_into(self, layer: int, step: WindowStep, out: Tensor) -> None:
        """The step's windows of `layer` into out [R, 2, Hkv, S, D] (a view of the attention buffers)."""
        torch.index_select(self.kv[layer], 0, step.rows, out=out)

    def write(self, layer: int, step: WindowStep, keys: Tensor, values: Tensor, offset: int) -> None:
        """Store the step's new entries of `layer`: keys / values [R, Hkv, M, D], the widest set's last M entries
        (`offset` = widest M - M)."""
        new = torch.stack([keys, values], dim=1)  # [R, 2, Hkv, M, D]
        if step.src is not None:
            req, entry = step.src
            new = new[req, :, :, entry - offset]  # [E, 2, Hkv, D]
        self.flat[layer].index_copy_(0, step.index, new.reshape(-1, new.shape[-1]))
