"""The state of a batch of documents between calls: a value, never mutated in place.

A `FamState` holds, per layer, the K/V of the cached tokens (attention sinks | memory blocks | current partial
block), the FAM feedback vectors that the current block reads, and the positions. Every model call returns a new
state, so a fork is free (two sessions may share tensors) and a cancelled call leaves the old state intact.

All rows of a batch share one cache layout (same number of cached slots, same fill of the current block); they
may sit at different document positions. `stack` / `split` convert between sessions and a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from model.config import FamConfig


@dataclass(frozen=True)
class FamState:
    cfg: FamConfig  # mode, B, m, F: the state's layout and meaning follow from it
    k: Tensor  # [b, L, kv_heads, S, head_dim]  keys of the S cached slots, before RoPE (rotated when read)
    v: Tensor  # [b, L, kv_heads, S, head_dim]
    fam: Tensor  # [b, L, F, d]  feedback state entering each layer for the current block (F = 0: empty)
    fam_k: Tensor  # [b, L, kv_heads, F, head_dim]  its keys (derived from `fam`, kept to make decode cheap)
    fam_v: Tensor  # [b, L, kv_heads, F, head_dim]
    fam_fresh: Tensor  # [b] bool: `fam` is the learned initial state -> its first update uses a zero residual
    base: Tensor  # [b] int64: RoPE position of cache slot 0 (always 0 in sink mode: positions re-based)
    n_tokens: Tensor  # [b] int64: document tokens ingested so far
    n_block: int  # tokens in the current, not yet complete block (the last n_block cache slots)
    n_sinks: int  # leading cache slots that are attention sinks (sink mode only)

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def n_cached(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes held by this state's tensors (what a session costs in memory)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> list[Tensor]:
        return [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)]

    def to(self, device: torch.device | str) -> FamState:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})

    def detach(self) -> FamState:
        """Cut the autograd history (Random State Passing keeps a state across training steps)."""
        return replace(self, **{f.name: getattr(self, f.name).detach() for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})

    def layout(self) -> tuple[FamConfig, int, int, int]:
        """States with equal layouts can be stacked into one batch."""
        return (self.cfg, self.n_cached, self.n_block, self.n_sinks)

    @staticmethod
    def stack(states: list[FamState]) -> FamState:
        layouts = {s.layout() for s in states}
        if len(layouts) != 1:
            raise ValueError(f"cannot batch states with different cache layouts: {layouts}")
        first = states[0]
        cat = {f.name: torch.cat([getattr(s, f.name) for s in states])
               for f in fields(first) if isinstance(getattr(first, f.name), Tensor)}
        return replace(first, **cat)

    def split(self) -> list[FamState]:
        return [self.select(i) for i in range(self.batch_size)]

    def select(self, i: int) -> FamState:
        return replace(self, **{f.name: getattr(self, f.name)[i:i + 1] for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})
