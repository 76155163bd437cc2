"""The retrieval curriculum (training/curriculum.py): the distance data, the schedule, the gradient path from the
question's block back to the key's block through the FAM state (m = 0), and the sanity test (fixed key, one block of
filler, answer digits only) on a tiny random model and, slow, on the real model."""

from __future__ import annotations

import random

import pytest
import torch

from training.curriculum import DistanceData, DistanceSchedule, answer_loss, build, sanity, sanity_args, to_batch

B = 64


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_dir)


@pytest.mark.parametrize("distance", [1, 2, 5])
@pytest.mark.parametrize("offset", [False, True])
def test_example_layout(tokenizer, distance, offset):
    data = DistanceData(tokenizer, B, seed=distance)
    ex = data.example(distance, random_offset=offset)
    key = tokenizer.decode(ex.answer)
    assert len(key) == 5 and key.isdigit()
    n_q = len(data.question) + len(data.enc(f" {key}"))
    assert len(ex.tokens) == distance * B + n_q  # the question and answer: a partial block `distance`
    assert tokenizer.decode(ex.tokens[-n_q:]) == " What is the pass key? The pass key is " + key
    block0 = tokenizer.decode(ex.tokens[:B])
    assert f"The pass key is {key}. Remember it. {key} is the pass key." in block0  # the key lies in block 0 ...
    assert key not in tokenizer.decode(ex.tokens[B:-n_q])  # ... and nowhere else before the answer
    # weights: exactly the 5 positions that predict the key's digits
    scored = [i for i, w in enumerate(ex.weights) if w > 0]
    assert len(scored) == 5 and [ex.tokens[i + 1] for i in scored] == ex.answer
    assert scored[-1] == len(ex.tokens) - 2


@pytest.mark.parametrize("pre", [1, 3])
def test_example_with_filler_blocks_before_the_key(tokenizer, pre):
    """`pre`: block 0 holds the prefix and filler, the key sentence sits in block `pre`, the question `distance`
    blocks after it; the same key in a swapped pair's two examples is all that differs."""
    data = DistanceData(tokenizer, B, seed=pre)
    ex = data.example(2, "71432", pre=pre)
    n_q = len(data.question) + len(data.enc(" 71432"))
    assert len(ex.tokens) == (pre + 2) * B + n_q
    assert tokenizer.decode(ex.tokens[:len(data.prefix)]) == tokenizer.decode(data.prefix)
    assert "71432" not in tokenizer.decode(ex.tokens[:pre * B])
    assert "The pass key is 71432." in tokenizer.decode(ex.tokens[pre * B:(pre + 1) * B])
    assert "71432" not in tokenizer.decode(ex.tokens[(pre + 1) * B:-n_q])
    true, swapped = data.swapped_pair(2, pre=pre)
    differ = [i for i, (a, b) in enumerate(zip(true.tokens, swapped.tokens, strict=True)) if a != b]
    assert differ and pre * B <= min(differ) and max(differ) < (pre + 1) * B


def test_fixed_key_and_batches(tokenizer):
    data = DistanceData(tokenizer, B, seed=0)
    a, b = data.example(2, "71432"), data.example(2, "71432")
    assert tokenizer.decode(a.answer) == tokenizer.decode(b.answer) == "71432"
    tokens, weights = to_batch([a, b])
    assert tokens.shape == weights.shape == (2, len(a.tokens)) and weights.sum() == 10
    with pytest.raises(ValueError):
        to_batch([a, data.example(3)])
    with pytest.raises(ValueError):
        DistanceData(tokenizer, 32, seed=0)  # the prefix and key sentence do not fit


def test_schedule_advances_on_exact_match_and_mixes_shorter_distances():
    s = DistanceSchedule(stages=(1, 2, 4, 8), advance=0.9, window=10, p_current=0.5)
    rng = random.Random(0)
    assert {s.draw(rng) for _ in range(50)} == {1}
    assert not s.record(1, [True] * 9, step=1)  # window not full yet
    assert not s.record(2, [True] * 10, step=2)  # not the current maximum: ignored
    assert s.record(1, [True], step=3) and s.current == 2 and s.history == [(3, 2)]
    assert not s.record(2, [True, False] * 5, step=4)  # 0.5 < 0.9
    assert s.record(2, [True] * 10, step=5) and s.current == 4  # the window slid past the misses
    draws = [s.draw(rng) for _ in range(2000)]
    assert set(draws) == {1, 2, 4} and 0.45 < draws.count(4) / 2000 < 0.55  # shorter ones stay mixed in
    saved = s.state_dict()
    t = DistanceSchedule(stages=(1, 2, 4, 8), advance=0.9, window=10)
    t.load_state_dict(saved)
    assert t.current == 4 and t.history == s.history and t.recent == s.recent
    s.record(4, [True] * 10, 6)
    assert s.current == 8 and not s.record(8, [True] * 10, 7) and s.current == 8  # the last stage stays


@pytest.fixture(scope="module")
def sharp_tiny_dir(tmp_path_factory, tiny_chat_dir):
    """The tiny chat checkpoint (real tokenizer) with weights drawn at std 0.3 instead of 0.02: at 0.02 the tied
    lm_head's logits cannot spread by more than ~2.5 nats after the final norm, so no loss can fall below ~8."""
    import shutil

    from tests.conftest import write_tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny-sharp")
    write_tiny_checkpoint(folder, "llama", vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                          initializer_range=0.3)
    for f in tiny_chat_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    return folder


def _tiny_args(tiny_chat_dir, **kw):
    argv = ["--model", str(tiny_chat_dir), "--block-size", str(B), "--fam-len", "4", "--fam-update-from", "0",
            "--lora-from", "0", "--amp", "off", "--threads", "2", "--batch", "2"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return sanity_args(argv)


@pytest.mark.parametrize("control", ["none", "detach", "bswa"])
def test_answer_gradient_reaches_the_key_block_only_through_fam(tiny_chat_dir, control):
    """m = 0, one block of filler: the answer loss's gradient w.r.t. the key block's input embeddings is non-zero
    through the FAM state, and exactly zero when the state's gradient is cut (detach) or absent (bswa)."""
    args = _tiny_args(tiny_chat_dir, control=control)
    rt, _, trainable, _ = build(args, "bswa" if control == "bswa" else "fam")
    module = rt.module
    data = DistanceData(rt.tokenizer, B, seed=0)
    tokens, weights = to_batch([data.example(2) for _ in range(2)])
    embedded = []

    def leaf(mod, inputs, out):  # each block's input embeddings as a leaf of the graph (the embedding is frozen)
        embedded.append(out.detach().requires_grad_())
        return embedded[-1]

    hook = module.embed_tokens.register_forward_hook(leaf)
    try:
        _, loss, _, _ = answer_loss(module, module.new_state(batch=2), tokens, weights, detach_fam=control == "detach")
    finally:
        hook.remove()
    assert len(embedded) == 3  # block 0 (key), block 1 (filler), the question's partial block
    g_key, g_filler, g_question = torch.autograd.grad(loss, embedded, allow_unused=True, retain_graph=True)
    norm = lambda g: 0.0 if g is None else g.norm().item()
    assert norm(g_question) > 0
    if control == "none":
        assert norm(g_key) > 1e-8 and norm(g_filler) > 1e-8
        assert trainable["fam_prompt"].requires_grad
        (g_prompt,) = torch.autograd.grad(loss, [trainable["fam_prompt"]])
        assert g_prompt.norm() > 0
    else:
        assert norm(g_key) == 0.0 and norm(g_filler) == 0.0


def test_detach_control_keeps_the_forward(tiny_chat_dir):
    """The detach control changes gradients only: the loss is the same as without it."""
    args = _tiny_args(tiny_chat_dir)
    rt, _, _, _ = build(args, "fam")
    data = DistanceData(rt.tokenizer, B, seed=1)
    tokens, weights = to_batch([data.example(3) for _ in range(2)])
    with torch.no_grad():
        losses = [answer_loss(rt.module, rt.module.new_state(batch=2), tokens, weights, detach_fam=d)[1].item()
                  for d in (False, True)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_tiny_sanity_fixed_key(sharp_tiny_dir):
    """The plumbing of the sanity test on a tiny random model: a fixed key's answer loss falls below 0.05 nats per
    digit within 50 steps (the weights alone can learn it: this checks the training step, not the memory)."""
    recs = sanity(_tiny_args(sharp_tiny_dir, key="fixed", steps=50, lr=1e-2, prompt_lr=1e-2), echo=False)
    assert recs[0]["loss"] > 1.0
    assert min(r["loss"] for r in recs) < 0.05, [r["loss"] for r in recs]


@pytest.mark.slow
@pytest.mark.realmodel
def test_real_model_sanity_fixed_key():
    """Issue 9, step 3: SmolLM2-135M, B = 64, m = 0, one fixed key, one block of filler between key and question,
    loss on the answer digits only: below 0.05 nats per digit within ~50 steps (~5 min on one CPU thread)."""
    recs = sanity(sanity_args(["--key", "fixed", "--steps", "50", "--batch", "4", "--threads", "2"]), echo=False)
    losses = [r["loss"] for r in recs]
    assert min(losses[-10:]) < 0.05, losses


@pytest.mark.parametrize("pre", [0, 2])
def test_readouts_ask_the_question_after_every_block_from_the_key(tiny_chat_dir, pre):
    """`readout_from`: the loss trained on is the mean over the final question and a question asked after each
    full block from the key's on, each the same as an example cut short to that distance; the final question's own
    loss and exact match do not change."""
    args = _tiny_args(tiny_chat_dir)
    rt, _, _, _ = build(args, "fam")
    m = rt.module
    data = DistanceData(rt.tokenizer, B, seed=7)
    d = 3
    tokens, weights = to_batch([data.example(d, pre=pre) for _ in range(2)])
    n_qa = tokens.shape[1] % B
    with torch.no_grad():
        plain = answer_loss(m, m.new_state(batch=2), tokens, weights)
        read = answer_loss(m, m.new_state(batch=2), tokens, weights, readout_from=pre)
        shorter = [answer_loss(m, m.new_state(batch=2), torch.cat((tokens[:, :(pre + j) * B], tokens[:, -n_qa:]), 1),
                               torch.cat((weights[:, :(pre + j) * B], weights[:, -n_qa:]), 1))[1] for j in range(1, d)]
    assert read[1].item() == pytest.approx(plain[1].item(), rel=1e-5) and torch.equal(read[2], plain[2])
    assert plain[3].item() == pytest.approx(plain[1].item(), rel=1e-6)  # no readouts: the question's loss
    expected = (plain[1] + sum(shorter)) / d  # every readout scores the same 5 digits per row
    assert read[3].item() == pytest.approx(expected.item(), rel=1e-4)
    assert abs(read[3].item() - plain[1].item()) > 1e-4  # the readouts are not the final question again


def test_curriculum_trains_checkpoints_and_resumes(tiny_chat_dir, tmp_path):
    """`train` end to end on the tiny model: log lines, a checkpoint with the schedule, resume continues the step
    count; an advance threshold of 0 moves the maximum distance up the stages as soon as a window is full."""
    import json

    from training.curriculum import train

    run = tmp_path / "run"
    common = ["--model", str(tiny_chat_dir), "--block-size", str(B), "--fam-len", "4", "--fam-update-from", "0",
              "--lora-from", "0", "--amp", "off", "--threads", "1", "--batch", "2", "--run", str(run),
              "--stages", "1", "2", "4", "--window", "2", "--advance", "0"]
    train(common + ["--steps", "3"])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert log[0]["distance"] == 1 and log[0]["advanced_to"] == 2  # the first batch (2 rows) fills the window
    assert log[1]["max_distance"] == 2
    c = torch.load(run / "ckpt.pt", weights_only=False)
    assert c["step"] == 3 and c["schedule"]["level"] >= 1 and "fam_prompt" in c["trainable"]
    assert c["meta"]["fam_config"]["memory_blocks"] == 0
    train(common + ["--steps", "5", "--resume"])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert all(r["distance"] <= r["max_distance"] for r in log)
    assert torch.load(run / "ckpt.pt", weights_only=False)["schedule"]["level"] == 2
    with pytest.raises(ValueError, match="does not fit"):  # another LoRA layout cannot resume this run
        train([*common[:-4], "--lora-r", "2", "--lora-from", "1", "--steps", "6", "--resume"])
    from model.adapter import load_adapter
    from training.finetune import export_adapter

    export_adapter(run / "ckpt.pt", tmp_path / "a.safetensors")
    adapter = load_adapter(tmp_path / "a.safetensors", "")
    assert adapter.fam_config().memory_blocks == 0 and adapter.meta["step"] == 5


def test_curriculum_replay_batches_keep_the_key_first_and_leave_the_schedule(tiny_chat_dir, tmp_path):
    """`--replay-distances`: a replay batch is at one of those distances with the key in the first block (pre 0,
    whatever --pre-max says) and does not count towards the schedule (advance 0 would move it at once). With
    --readout every line logs the loss trained on as well."""
    import json

    from training.curriculum import train

    run = tmp_path / "run"
    train(["--model", str(tiny_chat_dir), "--block-size", str(B), "--fam-len", "4", "--fam-update-from", "0",
           "--lora-from", "0", "--amp", "off", "--threads", "1", "--batch", "2", "--run", str(run),
           "--stages", "1", "2", "--window", "2", "--advance", "0", "--pre-max", "3",
           "--replay-distances", "3", "--p-replay", "1", "--steps", "3", "--readout"])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["replay"], r["distance"], r["pre"], r["max_distance"]) for r in log] == [(True, 3, 0, 1)] * 3
    assert not any("advanced_to" in r for r in log)
    # --readout: the loss trained on is over the readouts at d = 1, 2 and the question, not the question's alone
    assert all(abs(r["trained_loss"] - r["loss"]) > 1e-4 for r in log)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["data_recipe"]["replay_distances"] == [3] and meta["data_recipe"]["p_replay"] == 1.0


def test_swapped_pair_differs_only_in_block0s_key(tokenizer):
    data = DistanceData(tokenizer, B, seed=4)
    ex, sw = data.swapped_pair(3, random_offset=True)
    assert len(ex.tokens) == len(sw.tokens) and ex.weights == sw.weights and ex.answer == sw.answer
    diff = [i for i, (a, b) in enumerate(zip(ex.tokens, sw.tokens, strict=True)) if a != b]
    assert diff and max(diff) < B  # only block 0 differs
    key, other = tokenizer.decode(ex.answer), tokenizer.decode(sw.tokens[:B])
    assert key not in other and tokenizer.decode(sw.tokens[-5:]) == key


@pytest.mark.slow
@pytest.mark.realmodel
def test_real_model_retrieves_one_of_two_keys_through_fam():
    """The memory half of the sanity test (a fixed key needs no memory): keys 11111 or 99999, one block of filler,
    m = 0. Teacher-forced, digits 2-5 follow from the first, so without the memory the best loss is ln 2 / 5 = 0.139
    nats per digit at EM 0.5 (measured with the FAM state's gradient cut: 0.145, docs/retrieval_curriculum.md). Through
    the FAM state it falls to ~0 within ~40 steps (measured: 0.000 over steps 41-100)."""
    recs = sanity(sanity_args(["--key", "set", "--distance", "2", "--steps", "60", "--batch", "4", "--threads", "2"]),
                  echo=False)
    last = recs[-10:]
    assert sum(r["loss"] for r in last) / len(last) < 0.05, [r["loss"] for r in recs]
    assert sum(r["em"] for r in last) / len(last) > 0.9


def test_keys_with_fewer_varying_digits(tokenizer):
    data = DistanceData(tokenizer, B, seed=5)
    keys = [data.random_key(1) for _ in range(200)]
    assert all(len(k) == 5 and len(set(k)) == 1 for k in keys) and len(set(keys)) == 10
    two = [data.random_key(2) for _ in range(200)]
    assert all(k[2:] == k[1] * 3 for k in two) and len(set(two)) > 50
    assert all(10000 <= int(data.random_key()) <= 99999 for _ in range(50))
