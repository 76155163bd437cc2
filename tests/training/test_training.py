"""Training path: BPTT through blocks, checkpointing, RSP/RPO, data layout, adapter export, and (slow) the tiny
PassKey experiment where FAM must beat BSWA far past the window."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from training.tiny import TinySetup, build_model, passkey_accuracy, train
from training.train import Carried, carried_state, sequence_loss, start_state

SETUP = replace(TinySetup(), memory_blocks=0)


def _grad_of_early_token(mode: str) -> float:
    module = build_model(SETUP, mode)
    tokens = torch.randint(12, 32, (1, 3 * SETUP.block_size), generator=torch.Generator().manual_seed(0))
    tokens[0, 3] = 5  # the only digit, in block 0
    weights = torch.zeros(tokens.shape)
    weights[0, -8:-1] = 1  # loss in the last block only
    _, loss, _ = sequence_loss(module, module.new_state(), tokens, weights)
    loss.backward()
    return module.embed_tokens.weight.grad[5].norm().item()


def test_gradient_reaches_past_the_window_only_through_fam():
    """m = 0: the last block's loss depends on block 0 through the feedback state alone."""
    assert _grad_of_early_token("fam") > 1e-6
    assert _grad_of_early_token("bswa") == 0.0


@pytest.mark.parametrize("mode", ["fam", "bswa"])
def test_checkpointing_changes_nothing(mode):
    module = build_model(replace(SETUP, memory_blocks=1), mode)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 32, (2, 2 * SETUP.block_size + 5), generator=gen)
    weights = torch.rand(tokens.shape, generator=gen)
    results = []
    for use in (False, True):
        module.zero_grad(set_to_none=True)
        state, loss, correct = sequence_loss(module, module.new_state(batch=2), tokens, weights, use_checkpoint=use)
        (loss + state.fam.sum()).backward()  # the final state stays on the graph (RSP reads it)
        results.append((loss.item(), correct.item(), {n: p.grad.clone() for n, p in module.named_parameters()
                                                       if p.grad is not None}))
    (l0, c0, g0), (l1, c1, g1) = results
    assert l0 == pytest.approx(l1, rel=1e-5) and c0 == c1
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-4, atol=1e-6)


def test_loss_equals_teacher_forced_cross_entropy():
    """Block by block (3 blocks in full mode) equals one pass over the whole sequence (same weights)."""
    blocks = build_model(replace(SETUP, block_size=16), "full")
    whole = build_model(replace(SETUP, block_size=64), "full")
    tokens = torch.randint(0, 32, (1, 40), generator=torch.Generator().manual_seed(2))
    _, loss, _ = sequence_loss(blocks, blocks.new_state(), tokens, torch.ones(tokens.shape))
    _, h = whole.forward_chunk(whole.new_state(), tokens)
    ref = torch.nn.functional.cross_entropy(whole.logits(h)[0, :-1], tokens[0, 1:], reduction="sum")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_random_state_passing_and_position_offset():
    module = build_model(SETUP, "fam")
    carried = carried_state(module.new_state(batch=2))
    carried = Carried(carried.fam + 1.0)
    gen = torch.Generator().manual_seed(0)
    always = start_state(module, 3, carried, p_carry=1.0, rpo=False, gen=gen)
    torch.testing.assert_close(always.fam, carried.fam[None].expand_as(always.fam))
    assert not always.fam_fresh.any()
    fresh = module.new_state(batch=3)
    nf = SETUP.fam_len
    assert not torch.allclose(always.k[1][:, :, :nf], fresh.k[1][:, :, :nf])  # the carried vectors' keys
    never = start_state(module, 3, carried, p_carry=0.0, rpo=False, gen=gen)
    torch.testing.assert_close(never.fam, module.new_state(batch=3).fam)
    assert never.fam_fresh.all()
    bases = torch.cat([start_state(module, 64, None, 0.8, rpo=True, gen=gen).base for _ in range(4)])
    assert (bases >= 0).all() and (bases < 2 * math.pi * 10000.0).all()
    assert 0.3 < (bases > 0).float().mean().item() < 0.7  # about half the rows are shifted


def test_initial_state_under_autograd_trains_the_prompt():
    module = build_model(SETUP, "fam")
    module.requires_grad_(False).fam_prompt.requires_grad_(True)
    tokens = torch.randint(12, 32, (1, 2 * SETUP.block_size), generator=torch.Generator().manual_seed(3))
    state = start_state(module, 1, None, 0.8, rpo=True, gen=torch.Generator().manual_seed(0))
    _, loss, _ = sequence_loss(module, state, tokens, torch.ones(tokens.shape))
    loss.backward()
    assert module.fam_prompt.grad is not None and module.fam_prompt.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.mark.realmodel
def test_data_layout(tokenizer):
    from training.data import DataMaker, to_tensors

    maker = DataMaker(tokenizer, list(range(1000, 9000)), seed=0)
    for _ in range(20):
        e = maker.passkey(768, "prose", min_gap=512)
        assert len(e.tokens) == len(e.weights) == 768
        a = len(e.answer)
        assert e.tokens[-a:] == e.answer and sum(e.weights) == a and e.weights[-a - 1:-1] == [1.0] * a
        key_end = max(i for i in range(768 - a) if e.tokens[i:i + a] == e.answer) + a
        assert 768 - key_end >= 512, "the key must lie outside the attention window"
    e = maker.passkey(4096 + maker.passkey_overhead, "standard")
    assert len(e.tokens) == 4096 + maker.passkey_overhead
    r = maker.repeat(768, 64)
    assert sum(w > 0 for w in r.weights) == 64 and max(r.weights) == pytest.approx(0.1)
    seg = r.tokens[-64:]
    body = r.tokens[:768 - 64 - len(maker.repeat_mark)]
    assert any(body[i:i + 64] == seg for i in range(len(body) - 63))
    tokens, weights = to_tensors([maker.prose_lm(300), maker.prose_lm(300)])
    assert tokens.shape == weights.shape == (2, 300)


def test_export_round_trip(tmp_path):
    """LoRA trained through peft, exported with save_adapter, applied by Adapter.apply: same outputs."""
    from peft import LoraConfig, inject_adapter_in_model

    from model.adapter import load_adapter
    from model.runtime import FamRuntime
    from training.finetune import export_adapter, lora_weights

    trained = build_model(SETUP, "fam")
    base = build_model(SETUP, "fam")
    fingerprint = FamRuntime(base, None, "tiny", tmp_path, None).model_fingerprint
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                            trained)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        trained.fam_prompt.normal_(0, 1)
    ckpt = tmp_path / "ckpt.pt"
    meta = {"base_model": "tiny", "base_model_fingerprint": fingerprint, "fam_config": trained.fam_cfg.describe(),
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}}
    torch.save({"trainable": {"fam_prompt": trained.fam_prompt.detach()}, "lora": lora_weights(trained),
                "meta": meta, "step": 7}, ckpt)
    out = tmp_path / "a.safetensors"
    export_adapter(ckpt, out)
    rt = FamRuntime(base, None, "tiny", tmp_path, None)
    adapter = load_adapter(out, "tiny")
    assert adapter.meta["step"] == 7 and len(adapter.lora) == 3 * SETUP.layers
    adapter.apply(rt)
    tokens = torch.randint(0, 32, (1, 3 * SETUP.block_size), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, h_trained = trained.ingest(trained.new_state(), tokens)
        _, h_applied = base.ingest(base.new_state(), tokens)
    torch.testing.assert_close(h_applied, h_trained, rtol=1e-4, atol=1e-4)
    # shipped at another block size and window: the layout changes, the meta keeps the trained one
    wide = export_adapter(ckpt, tmp_path / "b.safetensors",
                          layout={"block_size": 2 * SETUP.block_size, "memory_blocks": 2})
    got = load_adapter(tmp_path / "b.safetensors", "tiny").fam_config()
    assert (got.block_size, got.memory_blocks) == (2 * SETUP.block_size, 2)
    assert wide["trained_fam_config"]["block_size"] == SETUP.block_size
    with pytest.raises(ValueError, match="only the block size"):
        export_adapter(ckpt, tmp_path / "c.safetensors", layout={"fam_len": 8})


def test_distillation_loss():
    """KL(teacher || model) is zero against the model's own log-probabilities and positive against another model's;
    the weighted loss is the one sequence_loss gives."""
    from training.train import distill_sequence_loss

    module, other = build_model(SETUP, "fam"), build_model(replace(SETUP, seed=SETUP.seed + 1), "fam")
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, 32, (2, 2 * SETUP.block_size + 3), generator=gen)
    weights = torch.rand(tokens.shape, generator=gen)

    def logprobs(m):
        with torch.no_grad():
            state, out = m.new_state(batch=2), []
            for a, b in state.cuts(tokens.shape[1]):
                state, h = m.forward_chunk(state, tokens[:, a:b])
                out.append(torch.log_softmax(m.lm_head(h).float(), -1))
            return torch.cat(out, 1)

    _, loss, kl_self, correct = distill_sequence_loss(module, module.new_state(batch=2), tokens, weights,
                                                      logprobs(module))
    _, loss_plain, correct_plain = sequence_loss(module, module.new_state(batch=2), tokens, weights)
    _, _, kl_other, _ = distill_sequence_loss(module, module.new_state(batch=2), tokens, weights, logprobs(other))
    assert abs(kl_self.item()) < 1e-3 * tokens.numel()
    assert kl_other.item() > 0.01 * tokens.numel()
    torch.testing.assert_close(loss, loss_plain)
    assert correct.item() == correct_plain.item()


def test_teacher_is_the_base_model_in_full_mode():
    """The distillation teacher ignores the LoRA being trained and sees the whole sequence (full mode)."""
    from peft import LoraConfig, inject_adapter_in_model

    from training.finetune import teacher_logprobs

    base = build_model(SETUP, "fam")
    trained = build_model(SETUP, "fam")
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]), trained)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    tokens = torch.randint(0, 32, (1, 3 * SETUP.block_size), generator=torch.Generator().manual_seed(7))
    got = teacher_logprobs(trained, tokens).float()
    with torch.no_grad():
        _, h = base.ingest(base.new_state(mode="full"), tokens)
        last = torch.log_softmax(base.lm_head(h).float(), -1)
        _, h_lora = trained.ingest(trained.new_state(mode="full"), tokens)
    torch.testing.assert_close(got[:, -1], last, atol=0.05, rtol=0)  # bf16 storage
    assert (torch.log_softmax(trained.lm_head(h_lora).float(), -1) - last).abs().max() > 0.1  # LoRA back on
    assert all(p.requires_grad for n, p in trained.named_parameters() if "lora_" in n)


@pytest.mark.slow
def test_tiny_passkey_fam_beats_bswa_past_the_window():
    """Step 1 of issue #5 (training/tiny_passkey.py): with m = 0 the window is the current block, so at the
    training length most keys lie blocks behind the question. FAM reads them from memory, BSWA guesses (10%).
    Length extrapolation (8x and more) is not asserted: at this budget it is not reached (docs/training.md)."""
    torch.set_num_threads(1)
    s = TinySetup()
    n = s.train_blocks * s.block_size
    fam = passkey_accuracy(train(s, "fam"), s, n, 64, seed=7)
    bswa = passkey_accuracy(train(s, "bswa"), s, n, 64, seed=7)
    assert fam >= 0.6 and bswa <= 0.4 and fam - bswa >= 0.3, (fam, bswa)  # measured: 0.80 vs 0.25 (script seeds)


def test_training_can_start_from_an_adapter_file(tmp_path):
    """--init-adapter: the prompt and LoRA weights of an exported adapter come back into a fresh run, also with
    another block size and window; an adapter of another LoRA or FAM layout is refused."""
    from types import SimpleNamespace

    from peft import LoraConfig, inject_adapter_in_model

    from model.adapter import save_adapter
    from model.runtime import FamRuntime
    from training.finetune import init_from_adapter, lora_weights

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    trained, fresh = build_model(SETUP, "fam"), build_model(SETUP, "fam")
    fingerprint = FamRuntime(fresh, None, "tiny", tmp_path, None).model_fingerprint
    for m in (trained, fresh):
        inject_adapter_in_model(cfg, m)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
        trained.fam_prompt.normal_(0, 1)
    meta = {"base_model_fingerprint": fingerprint, "fam_config": trained.fam_cfg.describe() | {"sink_tokens": 4},
            "lora": {"r": 4, "alpha": 8}, "step": 12}
    save_adapter(tmp_path / "a.safetensors", trained.fam_prompt, lora_weights(trained), meta)
    args = SimpleNamespace(init_adapter=tmp_path / "a.safetensors", lora_r=4, lora_alpha=8)
    trainable = {"fam_prompt": fresh.fam_prompt}
    assert init_from_adapter(fresh, trainable, fingerprint, args) == 12
    for name, (a, b) in lora_weights(trained).items():
        torch.testing.assert_close(lora_weights(fresh)[name], (a, b))
    torch.testing.assert_close(fresh.fam_prompt, trained.fam_prompt)
    with pytest.raises(ValueError, match="LoRA r/alpha"):
        init_from_adapter(fresh, trainable, fingerprint, SimpleNamespace(init_adapter=args.init_adapter, lora_r=8,
                                                                         lora_alpha=16))
    # another block size and window: the weights carry over (a curriculum grows them); another F does not
    cfg = trained.fam_cfg
    fresh.fam_cfg = cfg.replace(block_size=cfg.block_size * 2, memory_blocks=cfg.memory_blocks + 1)
    assert init_from_adapter(fresh, trainable, fingerprint, args) == 12
    fresh.fam_cfg = cfg.replace(fam_update_from=cfg.fam_update_from + 1)
    with pytest.raises(ValueError, match="FAM layout"):
        init_from_adapter(fresh, trainable, fingerprint, args)


# ------------------------------------------------------------------------------------------------------------------
# the cuts that make a step cheap (training/bench_step.py): each computes what the plain step computes


def _sparse_weights(shape, gen):
    w = torch.rand(shape, generator=gen)
    return torch.where(torch.rand(shape, generator=gen) < 0.8, 0.0, w)  # most positions carry no loss


def test_logits_only_where_a_loss_needs_them():
    """Sparse weights: the loss and the gradients equal a reference that takes logits at every position."""
    module = build_model(SETUP, "fam")
    gen = torch.Generator().manual_seed(8)
    tokens = torch.randint(0, 32, (2, 2 * SETUP.block_size + 5), generator=gen)
    weights = _sparse_weights(tokens.shape, gen)
    _, loss, correct = sequence_loss(module, module.new_state(batch=2), tokens, weights, use_checkpoint=False)
    loss.backward()
    got = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    state, ref, ref_correct = module.new_state(batch=2), 0.0, 0
    for a, b in state.cuts(tokens.shape[1]):
        state, h = module.forward_chunk(state, tokens[:, a:b])
        logits = module.logits(h)[:, :-1] if b == tokens.shape[1] else module.logits(h)
        t = tokens[:, a + 1:b + 1]
        w = weights[:, a:a + t.shape[1]]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), reduction="none")
        ref = ref + (ce * w.reshape(-1)).sum()
        ref_correct += int(((logits.argmax(-1) == t) & (w > 0)).sum())
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5) and correct.item() == ref_correct
    for n, p in module.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6)


def _logprobs(m, tokens):
    with torch.no_grad():
        state, out = m.new_state(batch=tokens.shape[0]), []
        for a, b in state.cuts(tokens.shape[1]):
            state, h = m.forward_chunk(state, tokens[:, a:b])
            out.append(torch.log_softmax(m.lm_head(h).float(), -1))
        return torch.cat(out, 1)


def test_top_k_distillation_and_the_kd_mask():
    """Top-k KD with k = V is the full KL; the KD mask restricts the KL to its positions (and the logits computed
    only there give the same value)."""
    from training.train import TopK, distill_sequence_loss

    module, other = build_model(SETUP, "fam"), build_model(replace(SETUP, seed=SETUP.seed + 1), "fam")
    gen = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, 32, (2, 2 * SETUP.block_size + 3), generator=gen)
    weights = _sparse_weights(tokens.shape, gen)
    teacher = _logprobs(other, tokens)
    run = lambda t, mask=None: distill_sequence_loss(module, module.new_state(batch=2), tokens, weights, t,  # noqa: E731
                                                     use_checkpoint=False, kd_mask=mask)
    _, loss, kl, _ = run(teacher)
    _, loss_k, kl_k, _ = run(TopK(*teacher.topk(teacher.shape[-1], -1)))
    torch.testing.assert_close(kl_k, kl)
    torch.testing.assert_close(loss_k, loss)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[0, 3:20] = True
    mask[1, -9:] = True
    _, loss_m, kl_m, _ = run(teacher, mask)
    mine = _logprobs(module, tokens)
    ref = (teacher.exp() * (teacher - mine)).sum(-1)[mask].sum()
    torch.testing.assert_close(kl_m, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss_m, loss)
    _, _, kl_small, _ = run(TopK(*teacher.topk(4, -1)))
    assert 0 < kl_small.item() < kl.item() * 1.5  # a truncated sum, not the KL


def test_layers_below_the_trainable_ones_run_without_autograd():
    """grad_from: with LoRA only on the upper layer, the loss and LoRA's gradients are those of the full graph; the
    prompt still learns (through the upper layer only)."""
    from peft import LoraConfig, inject_adapter_in_model

    s = replace(SETUP, layers=3)
    module = build_model(s, "fam")
    module.fam_cfg = module.fam_cfg.replace(fam_update_from=1)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["layers.1.self_attn.q_proj",
                                                                          "layers.2.mlp.down_proj"]), module)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    module.requires_grad_(False)
    trainable = {n: p for n, p in module.named_parameters() if "lora_" in n} | {"fam_prompt": module.fam_prompt}
    for p in trainable.values():
        p.requires_grad_(True)
    from training.finetune import grad_from

    assert grad_from(module, trainable) == 1
    gen = torch.Generator().manual_seed(10)
    tokens = torch.randint(0, 32, (1, 3 * s.block_size), generator=gen)
    weights = torch.rand(tokens.shape, generator=gen)
    results = []
    for first in (0, 1):
        module.zero_grad(set_to_none=True)
        state, loss, _ = sequence_loss(module, module.new_state(), tokens, weights, grad_from=first)
        (loss + state.fam.sum()).backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in trainable.items()}))
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, rel=1e-6)
    for n in g0:
        if n != "fam_prompt":
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-7)
    assert g1["fam_prompt"].abs().sum() > 0


@pytest.mark.realmodel
def test_finetune_runs_and_resumes_on_the_cpu(tmp_path):
    """Two steps of the real trainer with --device cpu (the CUDA path is the same code on another device type), then
    a resumed third; the step's PassKey rows skip the teacher."""
    import json

    from training.finetune import main

    common = ["--run", str(tmp_path), "--device", "cpu", "--block-size", "64", "--seq-blocks", "2", "2",
              "--mix", '{"passkey_standard": 0.5, "prose": 0.5}', "--min-gap", "64", "--kd-topk", "8",
              "--threads", "1"]
    main([*common, "--steps", "2"])
    main([*common, "--steps", "3", "--resume"])
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").open()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in log)
    assert all(r["kl"] == 0 for r in log if r["kinds"][0].startswith("passkey"))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["lora"]["layers_from"] == 12 and "resumed_with" in meta


def test_a_resumed_run_drops_the_log_lines_after_its_checkpoint(tmp_path):
    """A run that died after its last checkpoint logged steps the resumed run logs again: they go, the rest stays;
    a run that does not resume leaves an existing log alone."""
    import json

    from training.finetune import open_log

    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(1, 6)))
    open_log(path, None).close()
    assert len(path.read_text().splitlines()) == 5
    with open_log(path, 3) as log:
        log.write(json.dumps({"step": 4, "loss": 0.5}) + "\n")
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_lora_layout_follows_what_the_run_continues(tmp_path):
    """A fresh run puts LoRA on the layers >= 12; --init-adapter from the shipped adapter (LoRA on every layer, written
    before the layout was recorded) and --resume keep the layout they continue."""
    from model.adapter import BUNDLED
    from training.finetune import parse_args, save_checkpoint

    assert parse_args(["--run", str(tmp_path)]).lora_from == 12
    shipped = BUNDLED["SmolLM2-135M-Instruct"]
    assert parse_args(["--run", str(tmp_path), "--init-adapter", str(shipped)]).lora_from == 0
    assert parse_args(["--run", str(tmp_path), "--init-adapter", str(shipped), "--lora-from", "6"]).lora_from == 6
    # the gate the adapter is served with is the gate it goes on training with, unless told otherwise
    assert parse_args(["--run", str(tmp_path), "--init-adapter", str(shipped)]).fam_gate == 0.75
    assert parse_args(["--run", str(tmp_path)]).fam_gate == 1.0
    assert parse_args(["--run", str(tmp_path), "--fam-gate", "0"]).fam_gate == 0.0
    save_checkpoint(tmp_path / "ckpt.pt", meta={"lora": {"r": 8, "alpha": 16, "layers_from": 3}})
    assert parse_args(["--run", str(tmp_path), "--resume"]).lora_from == 3


@pytest.mark.parametrize("topk", [0, 5])
def test_fused_head_equals_autograd(topk):
    """HeadLoss (gradients formed in the forward) against autograd over float32 logits: values and gradients, with
    the lm_head's weight trained (the tiny model) and CE and KL weighted per row."""
    from training import train as T

    gen = torch.Generator().manual_seed(11)
    h = torch.randn(7, 16, generator=gen)
    weight = torch.randn(40, 16, generator=gen) * 0.5
    y = torch.randint(0, 40, (7,), generator=gen)
    w = torch.tensor([1.0, 0.0, 0.5, 2.0, 0.0, 1.0, 0.1])
    k = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    t = torch.log_softmax(torch.randn(7, 40, generator=gen), -1)
    t_logp, t_ids = (t, None) if not topk else t.topk(topk, -1)
    out = []
    for fused in (True, False):
        hh, ww = h.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if fused:
            ce, kl, correct = T.HeadLoss.apply(hh, ww, y, w, k, t_logp, t_ids)
        else:
            ce, kl, correct = T._head_loss_autograd(hh @ ww.t(), y, w, k, t_logp, t_ids)
        (0.3 * ce + 1.7 * kl).backward()
        out.append((ce, kl, correct, hh.grad, ww.grad))
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("amx, amp", [(True, "bf16"), (False, "off"), (None, "off")])
def test_amp_auto_follows_the_serving_dtype(monkeypatch, amx, amp):
    from model import loader
    from training.finetune import resolve_amp

    monkeypatch.setattr(loader, "cpu_has_amx", lambda: amx)
    assert resolve_amp("auto", "cpu") == amp
    assert resolve_amp("bf16", "cpu") == "bf16" and resolve_amp("off", "cpu") == "off"  # asked for, kept
