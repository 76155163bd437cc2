"""FAM_SPEC's invariants on tiny random Llama and Qwen2 checkpoints, loaded through the real loader."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from transformers import AutoModelForCausalLM

from model import FamConfig, FamRuntime, FamState
from model.fam import _mask
from model.loader import load_module
from model.runtime import StateMismatchError, read_safetensors_metadata


class _NoTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [1]


def tiny(folder, **fam) -> torch.nn.Module:
    module, _ = load_module(folder, FamConfig(**fam), torch.float32, torch.device("cpu"), _NoTokenizer())
    return module


def chunked_logits(m, state: FamState, ids: torch.Tensor, sizes: list[int]) -> tuple[FamState, torch.Tensor]:
    """Ingest ids in the given chunk sizes (each cut further at block boundaries); all-position logits."""
    out, pos = [], 0
    for n in sizes:
        for a, b in state.cuts(n):
            state, h = m.forward_chunk(state, ids[:, pos + a:pos + b])
            out.append(m.logits(h))
        pos += n
    return state, torch.cat(out, 1)


def assert_states_equal(a: FamState, b: FamState, atol=1e-5, rtol=1e-4):
    assert a.layout() == b.layout()
    for name in ("k", "v"):
        for li, (x, y) in enumerate(zip(getattr(a, name), getattr(b, name), strict=True)):
            torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=f"{name}[{li}]")
    torch.testing.assert_close(a.fam, b.fam, atol=atol, rtol=rtol)
    assert torch.equal(a.base, b.base) and torch.equal(a.n_tokens, b.n_tokens) and torch.equal(a.fam_fresh, b.fam_fresh)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("fam", [dict(mode="full", block_size=64), dict(mode="bswa", block_size=512)])
@torch.no_grad()
def test_equals_hf_model(tiny_dirs, arch, fam):
    """Invariant 1: full mode (any block size), or FAM off with one block covering the text, is the HF model."""
    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch], dtype=torch.float32)
    m = tiny(tiny_dirs[arch], **fam)
    ids = torch.randint(0, 211, (2, 300), generator=torch.Generator().manual_seed(1))
    _, ours = chunked_logits(m, m.new_state(batch=2), ids, [300])
    torch.testing.assert_close(ours, hf(ids).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["fam", "bswa", "sink", "full", "fam-upper", "fam-gate"])
@torch.no_grad()
def test_chunking_does_not_matter(tiny_dirs, arch, mode):
    """Invariant 2: one call, random splits and token-by-token decode give the same state and logits."""
    extra = {"fam-upper": {"fam_update_from": 1}, "fam-gate": {"fam_gate": 0.5}}.get(mode, {})
    m = tiny(tiny_dirs[arch], mode=mode.split("-")[0], block_size=16, memory_blocks=1, fam_len=4, **extra)
    ids = torch.randint(0, 211, (1, 100), generator=torch.Generator().manual_seed(2))
    s_one, l_one = chunked_logits(m, m.new_state(), ids, [100])
    s_split, l_split = chunked_logits(m, m.new_state(), ids, [7, 30, 1, 45, 17])
    s_tok, l_tok = chunked_logits(m, m.new_state(), ids, [1] * 100)
    for s, logits in ((s_split, l_split), (s_tok, l_tok)):
        assert_states_equal(s_one, s)
        torch.testing.assert_close(logits, l_one, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["fam", "bswa"])
@torch.no_grad()
def test_shift_invariance(tiny_dirs, mode):
    """Invariant 3: the same tokens at position 0 and 1,000,000 give the same outputs."""
    m = tiny(tiny_dirs["llama"], mode=mode, block_size=16, memory_blocks=1, fam_len=4)
    ids = torch.randint(0, 211, (1, 90), generator=torch.Generator().manual_seed(3))
    s0, l0 = chunked_logits(m, m.new_state(position=0), ids, [90])
    s1, l1 = chunked_logits(m, m.new_state(position=1_000_000), ids, [90])
    torch.testing.assert_close(l1, l0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s1.fam, s0.fam, atol=1e-4, rtol=1e-4)
    assert int(s1.base[0] - s0.base[0]) == 1_000_000


@torch.no_grad()
def test_no_peeking_inside_a_block(tiny_dirs):
    """Invariant 4: a block token's output ignores later tokens of its block, including through the FAM update
    computed in the same pass; the FAM update itself does read the whole block."""
    m = tiny(tiny_dirs["llama"], mode="fam", block_size=16, memory_blocks=1, fam_len=4)
    g = torch.Generator().manual_seed(4)
    prefix = torch.randint(0, 211, (1, 32), generator=g)  # two complete blocks: FAM state is non-trivial
    state, _ = m.ingest(m.new_state(), prefix)
    block = torch.randint(0, 211, (1, 16), generator=g)
    changed = block.clone()
    changed[0, 9:] = (changed[0, 9:] + 1) % 211
    s_a, h_a = m.forward_chunk(state, block)  # completes the block: FAM rows are in this pass
    s_b, h_b = m.forward_chunk(state, changed)
    torch.testing.assert_close(h_a[:, :9], h_b[:, :9], atol=1e-6, rtol=0)
    assert not torch.allclose(h_a[:, 9:], h_b[:, 9:])
    assert not torch.allclose(s_a.fam, s_b.fam)  # the update saw the whole block


def test_mask_table():
    """The mask follows FAM_SPEC's table: FAM rows see FAM and the whole current block but no memory;
    block tokens see FAM, memory and their block causally."""
    nf, S, T, block_start = 2, 5, 3, 4  # 4 memory slots, 1 earlier slot of the current block, 3 new tokens
    mask = _mask(nf, S, T, block_start, nf, torch.device("cpu")).int()
    fam = [[1, 1, 0, 0, 0, 0, 1, 1, 1, 1]] * 2
    toks = [[1, 1, 1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]]
    assert mask.tolist() == fam + toks


@pytest.mark.parametrize("mode", ["fam", "bswa", "sink"])
@torch.no_grad()
def test_state_size_is_constant(tiny_dirs, mode):
    """Invariant 5: 10x more text, same state bytes (compared at the same point of a block)."""
    m = tiny(tiny_dirs["llama"], mode=mode, block_size=16, memory_blocks=2, fam_len=4)
    ids = torch.randint(0, 211, (1, 1605), generator=torch.Generator().manual_seed(5))
    short, _ = m.ingest(m.new_state(), ids[:, :165])
    long, _ = m.ingest(m.new_state(), ids)
    assert short.nbytes == long.nbytes
    assert long.n_cached == m.fam_cfg.n_sinks + 2 * 16 + 5


@torch.no_grad()
def test_full_mode_grows_and_stops_at_context(tiny_dirs):
    m = tiny(tiny_dirs["llama"], mode="full", block_size=256)
    s, _ = m.ingest(m.new_state(), torch.zeros(1, 4000, dtype=torch.long))
    assert s.n_cached == 4000
    with pytest.raises(ValueError, match="context of 4096"):
        m.ingest(s, torch.zeros(1, 200, dtype=torch.long))


@torch.no_grad()
def test_batched_states_match_single(tiny_dirs):
    """Sessions at different positions but equal layout run as one batch with the same results."""
    m = tiny(tiny_dirs["llama"], mode="fam", block_size=16, memory_blocks=1, fam_len=4)
    g = torch.Generator().manual_seed(6)
    a, _ = m.ingest(m.new_state(), torch.randint(0, 211, (1, 48), generator=g))
    b, _ = m.ingest(m.new_state(), torch.randint(0, 211, (1, 80), generator=g))
    nxt = torch.randint(0, 211, (2, 16), generator=g)
    batch, hb = m.forward_chunk(FamState.stack([a, b]), nxt)
    for i, s in enumerate((a, b)):
        single, hs = m.forward_chunk(s, nxt[i:i + 1])
        torch.testing.assert_close(hb[i:i + 1], hs, atol=1e-5, rtol=1e-4)
        assert_states_equal(batch.split()[i], single)
    with pytest.raises(ValueError, match="different cache layouts"):
        FamState.stack([a, m.ingest(a, nxt[:1, :3])[0]])


@pytest.mark.parametrize(("fam_update_from", "fam_gate"), [(0, 1.0), (1, 1.0), (1, 0.75)])
@torch.no_grad()
def test_forward_many_matches_one_by_one(tiny_dirs, fam_update_from, fam_gate):
    """Documents in different modes and at different fills of their block (decoding one token, a chunk, a chunk
    that completes the block, a fresh state) run as one ragged pass with the results of running them alone."""
    m = tiny(tiny_dirs["llama"], mode="fam", block_size=16, memory_blocks=1, fam_len=4,
             fam_update_from=fam_update_from, fam_gate=fam_gate)
    g = torch.Generator().manual_seed(7)
    states = []
    for n, mode in [(48, "fam"), (83, "fam"), (5, "bswa"), (15, "sink"), (30, "full"), (0, "fam")]:
        s = m.new_state(mode=mode)
        states.append(m.ingest(s, torch.randint(0, 211, (1, n), generator=g))[0] if n else s)
    chunks = [torch.randint(0, 211, (min(k, 16 - s.n_block),), generator=g)
              for k, s in zip([1, 13, 11, 1, 2, 16], states, strict=True)]
    assert any(s.n_block + len(c) == 16 for s, c in zip(states, chunks, strict=True))  # some blocks complete
    for s, c, (batched, h) in zip(states, chunks, m.forward_many(states, chunks), strict=True):
        alone, h_alone = m.forward_chunk(s, c[None])
        torch.testing.assert_close(h, h_alone, atol=1e-5, rtol=1e-4)
        assert_states_equal(batched, alone)


@pytest.mark.parametrize("rows", [1, 5, 64])
@pytest.mark.parametrize("masked", [False, True])
def test_few_queries_attention_equals_sdpa(tiny_dirs, rows, masked):
    """The attention of few query rows (bf16 and other non-float32 dtypes: a decoded token, a block's last token
    with its feedback rows) is scaled dot-product attention, with the grouped heads and the mask as SDPA reads
    them."""
    attn = tiny(tiny_dirs["llama"]).layers[0].self_attn
    assert attn.n_heads > attn.n_kv  # grouped-query attention: the head-to-kv mapping is exercised
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, attn.n_heads, rows, attn.head_dim, generator=g)
    k, v = (torch.randn(2, attn.n_kv, 37 + rows, attn.head_dim, generator=g) for _ in range(2))
    mask = None
    if masked:
        mask = torch.rand(rows, 37 + rows, generator=g) > 0.4
        mask[:, 0] = True
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(attn.few_queries(q, k, v, mask), ref, atol=1e-5, rtol=1e-4)
    for few in (64, 0):  # few_queries (CPUs without AMX), SDPA (with AMX, CUDA)
        attn.few_rows = few
        fast = attn.heads(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
        torch.testing.assert_close(fast.float(), ref, atol=3e-2, rtol=3e-2)


def test_few_queries_only_on_cpus_without_amx():
    from model import loader

    cpu = torch.device("cpu")
    assert loader.few_query_rows(cpu, amx=False) == 64
    assert loader.few_query_rows(cpu, amx=True) == 0
    assert loader.few_query_rows(torch.device("cuda"), amx=False) == 0


def test_gradient_reaches_prompt_through_blocks(tiny_dirs):
    """Training path: the loss on block 3 back-propagates through the FAM updates of blocks 0-2 to P."""
    m = tiny(tiny_dirs["llama"], mode="fam", block_size=8, memory_blocks=0, fam_len=4)
    m.fam_prompt.requires_grad_(True)
    ids = torch.randint(0, 211, (1, 32), generator=torch.Generator().manual_seed(7))
    state = m.new_state()
    for i in range(3):
        state, _ = m.forward_chunk(state, ids[:, 8 * i:8 * i + 8])
    _, h = m.forward_chunk(state, ids[:, 24:32])
    m.logits(h).logsumexp(-1).sum().backward()
    assert m.fam_prompt.grad is not None and m.fam_prompt.grad.abs().sum() > 0


@torch.no_grad()
def test_memory_is_only_reachable_through_fam(tiny_dirs):
    """With m = 0 a token far back can only influence the present through the feedback state: in fam mode
    it does, in bswa mode it cannot."""
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 211, (1, 64), generator=g)
    other = ids.clone()
    other[0, 3] = (other[0, 3] + 1) % 211  # a token in block 0 of 4
    for mode, expect_change in (("fam", True), ("bswa", False)):
        m = tiny(tiny_dirs["llama"], mode=mode, block_size=16, memory_blocks=0, fam_len=4)
        _, la = m.ingest(m.new_state(), ids)
        _, lb = m.ingest(m.new_state(), other)
        assert (not torch.allclose(la, lb, atol=1e-6)) == expect_change, mode


@torch.no_grad()
def test_runtime_roundtrip_and_mismatch(tiny_chat_dir):
    """Save -> load -> continue equals never saving; another configuration refuses the state by name; another
    dtype casts it."""
    rt = FamRuntime.load(tiny_chat_dir, fam=FamConfig(block_size=16, memory_blocks=1, fam_len=4), dtype="float32")
    ids = rt.encode("The quick brown fox jumps over the lazy dog. " * 6)
    state, _ = rt.ingest(rt.new_state(), ids)
    restored, _ = rt.state_from_bytes(rt.state_to_bytes(state))
    assert_states_equal(state, restored, atol=0)
    _, la = rt.ingest(state, ids[:5])
    _, lb = rt.ingest(restored, ids[:5])
    assert torch.equal(la, lb)

    other = FamRuntime.load(tiny_chat_dir, fam=FamConfig(block_size=32, memory_blocks=1, fam_len=4), dtype="float32")
    with pytest.raises(ValueError, match="block_size: saved 16, this server 32"):
        other.state_from_bytes(rt.state_to_bytes(state))
    bf16 = FamRuntime.load(tiny_chat_dir, fam=FamConfig(block_size=16, memory_blocks=1, fam_len=4), dtype="bfloat16")
    cast, _ = bf16.state_from_bytes(rt.state_to_bytes(state))  # another dtype: the state is cast
    assert cast.k[0].dtype == cast.fam.dtype == torch.bfloat16 and cast.base.dtype == torch.int64
    assert_states_equal(cast.map(lambda t: t.float() if t.is_floating_point() else t), state, atol=0.05, rtol=0.02)
    back, _ = rt.state_from_bytes(bf16.state_to_bytes(cast))  # and back: bfloat16 -> float32 is exact
    assert_states_equal(back, cast.map(lambda t: t.float() if t.is_floating_point() else t), atol=0, rtol=0)
    with pytest.raises(ValueError, match="not a FAM state"):
        rt.state_from_bytes(b"\x00" * 4 + b"garbage")
    data = rt.state_to_bytes(state)
    meta = read_safetensors_metadata(data)
    meta["fam_config"] = json.dumps({**json.loads(meta["fam_config"]), "fam_newer_setting": 1})
    with pytest.raises(StateMismatchError, match="does not know: \\['fam_newer_setting'\\]"):
        rt.state_from_bytes(st_save(st_load(data), metadata=meta))  # another server version's state


@torch.no_grad()
def test_zero_first_residual_only_changes_the_first_update(tiny_dirs):
    """The paper's zero residual applies to the update from the learned initial state and to no later one."""
    ids = torch.randint(0, 211, (1, 32), generator=torch.Generator().manual_seed(9))
    paper = tiny(tiny_dirs["llama"], mode="fam", block_size=16, memory_blocks=1, fam_len=4, zero_first_residual=True)
    ours = tiny(tiny_dirs["llama"], mode="fam", block_size=16, memory_blocks=1, fam_len=4)
    sp, _ = paper.forward_chunk(paper.new_state(), ids[:, :16])
    so, _ = ours.forward_chunk(ours.new_state(), ids[:, :16])
    assert not torch.allclose(sp.fam, so.fam)
    assert not sp.fam_fresh.any() and not so.fam_fresh.any()
    sp = paper.with_fam(sp, so.fam, so.fam_fresh)  # same feedback state, no longer fresh: the models agree
    _, hp = paper.forward_chunk(sp, ids[:, 16:])
    _, ho = ours.forward_chunk(so, ids[:, 16:])
    torch.testing.assert_close(hp, ho)


@torch.no_grad()
def test_layers_below_fam_update_from_keep_their_state(tiny_dirs):
    """fam_update_from = 1: layer 0 keeps the initial state through every block, the layers above update it exactly
    as with every layer updating (a layer's update does not depend on another layer's feedback state)."""
    ids = torch.randint(0, 211, (1, 48), generator=torch.Generator().manual_seed(10))
    upper = tiny(tiny_dirs["llama"], mode="fam", block_size=16, memory_blocks=1, fam_len=4, fam_update_from=1)
    every = tiny(tiny_dirs["llama"], mode="fam", block_size=16, memory_blocks=1, fam_len=4)
    su, _ = upper.forward_chunk(upper.new_state(), ids[:, :16])
    se, _ = every.forward_chunk(every.new_state(), ids[:, :16])
    torch.testing.assert_close(su.fam[:, 0], upper.initial_fam()[0][None])
    assert not torch.allclose(se.fam[:, 0], every.initial_fam()[0][None])
    torch.testing.assert_close(su.fam[:, 1:], se.fam[:, 1:])  # first block: same inputs, same update above layer 0
    su, _ = upper.ingest(su, ids[:, 16:])
    torch.testing.assert_close(su.fam[:, 0], upper.initial_fam()[0][None])
    with pytest.raises(ValueError, match="fam_update_from"):
        FamConfig(fam_update_from=-1)


@torch.no_grad()
def test_fam_gate_keeps_a_fraction_of_each_move_from_the_initial_state(tiny_dirs):
    """fam_gate g: F = F0 + g·(F_new - F0) after every update; g = 0 never leaves F0, g = 1 is the paper's update."""
    ids = torch.randint(0, 211, (1, 48), generator=torch.Generator().manual_seed(12))
    kw = dict(mode="fam", block_size=16, memory_blocks=1, fam_len=4)
    plain, half, frozen = (tiny(tiny_dirs["llama"], **kw, fam_gate=g) for g in (1.0, 0.5, 0.0))
    f0 = plain.initial_fam()
    s_p, _ = plain.forward_chunk(plain.new_state(), ids[:, :16])
    s_h, _ = half.forward_chunk(half.new_state(), ids[:, :16])
    torch.testing.assert_close(s_h.fam[0], f0 + 0.5 * (s_p.fam[0] - f0))  # first block: the same update, halved
    s_h, _ = half.ingest(s_h, ids[:, 16:])
    s_p, _ = plain.ingest(s_p, ids[:, 16:])
    assert not torch.allclose(s_h.fam, s_p.fam, atol=1e-4)
    s_f, _ = frozen.ingest(frozen.new_state(), ids)
    torch.testing.assert_close(s_f.fam[0], f0)
    assert "fam_gate" not in FamConfig().describe() and FamConfig(fam_gate=0.5).describe()["fam_gate"] == 0.5
    with pytest.raises(ValueError, match="fam_gate"):
        FamConfig(fam_gate=1.5)


def test_cuts_follow_block_boundaries():
    """FamState.cuts: the spans forward_chunk accepts in turn, from any fill of the current block."""
    from dataclasses import replace

    state = FamState(cfg=FamConfig(block_size=8), k=(), v=(), fam=torch.zeros(1, 0, 0, 0), fam_fresh=torch.ones(1),
                     base=torch.zeros(1), n_tokens=torch.zeros(1), n_block=0, n_sinks=0)
    assert state.cuts(0) == []
    assert state.cuts(5) == [(0, 5)]
    assert state.cuts(20) == [(0, 8), (8, 16), (16, 20)]
    assert replace(state, n_block=5).cuts(20) == [(0, 3), (3, 11), (11, 19), (19, 20)]
    assert replace(state, n_block=5).cuts(3) == [(0, 3)]
