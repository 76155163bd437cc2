"""Sampling and incremental detokenisation."""

from __future__ import annotations

import pytest
import torch

from model import FamConfig, FamRuntime, Generation, SamplingParams, generate
from model.generate import Detokenizer, drive, sample


@pytest.fixture(scope="module")
def rt(tiny_chat_dir):
    return FamRuntime.load(tiny_chat_dir, fam=FamConfig(block_size=16, memory_blocks=1, fam_len=4), dtype="float32")


def test_detokenizer_never_emits_half_a_character(rt):
    text = "naïve café — 日本語 🙂 done"
    ids = rt.encode(text)
    d = Detokenizer(rt.decode, ())
    pieces = [d.add(i) for i in ids]
    assert "".join(pieces) + d.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(ids) > len(pieces) - pieces.count("")  # some tokens were partial characters and waited


def test_stop_strings_are_cut_and_held_back(rt):
    ids = rt.encode("Hello world. STOP here. More")
    d = Detokenizer(rt.decode, ("STOP",))
    out = ""
    for i in ids:
        out += d.add(i)
        if d.stopped:
            break
    assert d.stopped and out == "Hello world. " and "S" not in out


def test_sampling_rules():
    logits = torch.tensor([0.0, 1.0, 5.0, 2.0])
    assert sample(logits, SamplingParams(temperature=0), None) == 2
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, SamplingParams(temperature=5, top_k=2), g) for _ in range(200)} == {2, 3}
    assert {sample(logits, SamplingParams(temperature=1, top_p=0.5), g) for _ in range(50)} == {2}
    for tiny in (1e-300, 5e-324, 1e-7):  # logits / t would overflow to inf and the softmax to NaN: greedy instead
        assert {sample(logits * 1e3, SamplingParams(temperature=tiny), g) for _ in range(20)} == {2}
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


@torch.no_grad()
def test_seed_reproducible_and_max_tokens(rt):
    ids = rt.encode(rt.chat_text([{"role": "user", "content": "hi"}]))
    p = SamplingParams(temperature=1.0, seed=42, max_tokens=12, ignore_eos=True)
    a = "".join(generate(rt, rt.new_state(), ids, p))
    b = "".join(generate(rt, rt.new_state(), ids, p))
    assert a == b and a
    g = Generation(ids, p, rt.decode, rt.eos_token_ids)
    for _ in drive(rt, rt.new_state(), g):
        pass
    assert g.finish_reason == "length" and len(g.completion_ids) == 12


@torch.no_grad()
def test_final_state_contains_the_answer(rt):
    ids = rt.encode("Once upon a time")
    g = Generation(ids, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), rt.decode, rt.eos_token_ids)
    final = list(drive(rt, rt.new_state(), g))[-1][1]
    assert int(final.n_tokens[0]) == len(ids) + 5
    replay, _ = rt.ingest(rt.new_state(), ids + g.completion_ids)
    torch.testing.assert_close(final.fam, replay.fam)
