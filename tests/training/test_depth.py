"""The depth test's shortcut for sink and bswa: their state at depth N is exact from the sinks plus the L·m + 1
blocks before N, because each layer reaches m blocks further back (and no further)."""

from __future__ import annotations

import pytest
import torch

from model import FamConfig, FamRuntime
from model.loader import load_module
from training.depth import stream_logits, window_logits


class _NoTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [1]


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


@pytest.mark.slow
@pytest.mark.realmodel
@torch.inference_mode()
def test_the_shipped_fam_holds_sink_level_64_blocks_in():
    """The short depth test: 16k tokens into held-out prose, fam as shipped predicts the next 512 tokens within 3
    points of sink (the bundled adapter: -0.1 at 16k on the R manuals in float32, docs/depth_float32_w8k.md); the
    first adapter with the paper's update (v1, fam_gate 1) falls more than 5 points below there (measured: -12), so
    the test can tell a drift."""
    from model.adapter import BUNDLED_DIR
    from training.data import prose_tokens

    # bf16, as the adapter was trained and measured: in float32 the ungated state drifts later (on this prose 4.3
    # points below sink at 16k against 12 in bf16, too little for the second assertion; on the R manuals -9.1 at
    # 16k and 0.099 against 0.420 at 32k, docs/depth_float32.md): the drift is the update's, not bf16's rounding
    rt = FamRuntime.load(None, adapter="auto", dtype="bfloat16")
    assert rt.fam_config.fam_gate < 1.0
    depth, window = 64 * rt.fam_config.block_size, 512
    ids = torch.tensor(prose_tokens(rt.tokenizer, held_out=True)[:depth + window + 1])
    target = ids[depth + 1:depth + window + 1]

    def accuracy(logits: torch.Tensor) -> float:
        return (logits.argmax(-1) == target).float().mean().item()

    sink = accuracy(window_logits(rt.module, "sink", ids, depth, window))
    fam = accuracy(stream_logits(rt.module, "fam", ids, depth, window))
    assert fam >= sink - 0.03, (fam, sink)
    v1 = FamRuntime.load(None, adapter=BUNDLED_DIR / "experimental" / "smollm2-135m-instruct-fam-v1.safetensors",
                         dtype="bfloat16", fam_overrides={"fam_gate": 1.0})
    ungated = accuracy(stream_logits(v1.module, "fam", ids, depth, window))
    assert ungated < sink - 0.05, (ungated, sink)


def test_trace_table_keeps_the_last_trace_of_each_block(tmp_path):
    """A depth run restarted without its state file appends its trace again; the report shows each block once."""
    import json

    from training.depth import trace_lines

    rec = {"tokens": 256, "rms": [1.0, 2.0, 3.0], "move": [0.1, 0.2]}
    rows = [{"block": b, **rec} for b in (0, 1, 3)]
    (tmp_path / "sys.trace.jsonl").write_text("\n".join(json.dumps(r) for r in rows + rows[:2]) + "\n")
    table = [line for line in trace_lines(tmp_path) if line.startswith("| ") and line[2].isdigit()]
    assert [line.split(" | ")[0] for line in table] == ["| 0", "| 1", "| 3"]


def test_cells_keep_span_hits_and_the_report_gives_the_gaps_noise():
    """A cell's hits per 256 tokens add up to its hits; the paired SD of two cells is zero for a constant
    difference per span and grows with how unevenly the two systems disagree."""
    from training.depth import paired_sd, window_cell

    cell = window_cell([True] * 300 + [False] * 212)
    assert (cell["hits"], cell["n"], cell["span_hits"]) == (300, 512, [256, 44])
    a = {"n": 1024, "span_hits": [100, 110, 120, 130]}
    assert paired_sd(a, {"n": 1024, "span_hits": [95, 105, 115, 125]}) == 0.0
    uneven = paired_sd(a, {"n": 1024, "span_hits": [80, 110, 120, 130]})  # all 20 lost tokens in one span
    assert uneven == pytest.approx((100 * 4) ** 0.5 / 1024)  # diffs 20, 0, 0, 0: sample variance 100
    assert paired_sd(a, {"n": 1024, "hits": 400}) is None  # a cell from before span hits
