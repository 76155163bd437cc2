"""The state of a batch of documents between calls: a value, never mutated in place.

A `FamState` holds, per layer, the K/V of the cached tokens (attention sinks | memory blocks | current partial
block), the FAM feedback vectors that the current block reads, and the positions. Every model call returns a new
state, so a fork is free (two sessions may share tensors) and a cancelled call leaves the old state intact.

All rows of a batch share one cache layout (same number of cached slots, same fill of the current block); they
may sit at different document positions. `stack` / `split` convert between sessions and a batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from model.config import FamConfig


@dataclass(frozen=True)
class FamState:
    cfg: FamConfig  # mode, B, m, F: the state's layout and meaning follow from it
    # Per layer l: k[l], v[l] are [b, kv_heads, F + S, head_dim]: first the keys/values of the F feedback rows
    # that the current block reads, then the S cached slots. Keys are stored with RoPE applied (cache slot j at
    # position base + j; the feedback rows at the F positions before the current block).
    k: tuple[Tensor, ...]
    v: tuple[Tensor, ...]
    fam: Tensor  # [b, L, F, d]  feedback state entering each layer for the current block (F = 0: empty)
    fam_fresh: Tensor  # [b] bool: `fam` is the learned initial state (see FamConfig.zero_first_residual)
    base: Tensor  # [b] int64: RoPE position of cache slot 0 (always 0 in sink mode: positions re-based)
    n_tokens: Tensor  # [b] int64: document tokens ingested so far
    n_block: int  # tokens in the current, not yet complete block (the last n_block cache slots)
    n_sinks: int  # leading cache slots that are attention sinks (sink mode only)

    @property
    def batch_size(self) -> int:
        return self.fam.shape[0]

    @property
    def n_cached(self) -> int:
        return self.k[0].shape[2] - self.cfg.F

    @property
    def block_start(self) -> int:
        """Cache slot where the current block begins."""
        return self.n_cached - self.n_block

    def cuts(self, n: int) -> list[tuple[int, int]]:
        """The next `n` tokens cut at block boundaries: [start, end) spans, the first filling the current block's
        remaining room, each one a valid chunk for `FamLM.forward_chunk` in turn (a chunk that completes a block
        resets the fill to 0)."""
        B, fill, pos, out = self.cfg.block_size, self.n_block, 0, []
        while pos < n:
            t = min(B - fill, n - pos)
            out.append((pos, pos + t))
            pos, fill = pos + t, (fill + t) % B
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by this state's tensors (what a session costs in memory)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def compact(self) -> FamState:
        """The same state with tensors that own their storage. A state cut from a larger buffer (a row of a
        `DecodeBatch`, of a stacked batch) keeps that whole buffer alive while `nbytes` counts only its part; a
        state kept for long (a session's) is compacted, which copies only the tensors that are such views."""
        return self.map(lambda t: t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone())

    def _tensors(self) -> list[Tensor]:
        return [*self.k, *self.v, self.fam, self.fam_fresh, self.base, self.n_tokens]

    def map(self, fn: Callable[[Tensor], Tensor]) -> FamState:
        """Apply fn to every tensor (device moves, detach, row selection)."""
        return replace(self, k=tuple(fn(t) for t in self.k), v=tuple(fn(t) for t in self.v), fam=fn(self.fam),
                       fam_fresh=fn(self.fam_fresh), base=fn(self.base), n_tokens=fn(self.n_tokens))

    def to(self, device: torch.device | str) -> FamState:
        return self.map(lambda t: t.to(device))

    def detach(self) -> FamState:
        """Cut the autograd history (Random State Passing keeps a state across training steps)."""
        return self.map(Tensor.detach)

    def layout(self) -> tuple[FamConfig, int, int, int]:
        """States with equal layouts can be stacked into one batch."""
        return (self.cfg, self.n_cached, self.n_block, self.n_sinks)

    @staticmethod
    def stack(states: list[FamState]) -> FamState:
        layouts = {s.layout() for s in states}
        if len(layouts) != 1:
            raise ValueError(f"cannot batch states with different cache layouts: {layouts}")
        cat = torch.cat
        return replace(
            states[0],
            k=tuple(cat([s.k[li] for s in states]) for li in range(len(states[0].k))),
            v=tuple(cat([s.v[li] for s in states]) for li in range(len(states[0].v))),
            fam=cat([s.fam for s in states]), fam_fresh=cat([s.fam_fresh for s in states]),
            base=cat([s.base for s in states]), n_tokens=cat([s.n_tokens for s in states]),
        )

    def split(self) -> list[FamState]:
        return [self.select(i) for i in range(self.batch_size)]

    def select(self, i: int) -> FamState:
        return self.map(lambda t: t[i:i + 1])
