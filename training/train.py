"""Training pieces shared by the tiny PassKey experiment and the adapter training (FAM_SPEC "Fine-tuning").

- `sequence_loss`: back-propagation through all blocks of a sequence, no detach inside it; each block runs under
  `torch.utils.checkpoint` (unless switched off), so only the state between blocks is kept for the backward pass.
  `distill_sequence_loss` adds KL(teacher || model) where a KD mask says so, for distillation from a teacher's
  log-probabilities (all of them, or its top k: `TopK`). Logits are computed only at positions that carry a loss
  (weight > 0 or KD): the 49k-word lm_head at every position costs about as much as the decoder.
- `start_state`: Random State Passing (RSP: each row starts from the carried FAM state with probability p, else
  from the learned initial state, which stays under autograd so the prompt learns) and Random Position Offset
  (RPO: with probability 1/2 a row's positions are shifted by a draw from [0, 2*pi*rope_theta)).
- `carried_state`: the detached FAM state of one row, kept for the next step's RSP.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

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


class TopK(NamedTuple):
    """A teacher's k most likely next tokens per position: log-probabilities [b, N, k] and token ids [b, N, k]."""

    logp: Tensor
    ids: Tensor


Teacher = Tensor | TopK  # [b, N, V] log-probabilities, or their top k


FUSED_HEAD = True  # HeadLoss; False: autograd over float32 logits (same values; training/bench_step.py compares)


class HeadLoss(torch.autograd.Function):
    """lm_head, weighted cross-entropy and KL(teacher || model) over rows h [M, d] in one pass over the logits.

    Returns (CE sum, KL sum, correct count): sum_i w_i CE_i, sum_i k_i KL_i (teacher [M, V] log-probabilities, or
    their top k: then the KL's sum runs over those k tokens only, their probabilities as given, not renormalised),
    and the argmax hits where w_i > 0. The gradients with respect to the logits are formed in the forward
    (w (p - onehot) and k ((sum t) p - t)) and kept in the weights' dtype, so no [M, V] float32 tensor outlives
    the call; that is what autograd would keep several of."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, y: Tensor, w: Tensor, k: Tensor | None, t_logp: Tensor | None,
                t_ids: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        keep = torch.bfloat16 if weight.dtype == torch.bfloat16 else torch.float32
        logq = F_.linear(h.to(weight.dtype), weight).float()  # [M, V]
        logq -= torch.logsumexp(logq, -1, keepdim=True)
        p = logq.exp()
        correct = ((logq.argmax(-1) == y) & (w > 0)).sum().float()
        ce = -(logq.gather(-1, y[:, None])[:, 0] * w).sum()
        dz_ce = (p * w[:, None]).scatter_add_(-1, y[:, None], -w[:, None]).to(keep)
        kl, dz_kl = ce.new_zeros(()), None
        if t_logp is not None:
            t = t_logp.float()
            tp = t.exp()
            if t_ids is None:
                kl = ((tp * (t - logq)).sum(-1) * k).sum()
                dz_kl = (p * (tp.sum(-1) * k)[:, None] - tp * k[:, None]).to(keep)
            else:
                kl = ((tp * (t - logq.gather(-1, t_ids))).sum(-1) * k).sum()
                dz_kl = (p * (tp.sum(-1) * k)[:, None]).scatter_add_(-1, t_ids, -tp * k[:, None]).to(keep)
        ctx.save_for_backward(h, weight, dz_ce, dz_kl)
        ctx.mark_non_differentiable(correct)
        return ce, kl, correct

    @staticmethod
    def backward(ctx: Any, g_ce: Tensor, g_kl: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:
        h, weight, dz_ce, dz_kl = ctx.saved_tensors
        dz = g_ce * dz_ce.float()
        if dz_kl is not None:
            dz += g_kl * dz_kl.float()
        dz = dz.to(weight.dtype)
        grad_h = (dz @ weight).to(h.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (dz.t() @ h.to(weight.dtype)) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None, None, None


_timer: Callable[[str], AbstractContextManager[Any]] = lambda name: nullcontext()  # noqa: E731


@contextmanager
def timed(timer: Callable[[str], AbstractContextManager[Any]]) -> Iterator[None]:
    """Time the forward's parts (student decoder, lm_head + loss) with `timer(name)` (training/bench_step.py)."""
    global _timer
    old, _timer = _timer, timer
    try:
        yield
    finally:
        _timer = old


def _block(module: FamLM, state: FamState, x: Tensor, y: Tensor, w: Tensor, kd: Tensor | None,
           teacher: Teacher | None, grad_from: int) -> tuple[FamState, Tensor, Tensor, Tensor]:
    """One block: the new state, the weighted loss sum, the KL(teacher || model) sum over the positions where `kd`
    is set (0 without a teacher) and the count of correct argmax predictions (weight > 0). Logits only where a loss
    needs them."""
    with _timer("student decoder forward"):
        state, h = module.forward_chunk(state, x, grad_from=grad_from)
    with _timer("lm_head + loss/KL forward"):
        return _head(module, state, h, y, w, kd, teacher)


def _head(module: FamLM, state: FamState, h: Tensor, y: Tensor, w: Tensor, kd: Tensor | None,
          teacher: Teacher | None) -> tuple[FamState, Tensor, Tensor, Tensor]:
    need = w > 0 if teacher is None else (w > 0) | kd
    if not bool(need.any()):
        zero = h.sum() * 0.0
        return state, zero, zero, zero.detach()
    t_logp = t_ids = k = None
    if teacher is not None:
        k = kd[need].float()
        t_logp, t_ids = (teacher.logp[need], teacher.ids[need]) if isinstance(teacher, TopK) else (teacher[need], None)
    if not FUSED_HEAD or not torch.is_grad_enabled():  # without a graph the logit gradients are not needed
        return (state, *_head_loss_autograd(module.lm_head(h[need]).float(), y[need], w[need].float(), k, t_logp,
                                            t_ids))
    loss, kl, correct = HeadLoss.apply(h[need], module.lm_head.weight, y[need], w[need].float(), k, t_logp, t_ids)
    return state, loss, kl, correct


def _head_loss_autograd(logits: Tensor, y: Tensor, w: Tensor, k: Tensor | None, t_logp: Tensor | None,
                        t_ids: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """What HeadLoss computes, by autograd over float32 logits (the step before HeadLoss; kept for comparison)."""
    logq = F_.log_softmax(logits, -1)
    ce = -(logq.gather(-1, y[:, None])[:, 0] * w).sum()
    correct = ((logq.argmax(-1) == y) & (w > 0)).sum().float()
    kl = ce.new_zeros(())
    if t_logp is not None:
        t = t_logp.float()
        kl = ((t.exp() * (t - (logq if t_ids is None else logq.gather(-1, t_ids)))).sum(-1) * k).sum()
    return ce, kl, correct


def sequence_loss(module: FamLM, state: FamState, tokens: Tensor, weights: Tensor,
                  use_checkpoint: bool = True, grad_from: int = 0) -> tuple[FamState, Tensor, Tensor]:
    """Teacher-forced loss over tokens [b, N] (N a multiple of the block size is not required).

    weights[b, N] weighs the prediction of token i+1 from position i (the last column is ignored). Returns the
    final state (still attached to the graph), the weighted loss sum and the number of correct weighted tokens.
    `grad_from`: layers below it run without autograd (nothing trainable there; see FamLM.forward_chunk).
    """
    state, loss, _, correct = distill_sequence_loss(module, state, tokens, weights, None, use_checkpoint,
                                                    grad_from=grad_from)
    return state, loss, correct


def distill_sequence_loss(module: FamLM, state: FamState, tokens: Tensor, weights: Tensor, teacher: Teacher | None,
                          use_checkpoint: bool = True, kd_mask: Tensor | None = None, grad_from: int = 0
                          ) -> tuple[FamState, Tensor, Tensor, Tensor]:
    """`sequence_loss` plus, when `teacher` ([b, N, V] log-probabilities of the next token at every position, or
    their `TopK`) is given, the sum of KL(teacher || model) over the positions where kd_mask [b, N] is set (default:
    every position). Returns (state, loss sum, KL sum, correct)."""
    targets = torch.cat((tokens[:, 1:], tokens[:, :1]), 1)
    w = torch.cat((weights[:, :-1], torch.zeros_like(weights[:, :1])), 1)
    kd = None
    if teacher is not None:
        kd = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device) if kd_mask is None else kd_mask.bool()
    loss = tokens.new_zeros((), dtype=torch.float32)
    correct = tokens.new_zeros((), dtype=torch.float32)
    kl = tokens.new_zeros((), dtype=torch.float32)
    for a, b in state.cuts(tokens.shape[1]):
        t = None if teacher is None else (TopK(teacher.logp[:, a:b], teacher.ids[:, a:b])
                                          if isinstance(teacher, TopK) else teacher[:, a:b])
        args = (module, state, tokens[:, a:b], targets[:, a:b], w[:, a:b], None if kd is None else kd[:, a:b], t,
                grad_from)
        if use_checkpoint and torch.is_grad_enabled():
            state, block_loss, block_kl, block_correct = checkpoint(_block, *args, use_reentrant=False)
        else:
            state, block_loss, block_kl, block_correct = _block(*args)
        loss, kl, correct = loss + block_loss, kl + block_kl, correct + block_correct
    return state, loss, kl, correct
