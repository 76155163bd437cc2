"""A persistent cache for documents that decode one token per pass: the executor's continuous batch.

In a plain `FamLM.forward_many` pass a decoding document attends over its own cache, concatenated with its new
key every layer (a copy of the whole window per layer and token) and run as its own small attention. A
`DecodeBatch` keeps the caches of the documents that decode together in one zero-padded buffer per layer,
[n, kv_heads, cap, head_dim]: a pass writes each document's new key and value into its next free slot and runs
one masked attention for all of them. The documents' states stay values: each state it returns holds views of
its own row, [:, :, :length], which no later write touches (writes go past the end of the newest state of a row).

A pass uses the buffer in place only when its decoding documents are exactly the newest states of every row;
anything else (a document joins or leaves, one completes its block and so changes its layout, an older or forked
state comes back) rebuilds it by copying those documents' caches in, which costs what one plain pass copies.
A document decoding alone takes the buffer too: its shapes then stay fixed through the block, where a plain pass
allocates a cache one slot longer per layer and token and gives oneDNN's bf16 attention matmul a shape it has not
seen (the default model after 8k tokens, bf16, 2 AMX cores, in process: 26.1-26.6 tok/s against 19.3 on the
first pass through a block and ~24-25 after; 150 tokens, three passes each).
A row's capacity lasts to the end of the document's current block; the token that completes a block runs the
plain path (its feedback rows join the queries), so a row never overflows.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from model.state import FamState


class DecodeBatch:
    def __init__(self) -> None:
        self.k: list[Tensor] = []  # per layer [n, kv_heads, cap, head_dim]
        self.v: list[Tensor] = []
        self.lengths: list[int] = []  # per row: valid slots (feedback rows + cached slots)
        self.newest: list[FamState] = []  # per row: the state the last pass returned (its views end at lengths)

    @staticmethod
    def eligible(state: FamState, n_tokens: int) -> bool:
        """Decoding one token that does not complete its block, in a mode whose window is bounded."""
        return (n_tokens == 1 and state.batch_size == 1 and state.cfg.evicts
                and state.n_block + 1 < state.cfg.block_size)

    def admit(self, states: list[FamState]) -> list[int]:
        """Make the buffer hold these states (eligible ones; none drops the buffers); returns each one's row."""
        if not states:
            self.k, self.v, self.lengths, self.newest = [], [], [], []
            return []
        where = {id(s): j for j, s in enumerate(self.newest)}
        rows = [where.get(id(s), -1) for s in states]
        if -1 in rows or len(set(rows)) != len(states) or len(states) != len(self.newest):
            self._rebuild(states)
            rows = list(range(len(states)))
        return rows

    def _rebuild(self, states: list[FamState]) -> None:
        k0 = states[0].k[0]
        _, kv, _, hd = k0.shape
        cap = max(s.k[0].shape[2] + s.cfg.block_size - s.n_block for s in states)  # to the end of each block
        self.k, self.v = [], []
        for li in range(len(states[0].k)):
            for store, src in ((self.k, [s.k[li] for s in states]), (self.v, [s.v[li] for s in states])):
                buf = k0.new_zeros(len(states), kv, cap, hd)  # zeros: masked slots times zero stay zero
                for j, t in enumerate(src):
                    buf[j, :, :t.shape[2]] = t[0]
                store.append(buf)
        self.lengths = [s.k[0].shape[2] for s in states]
        self.newest = list(states)

    def start(self) -> tuple[Tensor, Tensor]:
        """Before a pass: the rows' write positions [n] and the attention mask as an additive bias [n, 1, 1, cap]
        in the cache's dtype (0 = attend, -inf = not), covering each row's cache and the token the pass writes."""
        at = torch.tensor(self.lengths, device=self.k[0].device)
        seen = torch.arange(self.k[0].shape[2], device=at.device)[None] <= at[:, None]
        bias = torch.zeros(seen.shape, dtype=self.k[0].dtype, device=at.device).masked_fill_(~seen, float("-inf"))
        return at, bias[:, None, None]

    def write(self, li: int, at: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Layer li's new keys and values [n, kv_heads, 1, head_dim] (rotated) into their rows' next slots;
        returns the layer's whole buffers to attend over."""
        rows = torch.arange(len(self.lengths), device=at.device)
        self.k[li][rows, :, at] = k[:, :, 0]
        self.v[li][rows, :, at] = v[:, :, 0]
        return self.k[li], self.v[li]

    def finish(self, rows: list[int]) -> list[FamState]:
        """After a pass: the documents' new states (one token longer), by row."""
        out = []
        for j in rows:
            s, n = self.newest[j], self.lengths[j] + 1
            new = replace(s, k=tuple(t[j:j + 1, :, :n] for t in self.k), v=tuple(t[j:j + 1, :, :n] for t in self.v),
                          n_tokens=s.n_tokens + 1, n_block=s.n_block + 1)
            self.lengths[j], self.newest[j] = n, new
            out.append(new)
        return out
