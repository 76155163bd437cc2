"""The one-row weight copies (`FamLM.keep_row_weights`, `--decode-dtype`): a float32 model decoding one token
alone reads bfloat16 copies of its projections, and every pass of more rows reads the float32 weights unchanged."""

from __future__ import annotations

import pytest
import torch

from model import fam, loader
from model.loader import ModelLoadError
from tests.model.test_fam import assert_states_equal, tiny


def _doc(m, n: int, seed: int):
    ids = torch.randint(0, 211, (1, n), generator=torch.Generator().manual_seed(seed))
    return m.ingest(m.new_state(mode="fam"), ids)[0]


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v with biases
def test_one_row_reads_the_copies_and_more_rows_do_not(tiny_dirs, arch):
    m = tiny(tiny_dirs[arch], mode="fam", block_size=16, memory_blocks=1, fam_len=4)
    for name, p in m.named_parameters():
        if name.endswith("bias"):  # Hugging Face initialises biases to zero: make them count
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    state, tok, chunk = _doc(m, 21, 1), torch.tensor([[7]]), torch.tensor([[7, 8, 9]])
    ref_one = m.forward_chunk(state, tok)
    ref_many = m.forward_chunk(state, chunk)
    ref_logits = m.logits(ref_one[1][0])

    m.keep_row_weights(torch.bfloat16)
    attn = m.layers[0].self_attn
    assert attn.row_qkv.dtype == m.layers[0].mlp.row_gate_up.dtype == m.lm_head.row_weight.dtype == torch.bfloat16
    assert torch.equal(attn.row_qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).bfloat16())
    one = m.forward_chunk(state, tok)
    many = m.forward_chunk(state, chunk)
    logits = m.logits(one[1][0])
    assert_states_equal(many[0], ref_many[0])  # three rows: the float32 weights, bit for bit
    assert torch.equal(many[1], ref_many[1])
    assert not torch.equal(one[1], ref_one[1])  # one row: the copies (rounding shows)
    torch.testing.assert_close(one[1], ref_one[1], atol=5e-2, rtol=5e-2)
    assert_states_equal(one[0], ref_one[0], atol=5e-2, rtol=5e-2)  # the token's keys and values: biases included
    torch.testing.assert_close(logits, ref_logits, atol=5e-2, rtol=5e-2)
    assert one[0].k[0].dtype == torch.float32  # the state keeps the model's dtype

    for copy in (m.layers[-1].mlp.down_proj.row_weight, m.layers[-1].mlp.row_gate_up, m.layers[-1].self_attn.row_qkv):
        kept = copy.clone()
        copy.zero_()  # each copy is what one row reads
        assert not torch.equal(m.forward_chunk(state, tok)[1], one[1])
        copy.copy_(kept)
    assert torch.equal(m.forward_chunk(state, tok)[1], one[1])

    m.keep_row_weights(None)
    again = m.forward_chunk(state, tok)
    assert torch.equal(again[1], ref_one[1]) and torch.equal(m.logits(again[1][0]), ref_logits)


def test_decode_dtype_auto_is_bfloat16_for_float32_on_a_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loader.resolve_decode_dtype("auto", torch.float32, cpu) == torch.bfloat16
    assert loader.resolve_decode_dtype("auto", torch.bfloat16, cpu) is None
    assert loader.resolve_decode_dtype("auto", torch.float32, cuda) is None
    assert loader.resolve_decode_dtype("none", torch.float32, cpu) is None
    assert loader.resolve_decode_dtype("bfloat16", torch.bfloat16, cpu) is None  # the model's own: no copy
    assert loader.resolve_decode_dtype("bfloat16", torch.float32, cuda) == torch.bfloat16
    with pytest.raises(ModelLoadError, match="decode dtype"):
        loader.resolve_decode_dtype("int4", torch.float32, cpu)


def test_runtime_keeps_copies_when_asked(tiny_chat_dir):
    from model import FamRuntime
    from tests.conftest import TINY_FAM

    plain = FamRuntime.load(tiny_chat_dir, fam=TINY_FAM, dtype="float32")
    rt = FamRuntime.load(tiny_chat_dir, fam=TINY_FAM, dtype="float32", decode_dtype="auto")
    assert plain.decode_dtype is None and rt.decode_dtype == torch.bfloat16
    down = rt.module.layers[0].mlp.down_proj
    assert torch.equal(down.row_weight, down.weight.to(torch.bfloat16))
    assert FamRuntime.load(tiny_chat_dir, fam=TINY_FAM, dtype="bfloat16", decode_dtype="auto").decode_dtype is None


@torch.no_grad()
@pytest.mark.parametrize("rows", [1, 2, 8, 64, 65])
def test_logits_of_few_rows_equal_the_plain_projection(tiny_dirs, rows):
    m = tiny(tiny_dirs["llama"], mode="fam", block_size=16, memory_blocks=1, fam_len=4)
    h = torch.randn(rows, 1, m.arch.hidden_size, generator=torch.Generator().manual_seed(rows))
    got = m.logits(h)
    assert got.shape == (rows, 1, m.arch.vocab_size) and got.is_contiguous()
    torch.testing.assert_close(got, m.lm_head(h).float(), atol=1e-5, rtol=1e-5)


def test_row_copies_refuse_a_wrapped_projection(tiny_dirs):
    m = tiny(tiny_dirs["llama"], mode="fam", block_size=16, memory_blocks=1, fam_len=4)
    m.layers[0].mlp.down_proj = torch.nn.Sequential(m.layers[0].mlp.down_proj)  # as a LoRA wrapper would be
    with pytest.raises(TypeError, match="merge a LoRA first"):
        m.keep_row_weights(torch.bfloat16)


@torch.no_grad()
def test_one_row_as_mv_reads_the_weights_themselves(tiny_dirs, monkeypatch):
    """`mv` without copies: one row runs as torch.mv over the projections' own weights (shared; q/k/v and gate/up
    fused, the projections viewing the fused tensors), close to the plain pass; passes of up to FEW_ROWS rows run
    as W @ x^T, close too; passes of more rows are unchanged, bit for bit."""
    m = tiny(tiny_dirs["llama"], mode="fam", block_size=16, memory_blocks=1, fam_len=4).to(torch.bfloat16)
    state, tok, chunk = _doc(m, 21, 1), torch.tensor([[7]]), torch.tensor([[7, 8, 9]])
    ref_one, ref_many = m.forward_chunk(state, tok), m.forward_chunk(state, chunk)
    before = {n: p.clone() for n, p in m.named_parameters()}
    m.keep_row_weights(None, mv=True)
    attn, mlp = m.layers[0].self_attn, m.layers[0].mlp
    assert mlp.down_proj.row_weight.data_ptr() == mlp.down_proj.weight.data_ptr()
    assert attn.q_proj.row_weight is None and mlp.up_proj.row_weight is None
    assert attn.row_qkv.data_ptr() == attn.q_proj.weight.data_ptr()
    assert attn.v_proj.weight.data_ptr() == attn.row_qkv[-attn.v_proj.weight.shape[0]:].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == mlp.row_gate_up[mlp.gate_proj.weight.shape[0]:].data_ptr()
    after = dict(m.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[n], p) for n, p in before.items())
    one, many = m.forward_chunk(state, tok), m.forward_chunk(state, chunk)
    torch.testing.assert_close(one[1], ref_one[1], atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(many[1], ref_many[1], atol=5e-2, rtol=5e-2)  # 3 rows: W @ x^T
    monkeypatch.setattr(fam, "FEW_ROWS", 2)  # more rows than FEW_ROWS: the plain projections, bit for bit
    assert torch.equal(m.forward_chunk(state, chunk)[1], ref_many[1])
    calls = []
    real_mv = torch.mv
    try:
        torch.mv = lambda w, x: calls.append(w.shape) or real_mv(w, x)
        m.forward_chunk(state, tok)
    finally:
        torch.mv = real_mv
    assert len(calls) == 4 * len(m.layers)  # q/k/v, o, gate/up, down: every projection of one row
    m.keep_row_weights(None)
    assert attn.row_qkv is None and mlp.down_proj.row_weight is None
    assert torch.equal(m.forward_chunk(state, tok)[1], ref_one[1])


def test_mv_only_for_half_precision_on_a_cpu_with_amx():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loader.row_mv_pays(torch.bfloat16, cpu, amx=True)
    assert not loader.row_mv_pays(torch.bfloat16, cpu, amx=False)
    assert not loader.row_mv_pays(torch.float32, cpu, amx=True)
    assert not loader.row_mv_pays(torch.bfloat16, cuda, amx=True)
