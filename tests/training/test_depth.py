"""The depth test's shortcut for sink and bswa: their state at depth N is exact from the sinks plus the L·m + 1
blocks before N, because each layer reaches m blocks further back (and no further)."""

from __future__ import annotations

import pytest
import torch

from model import FamConfig
from model.loader import load_module
from training.depth import window_logits


class _NoTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [1]


def stream_logits(m, mode: str, ids: torch.Tensor, depth: int, window: int) -> torch.Tensor:
    state, out = m.new_state(mode=mode), []
    for a, b in state.cuts(depth + window):
        state, h = m.forward_chunk(state, ids[None, a:b])
        out.append(m.logits(h[0]))
    return torch.cat(out)[depth:depth + window]


@pytest.mark.parametrize("mode", ["bswa", "sink"])
def test_window_shortcut_equals_the_whole_stream(tiny_dirs, mode):
    cfg = FamConfig(mode=mode, block_size=8, memory_blocks=1, sink_tokens=2)
    m, _ = load_module(tiny_dirs["llama"], cfg, torch.float32, torch.device("cpu"), _NoTokenizer())
    ids = torch.randint(0, m.arch.vocab_size, (200,), generator=torch.Generator().manual_seed(0))
    depth, window = 120, 16  # 15 blocks in: the shortcut keeps the sinks plus L·m + 1 = 3 blocks
    with torch.inference_mode():
        whole = stream_logits(m, mode, ids, depth, window)
        torch.testing.assert_close(window_logits(m, mode, ids, depth, window), whole, atol=1e-4, rtol=1e-4)
        # one block less reaches past the receptive field's edge: the outputs change, so the bound is tight
        short = window_logits(m, mode, ids, depth, window, extra_blocks=-1)
        assert (short - whole).abs().max() > 1e-3
