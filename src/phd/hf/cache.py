"""`PHDHFCache`: the native PHD KV cache as a transformers `Cache`.

A transformers cache stores K/V that each attention layer appends and reads; the PHD cache is a different shape
(the originals plus a ring of hidden copies, with per-slot metadata for the attention rule), and the native
engine fills and reads it itself (`phd.inference.prefill` / `decode_step`). So this class holds one native
`PHDCache` and runs the engine on it: the same bytes and the same rule as `phd.generate`, no second copy.
What transformers needs from a `Cache` is answered from it: the sequence length it has seen, and the row
operations of beam search and of several sequences per prompt (`reorder_cache`, `batch_repeat_interleave`,
`batch_select_indices`).

Positions: every row keeps its own length (left padding is moved away on prefill, as in `phd.generate`), so a
left-padded row continues exactly as the unpadded row would. `get_seq_length` is transformers' view: the
number of input columns seen, padding included.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import Cache

from ..config import PHDConfig
from ..inference import PHDCache, decode_step, prefill


class PHDHFCache(Cache):
    """A transformers `Cache` over one native `PHDCache`, allocated on the first forward (batch, dtype, device)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, config: PHDConfig, max_len: int | None = None) -> None:
        super().__init__(layers=[])
        self.config = config
        self.capacity = max_len  # tokens per row to allocate; grows (doubling) when exceeded
        self.native: PHDCache | None = None
        self.columns = 0  # input columns seen (padding included): transformers' sequence length

    def __len__(self) -> int:
        return self.config.n_layers

    def __repr__(self) -> str:
        rows = None if self.native is None else self.native.lengths.tolist()
        return f"PHDHFCache({self.config.name}, columns={self.columns}, row_lengths={rows})"

    # ----- what transformers asks of a Cache -----
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # grows on demand

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.columns + query_length, 0

    @property
    def batch_size(self) -> int:
        return -1 if self.native is None else self.native.batch_size

    @property
    def is_initialized(self) -> bool:
        return self.native is not None

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.config.n_layers

    def reset(self) -> None:
        self.native, self.columns = None, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i becomes row beam_idx[i]."""
        if self.native is not None:
            self.native.select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Every row repeated `repeats` times in place (row b -> rows b*repeats .. b*repeats + repeats-1)."""
        if self.native is not None:
            rows = torch.arange(self.native.batch_size, device=self.native.lengths.device)
            self.native.select_rows(rows.repeat_interleave(repeats))

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.native is not None:
            self.native.select_rows(indices)

    def crop(self, tokens_to_remove: int) -> None:
        """Only `crop(0)`: the hidden ring keeps the last W positions, so earlier states cannot be restored."""
        if tokens_to_remove:
            raise NotImplementedError(
                "a PHD cache cannot be cropped: its hidden window holds only the last W positions, overwritten as "
                "tokens are appended (assisted / speculative decoding needs a croppable cache)"
            )

    # ----- the engine -----
    def prefill(self, model, input_ids: Tensor, attention_mask: Tensor | None, all_logits: bool) -> Tensor:
        """Fill the (empty) cache with the prompts; logits [B, vocab] of each row's last token, or [B, T, vocab]
        of every position (rows moved to the right, as the native engine lays them out)."""
        b, t = input_ids.shape
        capacity = max(self.capacity or 0, t + 1)
        self.native = PHDCache.for_model(model, b, capacity)
        logits = prefill(model, input_ids, self.native, attention_mask=attention_mask, all_logits=all_logits)
        self.columns = t
        return logits

    def append(self, model, input_ids: Tensor) -> Tensor:
        """Decode input_ids [B, n] one token after another; logits [B, n, vocab]."""
        if self.native is None:
            raise ValueError("the cache is empty: run the prompt through the model first (it fills the cache)")
        native, n = self.native, input_ids.shape[1]
        if native.longest + n > native.capacity:
            native.grow(max(2 * native.capacity, native.longest + n))
        logits = [decode_step(model, input_ids[:, i], native) for i in range(n)]
        self.columns += n
        return torch.stack(logits, dim=1)
