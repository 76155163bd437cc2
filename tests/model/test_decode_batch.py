"""The persistent decode batch (model/decode.py): passes through it give the states and hidden states of running
each document alone, through joins, leaves, block completions, forks and states that come back older, and a state
it returned never changes afterwards."""

from __future__ import annotations

import random

import pytest
import torch

from model.decode import DecodeBatch
from tests.model.test_fam import assert_states_equal, tiny


def _copy(state):
    return state.map(torch.clone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_decode_batch_matches_one_by_one(tiny_dirs, dtype):
    m = tiny(tiny_dirs["llama"], mode="fam", block_size=16, memory_blocks=1, fam_len=4).to(dtype)
    atol, rtol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2)
    g = torch.Generator().manual_seed(11)
    rng = random.Random(3)
    docs = []
    for n, mode in [(40, "fam"), (13, "fam"), (7, "bswa"), (21, "sink"), (9, "full"), (0, "fam")]:
        s = m.new_state(mode=mode)
        docs.append(m.ingest(s, torch.randint(0, 211, (1, n), generator=g))[0] if n else s)
    batch = DecodeBatch()
    kept = []  # (a state the batch returned, its copy at that time): it must never change
    in_place = 0
    active = [0, 1]
    for step in range(60):
        if step % 6 == 0:  # documents join and leave
            active = sorted(rng.sample(range(len(docs)), rng.randint(2, len(docs))))
        if step % 17 == 5 and kept:  # a state comes back older (a cancelled turn)
            docs[active[0]] = kept[-1][0]
        if step % 23 == 7:  # a document forks: both copies decode on
            docs.append(docs[active[-1]])
            active = [*active, len(docs) - 1]
        chunks = [torch.randint(0, 211, (min(5, 16 - docs[i].n_block) if i == 0 and step % 5 == 0 else 1,),
                                generator=g) for i in active]
        buffer = batch.k[0].data_ptr() if batch.k else None
        results = m.forward_many([docs[i] for i in active], chunks, decode=batch)
        in_place += bool(batch.k) and batch.k[0].data_ptr() == buffer
        for i, c, (new, h) in zip(active, chunks, results, strict=True):
            alone, h_alone = m.forward_chunk(docs[i], c[None])
            torch.testing.assert_close(h, h_alone, atol=atol, rtol=rtol)
            assert_states_equal(new, alone, atol=atol, rtol=rtol)
            docs[i] = new
            kept.append((new, _copy(new)))
    assert in_place > 20  # most steps appended in place
    doc = m.ingest(m.new_state(mode="fam"), torch.tensor([[1, 2, 3]]))[0]
    one, h_one = m.forward_many([doc], [torch.tensor([5])], decode=batch)[0]  # one alone takes the buffer too
    assert batch.k and batch.k[0].shape[0] == 1 and batch.newest == [one]
    alone, h_alone = m.forward_chunk(doc, torch.tensor([[5]]))
    torch.testing.assert_close(h_one, h_alone, atol=atol, rtol=rtol)
    assert_states_equal(one, alone, atol=atol, rtol=rtol)
    m.forward_many([m.new_state(mode="fam")], [torch.tensor([5, 6])], decode=batch)  # nothing decodes: dropped
    assert not batch.k
    # a state the batch returned views a buffer of all its rows; compact() gives one that owns only itself
    view = next(new for new, _ in reversed(kept) if new.k[0].untyped_storage().nbytes() > new.k[0].nbytes)
    alone = view.compact()
    assert_states_equal(alone, view, atol=0, rtol=0)
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in alone.k + alone.v)
    for new, copy in kept:
        assert_states_equal(new, copy, atol=0, rtol=0)
