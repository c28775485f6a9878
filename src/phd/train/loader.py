"""A deterministic, resumable loader over a token split, sharded across data-parallel ranks.

The split is cut into `num_sequences` windows of seq_len + 1 tokens (`phd.data.shards.window_count`: window i
starts at token i * seq_len; inputs are its first seq_len tokens, targets the last seq_len). Every epoch visits the
windows in a permutation seeded by (seed, epoch). Optimizer step s reads the next `batch_size` windows of the
permutation (an incomplete tail of an epoch is skipped); within it, micro-step a of rank r reads the
`micro_batch` windows starting at `(a * world + r) * micro_batch`. So the ranks' slices never overlap, leave
no gap, and the global batch does not depend on the number of processes. The state is (epoch, position),
counted in windows of the global permutation, and restoring it resumes the exact sequence of batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..data.shards import DataError, window_count, windows


@dataclass
class LoaderState:
    epoch: int = 0
    position: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}


class TokenLoader:
    def __init__(
        self, tokens: np.ndarray, seq_len: int, batch_size: int, micro_batch: int, rank: int = 0, world: int = 1,
        seed: int = 0,
    ) -> None:
        if batch_size % (micro_batch * world):
            raise ValueError(f"batch_size={batch_size} is not a multiple of micro_batch * world={micro_batch * world}")
        self.tokens, self.seq_len = tokens, seq_len
        self.batch_size, self.micro_batch, self.rank, self.world, self.seed = batch_size, micro_batch, rank, world, seed
        self.num_sequences = window_count(len(tokens), seq_len)
        if self.num_sequences < batch_size:
            raise DataError(
                f"the train split holds {len(tokens)} tokens: {self.num_sequences} sequences of seq_len+1="
                f"{seq_len + 1}, fewer than one batch of {batch_size}; use more data or a smaller batch_size/seq_len"
            )
        self.state = LoaderState()
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    @property
    def accum(self) -> int:
        return self.batch_size // (self.micro_batch * self.world)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._order = rng.permutation(self.num_sequences)
            self._order_epoch = epoch
        return self._order

    def next_step(self) -> list[tuple[Tensor, Tensor]]:
        """This rank's `accum` micro-batches (inputs, targets) of the next optimizer step; advances the state."""
        if self.state.position + self.batch_size > self.num_sequences:
            self.state = LoaderState(self.state.epoch + 1, 0)
        order = self._permutation(self.state.epoch)
        base = self.state.position
        micro = []
        for a in range(self.accum):
            start = base + (a * self.world + self.rank) * self.micro_batch
            batch = torch.from_numpy(windows(self.tokens, self.seq_len, order[start : start + self.micro_batch]))
            micro.append((batch[:, :-1], batch[:, 1:]))
        self.state = LoaderState(self.state.epoch, base + self.batch_size)
        return micro

    def state_dict(self) -> dict[str, int]:
        return self.state.to_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = LoaderState(int(state["epoch"]), int(state["position"]))
