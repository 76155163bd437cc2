"""A tiny Llama trained from scratch on synthetic PassKey: the quick proof that FAM's memory works (paper fig. 3a).

Vocabulary: digits 0-9, a KEY marker, a QUERY marker and `N_FILLER` filler tokens. A sequence is

    filler ... KEY d1..dA filler ... QUERY d1..dA

with the key at a uniform depth, and the loss on the answer digits only. FAM and BSWA train with the same model,
budget and seed; accuracy is the exact match of all A digits (greedy == teacher-forced argmax here).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.config import ArchConfig, FamConfig
from model.fam import FamLM
from model.loader import build_rope
from training.train import Carried, carried_state, sequence_loss, start_state

KEY, QUERY, N_FILLER = 10, 11, 20
VOCAB = 12 + N_FILLER


@dataclass(frozen=True)
class TinySetup:
    layers: int = 2
    width: int = 64
    heads: int = 4
    block_size: int = 16
    memory_blocks: int = 0  # as the paper's PassKey model: only the current block and the memory
    fam_len: int = 4
    key_len: int = 1  # one digit: chance 10%; 3 digits did not train within 3000 steps (digit accuracy ~50%)
    train_blocks: int = 6  # training sequence length, in blocks
    batch: int = 32
    steps: int = 1500
    lr: float = 1e-3
    p_carry: float = 0.8
    rsp_warmup: int = 400  # steps without Random State Passing first (from scratch, RSP at once learns far slower)
    seed: int = 0


def build_model(s: TinySetup, mode: str) -> FamLM:
    arch = ArchConfig(
        architecture="LlamaForCausalLM", vocab_size=VOCAB, hidden_size=s.width, intermediate_size=2 * s.width,
        num_layers=s.layers, num_heads=s.heads, num_kv_heads=s.heads, head_dim=s.width // s.heads,
        rms_norm_eps=1e-5, max_position_embeddings=1 << 30, tie_word_embeddings=False, qkv_bias=False,
        o_bias=False, mlp_bias=False, rope={"rope_type": "default", "rope_theta": 10000.0},
    )
    fam = FamConfig(mode=mode, block_size=s.block_size, memory_blocks=s.memory_blocks, fam_len=s.fam_len)
    torch.manual_seed(s.seed)
    module = FamLM(arch, fam, build_rope(None, arch))
    module.init_fam_prompt(list(range(12, VOCAB)))
    return module


def make_batch(s: TinySetup, n_tokens: int, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [batch, n_tokens] and loss weights (1 on the positions that predict the answer digits)."""
    a = s.key_len
    tokens = torch.randint(12, VOCAB, (batch, n_tokens), generator=gen)
    keys = torch.randint(0, 10, (batch, a), generator=gen)
    depth = torch.randint(0, n_tokens - 2 * (a + 1) + 1, (batch,), generator=gen)
    for i in range(batch):
        d = int(depth[i])
        tokens[i, d] = KEY
        tokens[i, d + 1:d + 1 + a] = keys[i]
    tokens[:, -a - 1] = QUERY
    tokens[:, -a:] = keys
    weights = torch.zeros(batch, n_tokens)
    weights[:, -a - 1:-1] = 1.0
    return tokens, weights


def train(s: TinySetup, mode: str, log: Callable[[dict], None] | None = None) -> FamLM:
    module = build_model(s, mode)
    module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=s.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 100))
    gen = torch.Generator().manual_seed(s.seed + 1)
    carried: Carried | None = None
    t0 = time.time()
    for step in range(s.steps):
        tokens, weights = make_batch(s, s.train_blocks * s.block_size, s.batch, gen)
        p_carry = s.p_carry if step >= s.rsp_warmup else 0.0
        state = start_state(module, s.batch, carried, p_carry, rpo=True, gen=gen)
        state, loss, correct = sequence_loss(module, state, tokens, weights, use_checkpoint=False)
        carried = carried_state(state)
        opt.zero_grad(set_to_none=True)
        (loss / weights.sum()).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and (step % 50 == 0 or step == s.steps - 1):
            log({"mode": mode, "step": step, "loss": loss.item() / weights.sum().item(),
                 "digit_acc": correct.item() / weights.sum().item(), "seconds": round(time.time() - t0, 1)})
    module.eval()
    return module


@torch.no_grad()
def passkey_accuracy(module: FamLM, s: TinySetup, n_tokens: int, n_keys: int, seed: int) -> float:
    """Exact-match accuracy of the whole key, over `n_keys` sequences of `n_tokens` (from the initial state)."""
    gen = torch.Generator().manual_seed(seed)
    tokens, _ = make_batch(s, n_tokens, n_keys, gen)
    a = s.key_len
    state, h = module.ingest(module.new_state(batch=n_keys), tokens[:, :-a])
    ok = torch.ones(n_keys, dtype=torch.bool)
    for i in range(a):
        ok &= module.logits(h).argmax(-1) == tokens[:, -a + i]
        if i < a - 1:
            state, h = module.ingest(state, tokens[:, -a + i:-a + i + 1])
    return ok.float().mean().item()
