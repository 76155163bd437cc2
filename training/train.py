"""Training pieces shared by the tiny PassKey experiment and the adapter training (FAM_SPEC "Fine-tuning").

- `sequence_loss`: back-propagation through all blocks of a sequence, no detach inside it; each block runs under
  `torch.utils.checkpoint`, so only the state between blocks is kept for the backward pass.
  `distill_sequence_loss` adds KL(teacher || model) at every position, for distillation from a teacher's
  log-probabilities.
- `start_state`: Random State Passing (RSP: each row starts from the carried FAM state with probability p, else
  from the learned initial state, which stays under autograd so the prompt learns) and Random Position Offset
  (RPO: with probability 1/2 a row's positions are shifted by a draw from [0, 2*pi*rope_theta)).
- `carried_state`: the detached FAM state of one row, kept for the next step's RSP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F_
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from model.fam import FamLM
from model.state import FamState


@dataclass(frozen=True)
class Carried:
    """The FAM vectors of one document after its last block ([L, F, d], detached): RSP's memory across steps."""

    fam: Tensor


def carried_state(state: FamState, row: int = 0) -> Carried | None:
    if state.cfg.F == 0:
        return None
    return Carried(fam=state.fam[row].detach())


def rope_theta(module: FamLM) -> float:
    return float(module.arch.rope.get("rope_theta", 10000.0))


def start_state(module: FamLM, batch: int, carried: Carried | None, p_carry: float, rpo: bool,
                gen: torch.Generator) -> FamState:
    """A fresh batch of documents for one training step, with RSP and RPO drawn per row from `gen`."""
    use = torch.rand(batch, generator=gen) < p_carry
    position = torch.zeros(batch, dtype=torch.int64)
    if rpo:
        shift = torch.rand(batch, generator=gen, dtype=torch.float64) * 2 * math.pi * rope_theta(module)
        on = torch.rand(batch, generator=gen) < 0.5
        position = torch.where(on, shift, 0).long()
    state = module.new_state(batch=batch, position=position)
    if carried is not None and state.cfg.F and bool(use.any()):
        use_d = use.to(state.fam.device)
        fam = torch.where(use_d[:, None, None, None], carried.fam.to(state.fam)[None], state.fam)
        state = module.with_fam(state, fam, state.fam_fresh & ~use_d)
    return state


def _block(module: FamLM, state: FamState, x: Tensor, y: Tensor, w: Tensor,
           teacher: Tensor | None) -> tuple[FamState, Tensor, Tensor, Tensor]:
    """One block: the new state, the weighted loss sum, the KL(teacher || model) sum over all positions (0 without
    a teacher) and the count of correct argmax predictions (weight > 0)."""
    state, h = module.forward_chunk(state, x)
    zero = h.sum() * 0.0
    sel = w > 0
    every, kl = None, zero
    if teacher is not None:  # the KL needs every position's logits
        every, t = module.lm_head(h).float(), teacher.float()
        kl = (t.exp() * (t - F_.log_softmax(every, -1))).sum()
    if not bool(sel.any()):
        return state, zero, kl, zero.detach()
    logits = module.lm_head(h[sel]).float() if every is None else every[sel]
    loss = (F_.cross_entropy(logits, y[sel], reduction="none") * w[sel]).sum()
    correct = (logits.argmax(-1) == y[sel]).sum().float()
    return state, loss, kl, correct


def sequence_loss(module: FamLM, state: FamState, tokens: Tensor, weights: Tensor,
                  use_checkpoint: bool = True) -> tuple[FamState, Tensor, Tensor]:
    """Teacher-forced loss over tokens [b, N] (N a multiple of the block size is not required).

    weights[b, N] weighs the prediction of token i+1 from position i (the last column is ignored). Returns the
    final state (still attached to the graph), the weighted loss sum and the number of correct weighted tokens.
    """
    state, loss, _, correct = distill_sequence_loss(module, state, tokens, weights, None, use_checkpoint)
    return state, loss, correct


def distill_sequence_loss(module: FamLM, state: FamState, tokens: Tensor, weights: Tensor, teacher: Tensor | None,
                          use_checkpoint: bool = True) -> tuple[FamState, Tensor, Tensor, Tensor]:
    """`sequence_loss` plus, when `teacher` [b, N, V] (log-probabilities of the next token at every position) is
    given, the sum over all positions of KL(teacher || model). Returns (state, loss sum, KL sum, correct)."""
    targets = torch.cat((tokens[:, 1:], tokens[:, :1]), 1)
    w = torch.cat((weights[:, :-1], torch.zeros_like(weights[:, :1])), 1)
    loss = tokens.new_zeros((), dtype=torch.float32)
    correct = tokens.new_zeros((), dtype=torch.float32)
    kl = tokens.new_zeros((), dtype=torch.float32)
    for a, b in state.cuts(tokens.shape[1]):
        args = (module, state, tokens[:, a:b], targets[:, a:b], w[:, a:b], None if teacher is None else teacher[:, a:b])
        if use_checkpoint and torch.is_grad_enabled():
            state, block_loss, block_kl, block_correct = checkpoint(_block, *args, use_reentrant=False)
        else:
            state, block_loss, block_kl, block_correct = _block(*args)
        loss, kl, correct = loss + block_loss, kl + block_kl, correct + block_correct
    return state, loss, kl, correct
