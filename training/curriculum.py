"""A curriculum that makes PassKey retrieval through the FAM state learnable (issue 9, step 3).

    python -m training.curriculum sanity --key fixed|random [--control none|detach|bswa] --steps 50 --out LOG
    python -m training.curriculum train --run runs/curriculum [--resume] [--minutes M] [--steps N] ...
    python -m training.curriculum probe [--distance D]   # the answer loss's gradient per block
    python -m training.curriculum keyswap [--ckpt C]     # answer loss with the true key and another key in block 0

Both use `m = 0` (memory_blocks 0), so the FAM state is the only path from the key's block to the question, and a
loss on the answer digits only. An example at distance `d` is

    block 0:        prefix + (filler) + "The pass key is K. Remember it. K is the pass key." + filler
    blocks 1..d-1:  filler
    block d:        " What is the pass key? The pass key is" + " K"   (a partial block: no FAM update of its own)

so the question's block reads the key only through d FAM updates (d hops). The loss is the cross-entropy of the
5 digits of K (not the space token before them), averaged per digit (chance ln 10 = 2.30 nats); exact match is all
5 teacher-forced argmaxes right, which is what greedy decoding returns.

`sanity`: the plumbing test. One fixed key (learnable by the weights alone, without memory), a random key per
example (learnable only through the FAM state) and the controls that cut the state: `detach` (the forward still
passes the state, the gradient does not cross a block boundary) and `bswa` (no FAM rows at all).

`train`: the distance curriculum. The maximum distance grows through `--stages` (1 2 4 8 16) once the exact match
over the last `--window` examples at the current maximum passes `--advance` (0.9); with probability `--p-current`
an example is at the current maximum, else at a uniformly drawn shorter stage. Checkpoint and resume as
`training.finetune` (<run>/ckpt.pt, <run>/log.jsonl); `python -m training.export_adapter` turns it into an adapter.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from model.fam import FamLM
from model.state import FamState
from training.data import PASSKEY_PREFIX, PASSKEY_QUESTION, STANDARD_FILLER, Example

DEFAULT_STAGES = (1, 2, 4, 8, 16)
# A batch of this many tokens or more runs with per-block activation checkpointing even without --checkpoint: 8 x
# 4,112 tokens (d = 64 at B = 64) without it took more than the 24 GB of the build machine and was OOM-killed.
AUTO_CHECKPOINT_TOKENS = 8192


# ------------------------------------------------------------------------------------------------------------------
# data


class DistanceData:
    """PassKey examples whose key lies `d` blocks before the question (see the module docstring)."""

    def __init__(self, tokenizer: Any, block_size: int, seed: int, prose: list[int] | None = None):
        self.B, self.rng, self.prose = block_size, random.Random(seed), prose
        self.enc = lambda s: list(tokenizer.encode(s, add_special_tokens=False))
        self.prefix, self.question = self.enc(PASSKEY_PREFIX), self.enc(PASSKEY_QUESTION)
        self.standard = self.enc(STANDARD_FILLER)
        self.digit_ids = {self.enc(str(d))[0] for d in range(10)}
        if len(self.prefix) + len(self.info("12345")) > block_size:
            raise ValueError(f"block size {block_size} cannot hold the prefix and the key sentence "
                             f"({len(self.prefix) + len(self.info('12345'))} tokens)")

    def info(self, key: str) -> list[int]:
        return self.enc(f" The pass key is {key}. Remember it. {key} is the pass key.")

    def filler(self, kind: str, n: int) -> list[int]:
        if n <= 0:
            return []
        if kind == "standard":
            start = self.rng.randrange(len(self.standard))
            return (self.standard * (n // len(self.standard) + 2))[start:start + n]
        if self.prose is None:
            raise ValueError("prose filler needs the prose token stream")
        start = self.rng.randrange(len(self.prose) - n)
        return self.prose[start:start + n]

    def random_key(self, varying: int = 5) -> str:
        """A 5-digit key; with `varying` < 5 only the first `varying` digits are drawn and the last of them repeats
        (varying 1: 00000 ... 99999), so the teacher-forced digits after them follow without memory: the memory
        must carry `varying` digits, and the best loss without it is varying * ln 10 / 5 nats per digit."""
        if varying >= 5:
            return str(self.rng.randint(10000, 99999))
        head = "".join(str(self.rng.randrange(10)) for _ in range(varying))
        return head + head[-1] * (5 - varying)

    def example(self, distance: int, key: str | None = None, filler: str = "standard",
                random_offset: bool = False, pre: int = 0) -> Example:
        """Block 0 holds the prefix and the key sentence (at a random offset inside the block with
        `random_offset`), blocks 1..distance-1 filler, then the question and the answer in block `distance`.
        With `pre` > 0 the key sentence moves to block `pre` (block 0: the prefix and filler, then filler blocks):
        the key is then written into a state that filler has already updated, as in PassKey at a random depth;
        `distance` still counts the blocks from the key's to the question's.
        Weights: 1 on the positions that predict the answer's digits, 0 elsewhere."""
        if distance < 1 or pre < 0:
            raise ValueError(f"distance must be >= 1 block and pre >= 0, got {distance} and {pre}")
        key = self.random_key() if key is None else key
        info, answer = self.info(key), self.enc(f" {key}")
        head = self.prefix if pre == 0 else []
        room = self.B - len(head) - len(info)
        before = self.rng.randint(0, room) if random_offset else 0
        key_block = head + self.filler(filler, before) + info + self.filler(filler, room - before)
        lead = []
        if pre:  # block 0: the prefix and filler; then pre - 1 filler blocks
            lead = self.prefix + self.filler(filler, pre * self.B - len(self.prefix))
        tokens = lead + key_block + self.filler(filler, (distance - 1) * self.B) + self.question + answer
        # SmolLM2 tokenizes ' 71432' as ' ', 7, 1, 4, 3, 2: the loss is on the digits
        digits = [i for i, t in enumerate(answer) if t in self.digit_ids]
        n = len(tokens)
        weights = [0.0] * n
        for i in digits:
            weights[n - len(answer) + i - 1] = 1.0  # the weight at position p scores the prediction of token p+1
        return Example(f"passkey_{filler}", tokens, weights, [answer[i] for i in digits], float(distance))

    def swapped_pair(self, distance: int, filler: str = "standard", random_offset: bool = False, varying: int = 5,
                     pre: int = 0) -> tuple[Example, Example]:
        """Two examples identical but for the key sentence in block 0: the second holds another key, while its
        question is still answered with the first's key (weights alike)."""
        key = self.random_key(varying)
        other = self.random_key(varying)
        while other == key:
            other = self.random_key(varying)
        state = self.rng.getstate()
        ex = self.example(distance, key, filler, random_offset, pre)
        self.rng.setstate(state)
        sw = self.example(distance, other, filler, random_offset, pre)
        n_q = len(self.question) + len(self.enc(f" {key}"))
        sw.tokens[-n_q:] = ex.tokens[-n_q:]
        sw.answer = ex.answer
        return ex, sw


def to_batch(examples: list[Example]) -> tuple[Tensor, Tensor]:
    if len({len(e.tokens) for e in examples}) != 1:
        raise ValueError("a batch holds examples of one length (one distance)")
    return (torch.tensor([e.tokens for e in examples], dtype=torch.long),
            torch.tensor([e.weights for e in examples], dtype=torch.float32))


# ------------------------------------------------------------------------------------------------------------------
# the distance schedule


@dataclass
class DistanceSchedule:
    """The maximum key-question distance grows through `stages` once the exact match over the last `window` examples
    at the current maximum reaches `advance`; shorter stages stay in the mix (`p_current` of the examples are at the
    maximum, the rest uniform over the shorter stages)."""

    stages: tuple[int, ...] = DEFAULT_STAGES
    advance: float = 0.9
    window: int = 32
    p_current: float = 0.5
    level: int = 0  # index into stages of the current maximum
    recent: list[bool] = field(default_factory=list)  # exact match of the last examples at the current maximum
    history: list[tuple[int, int]] = field(default_factory=list)  # (step, distance) at each advance

    @property
    def current(self) -> int:
        return self.stages[self.level]

    def draw(self, rng: random.Random) -> int:
        if self.level == 0 or rng.random() < self.p_current:
            return self.current
        return self.stages[rng.randrange(self.level)]

    def record(self, distance: int, exact: list[bool], step: int) -> bool:
        """Record the exact matches of examples at `distance`; returns True when the maximum advanced."""
        if distance != self.current:
            return False
        self.recent = (self.recent + list(exact))[-self.window:]
        if (len(self.recent) >= self.window and sum(self.recent) / len(self.recent) >= self.advance
                and self.level + 1 < len(self.stages)):
            self.level += 1
            self.recent = []
            self.history.append((step, self.current))
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"level": self.level, "recent": list(self.recent), "history": list(self.history)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.level, self.recent = int(d["level"]), list(d["recent"])
        self.history = [tuple(h) for h in d["history"]]


# ------------------------------------------------------------------------------------------------------------------
# the loss


def answer_loss(module: FamLM, state: FamState, tokens: Tensor, weights: Tensor, detach_fam: bool = False,
                use_checkpoint: bool = False, grad_from: int = 0, readout_from: int | None = None
                ) -> tuple[FamState, Tensor, Tensor, Tensor]:
    """Loss over the answer digits: returns (final state, mean CE per digit, exact match per row [b] bool, the loss
    to train on).

    `detach_fam` (the control): the FAM state is cut from the graph at every block boundary, so the forward still
    carries the key but no gradient reaches an earlier block's FAM update.

    `readout_from` (the key's block index): the question and answer (the last, block-aligned chunk of `tokens`) are
    also asked from the state after every full block from the key's block on, in a side pass whose state is thrown
    away, so one sequence at distance d supervises the distances 1..d-1 as well. The loss to train on is then the
    mean per digit over the final question and every readout; without readouts it is the final question's loss."""
    from training.train import _head

    targets = torch.cat((tokens[:, 1:], tokens[:, :1]), 1)
    w = torch.cat((weights[:, :-1], torch.zeros_like(weights[:, :1])), 1)
    loss = tokens.new_zeros((), dtype=torch.float32)
    hits = torch.zeros_like(w)
    B, n = state.cfg.block_size, tokens.shape[1]
    n_qa = n % B  # the question's chunk: the partial block after the last full one
    if readout_from is not None and not 0 < n_qa < n:
        raise ValueError("readouts need the question and answer as a partial block after the last full block")
    qa = (tokens[:, n - n_qa:], targets[:, n - n_qa:], w[:, n - n_qa:]) if readout_from is not None else None
    qa_digits = int((qa[2] > 0).sum()) if qa is not None else 0  # the digits one readout scores
    read_sum, read_n = loss, 0

    def block(st: FamState, x: Tensor, y: Tensor, wb: Tensor) -> tuple[FamState, Tensor, Tensor]:
        st, h = module.forward_chunk(st, x, grad_from=grad_from)
        need = wb > 0
        if not bool(need.any()):
            return st, h.sum() * 0.0, torch.zeros_like(wb)
        _, ce, _, _ = _head(module, st, h, y, wb, None, None)
        with torch.no_grad():
            pred = module.lm_head(h[need]).argmax(-1)
        hit = torch.zeros_like(wb)
        hit[need] = (pred == y[need]).to(hit.dtype)
        return st, ce, hit

    for a, b in state.cuts(n):
        args = (state, tokens[:, a:b], targets[:, a:b], w[:, a:b])
        if use_checkpoint and torch.is_grad_enabled():
            state, ce, hit = checkpoint(block, *args, use_reentrant=False)
        else:
            state, ce, hit = block(*args)
        loss = loss + ce
        hits[:, a:b] = hit
        if detach_fam and state.cfg.F and state.n_block == 0:
            state = module.with_fam(state, state.fam.detach(), state.fam_fresh)
        if qa is not None and b % B == 0 and b // B - 1 >= readout_from and b < n - n_qa:
            _, ce, _ = block(state, *qa)  # the side pass: its state is dropped
            read_sum, read_n = read_sum + ce, read_n + qa_digits
    n_w = int((w > 0).sum().clamp(min=1))
    exact = ((hits > 0) | (w <= 0)).all(1)
    return state, loss / n_w, exact, (loss + read_sum) / (n_w + read_n)


# ------------------------------------------------------------------------------------------------------------------
# setup shared by both commands


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="checkpoint source (default: the default model)")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--fam-len", type=int, default=32)
    ap.add_argument("--fam-update-from", type=int, default=12)
    ap.add_argument("--fam-gate", type=float, default=1.0)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32)
    ap.add_argument("--lora-targets", nargs="+",
                    default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    ap.add_argument("--lora-from", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--prompt-lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--checkpoint", action="store_true",
                    help=f"per-block activation checkpointing (always on for batches of >= {AUTO_CHECKPOINT_TOKENS} "
                         "tokens)")
    ap.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                    help="as finetune's: auto = bf16 on CUDA and on CPUs with AMX, else off (float32)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--filler", default="standard", choices=("standard", "prose"))
    ap.add_argument("--random-offset", action="store_true", help="the key sentence at a random offset in block 0")


def build(args: argparse.Namespace, mode: str) -> tuple[Any, str, dict[str, torch.nn.Parameter], torch.optim.Optimizer]:
    """The runtime with LoRA injected (training.finetune.setup), m = 0, and AdamW over LoRA and the prompt."""
    from training.finetune import setup

    ns = argparse.Namespace(**vars(args))
    ns.mode, ns.memory_blocks = mode, 0
    rt, base_fp, trainable = setup(ns)
    groups = [{"params": [p for n, p in trainable.items() if n != "fam_prompt"], "lr": args.lr}]
    if "fam_prompt" in trainable:
        groups.append({"params": [trainable["fam_prompt"]], "lr": args.prompt_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    return rt, base_fp, trainable, opt


def train_step(rt: Any, trainable: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer, tokens: Tensor,
               weights: Tensor, args: argparse.Namespace, step: int, *, detach_fam: bool = False,
               readout_from: int | None = None) -> tuple[float, list[bool], float, float]:
    """One optimizer step on one batch: returns (loss per digit of the final question, exact match per row,
    gradient norm, the loss trained on: with `readout_from`, over the readouts too; see `answer_loss`)."""
    from training.finetune import autocast, grad_from

    module = rt.module
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * min(1.0, (step + 1) / max(args.warmup, 1))
    state = module.new_state(batch=tokens.shape[0])
    with autocast(rt.device, args.amp):
        _, loss, exact, trained = answer_loss(module, state, tokens.to(rt.device), weights.to(rt.device), detach_fam,
                                              args.checkpoint or tokens.numel() >= AUTO_CHECKPOINT_TOKENS,
                                              grad_from(module, trainable), readout_from)
    opt.zero_grad(set_to_none=True)
    trained.backward()
    gn = torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
    opt.step()
    return loss.item(), exact.tolist(), float(gn), trained.item()


# ------------------------------------------------------------------------------------------------------------------
# sanity


def sanity_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m training.curriculum sanity")
    add_model_args(ap)
    ap.add_argument("--key", default="fixed", choices=("fixed", "random", "set"),
                    help="fixed: --fixed-key every time; random: a fresh 5-digit key per example; set: drawn from "
                         "--key-set (with keys differing in every digit, no memory can do better than ln(set size))")
    ap.add_argument("--fixed-key", default="71432")
    ap.add_argument("--key-set", nargs="+", default=["11111", "99999"])
    ap.add_argument("--control", default="none", choices=("none", "detach", "bswa"))
    ap.add_argument("--distance", type=int, default=2, help="blocks from the key's block to the question's (2: one "
                                                            "block of filler between them)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None, help="log.jsonl to write (one line per step)")
    return ap.parse_args(argv)


def sanity(args: argparse.Namespace, echo: bool = True) -> list[dict[str, Any]]:
    """Train `args.steps` steps at one distance; returns one record per step (and writes them to `args.out`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _sanity(args, echo)
    finally:
        torch.set_num_threads(threads)


def _sanity(args: argparse.Namespace, echo: bool) -> list[dict[str, Any]]:
    mode = "bswa" if args.control == "bswa" else "fam"
    rt, _, trainable, opt = build(args, mode)
    rt.module.train()
    data = DistanceData(rt.tokenizer, args.block_size, args.seed)
    out = None if args.out is None else args.out.open("w")
    recs = []
    t0 = time.time()
    for step in range(args.steps):
        keys = [args.fixed_key if args.key == "fixed" else data.rng.choice(args.key_set) if args.key == "set" else None
                for _ in range(args.batch)]
        ex = [data.example(args.distance, k, args.filler, args.random_offset) for k in keys]
        tokens, weights = to_batch(ex)
        loss, exact, gn, _ = train_step(rt, trainable, opt, tokens, weights, args, step,
                                        detach_fam=args.control == "detach")
        rec = {"step": step + 1, "key": args.key, "control": args.control, "distance": args.distance,
               "loss": round(loss, 4), "em": sum(exact) / len(exact), "grad_norm": round(gn, 4),
               "seconds": round(time.time() - t0, 1)}
        recs.append(rec)
        if echo:
            print(json.dumps(rec), flush=True)
        if out:
            out.write(json.dumps(rec) + "\n")
            out.flush()
    return recs


def probe(argv: list[str]) -> list[dict[str, Any]]:
    """Where the answer loss's gradient goes: its norm w.r.t. the input embeddings of each block (key block,
    filler blocks, the question's block) and w.r.t. the FAM prompt, for fam, the detach control and bswa, on one
    batch of random keys at `--distance`; all layers under autograd (grad_from 0), LoRA untrained (B = 0)."""
    ap = argparse.ArgumentParser(prog="python -m training.curriculum probe")
    add_model_args(ap)
    ap.add_argument("--distance", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from training.finetune import autocast

    out = []
    for control in ("none", "detach", "bswa"):
        rt, _, trainable, _ = build(args, "bswa" if control == "bswa" else "fam")
        module = rt.module
        data = DistanceData(rt.tokenizer, args.block_size, args.seed)
        tokens, weights = to_batch([data.example(args.distance) for _ in range(args.batch)])
        embedded: list[Tensor] = []

        def leaf(mod: Any, inputs: Any, o: Tensor, embedded: list[Tensor] = embedded) -> Tensor:
            embedded.append(o.detach().requires_grad_())
            return embedded[-1]

        hook = module.embed_tokens.register_forward_hook(leaf)
        try:
            with autocast(rt.device, args.amp):
                _, loss, _, _ = answer_loss(module, module.new_state(batch=args.batch), tokens.to(rt.device),
                                         weights.to(rt.device), detach_fam=control == "detach")
        finally:
            hook.remove()
        wrt = embedded + ([trainable["fam_prompt"]] if "fam_prompt" in trainable else [])
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        norms = [0.0 if g is None else round(g.float().norm().item(), 6) for g in grads]
        rec = {"control": control, "distance": args.distance, "loss": round(loss.item(), 4),
               "grad_norm_per_block": norms[:len(embedded)],
               "grad_norm_prompt": norms[len(embedded)] if len(wrt) > len(embedded) else None}
        print(json.dumps(rec), flush=True)
        out.append(rec)
    return out


def keyswap(argv: list[str]) -> list[dict[str, Any]]:
    """Does the answer depend on the key in block 0? The answer loss and exact match per distance over `--keys`
    examples as they are, and with block 0's key sentence holding another key (the answer unchanged). A memory that
    retrieves: the swapped loss far above the true one; one that does not: the two equal (no gradient, bf16)."""
    from training.depth import text_tokens as depth_text_tokens
    from training.finetune import autocast, init_from_adapter, load_checkpoint

    ap = argparse.ArgumentParser(prog="python -m training.curriculum keyswap")
    add_model_args(ap)
    ap.add_argument("--ckpt", type=Path, default=None, help="a curriculum checkpoint to load (default: untrained)")
    ap.add_argument("--distances", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--keys", type=int, default=32)
    ap.add_argument("--key-digits", type=int, default=5, help="as train's (DistanceData.random_key)")
    ap.add_argument("--adapter", dest="init_adapter", type=Path, default=None,
                    help="or an adapter file (a committed milestone)")
    ap.add_argument("--pre", type=int, default=0, help="filler blocks before the key's block (DistanceData.example)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rt, base_fp, trainable, _ = build(args, "fam")
    if args.init_adapter is not None:
        init_from_adapter(rt.module, trainable, base_fp, args)
    elif args.ckpt is not None:
        load_checkpoint(args.ckpt, trainable, rt.device)
    module = rt.module
    module.eval()
    # prose filler here is held out: the R manuals of the depth test, which no training run reads
    prose = depth_text_tokens(rt.tokenizer) if args.filler == "prose" else None
    out = []
    for d in args.distances:
        data = DistanceData(rt.tokenizer, args.block_size, args.seed + 1000 + d, prose)
        true, swapped = [], []
        for _ in range(args.keys):
            ex, sw = data.swapped_pair(d, args.filler, args.random_offset, args.key_digits, args.pre)
            true.append(ex)
            swapped.append(sw)
        rec: dict[str, Any] = {"block_size": args.block_size, "distance": d, "pre": args.pre,
                               "tokens": len(true[0].tokens), "keys": args.keys,
                               "key_digits": args.key_digits, "filler": args.filler,
                               "weights": str(args.init_adapter or args.ckpt)}
        for name, exs in (("true", true), ("swapped", swapped)):
            tokens, weights = to_batch(exs)
            with torch.no_grad(), autocast(rt.device, args.amp):
                _, loss, exact, _ = answer_loss(module, module.new_state(batch=len(exs)), tokens.to(rt.device),
                                             weights.to(rt.device))
            rec[f"loss_{name}"] = round(loss.item(), 4)
            rec[f"em_{name}"] = round(exact.float().mean().item(), 4)
        print(json.dumps(rec), flush=True)
        out.append(rec)
    return out


# ------------------------------------------------------------------------------------------------------------------
# the curriculum


def train(argv: list[str]) -> None:
    from training.data import prose_tokens
    from training.finetune import init_from_adapter, load_checkpoint, lora_weights, open_log, run_meta, save_checkpoint

    ap = argparse.ArgumentParser(prog="python -m training.curriculum train")
    add_model_args(ap)
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--stages", type=int, nargs="+", default=list(DEFAULT_STAGES))
    ap.add_argument("--advance", type=float, default=0.9)
    ap.add_argument("--window", type=int, default=32, help="examples at the current maximum the exact match is over")
    ap.add_argument("--p-current", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--minutes", type=float, default=float("inf"))
    ap.add_argument("--save-minutes", type=float, default=4.0)
    ap.add_argument("--key-digits", type=int, default=5,
                    help="digits of the key that vary (DistanceData.random_key): < 5 eases the task to fewer bits")
    ap.add_argument("--pre-max", type=int, default=0,
                    help="each batch puts the key after a uniform 0..pre-max filler blocks (DistanceData.example)")
    ap.add_argument("--replay-distances", type=int, nargs="+", default=[],
                    help="with --p-replay: distances a batch may be drawn at instead, the key in the first block "
                         "(what the starting weights already do, kept while --pre-max grows a new axis); replay "
                         "batches do not count towards the schedule")
    ap.add_argument("--p-replay", type=float, default=0.25)
    ap.add_argument("--readout", action="store_true",
                    help="also ask the question after every full block from the key's on (answer_loss's readouts): "
                         "one sequence at distance d trains the distances 1..d-1 too")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init-adapter", type=Path, default=None,
                    help="start from an adapter file's prompt and LoRA (e.g. a committed curriculum milestone) with a "
                         "fresh optimizer and schedule; ignored when --resume finds a checkpoint")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.run.mkdir(parents=True, exist_ok=True)
    rt, base_fp, trainable, opt = build(args, "fam")
    rt.module.train()
    data = DistanceData(rt.tokenizer, args.block_size, args.seed,
                        prose_tokens(rt.tokenizer, held_out=False) if args.filler == "prose" else None)
    sched = DistanceSchedule(tuple(args.stages), args.advance, args.window, args.p_current)
    ckpt = args.run / "ckpt.pt"
    step = 0
    # the meta finetune writes, with this phase's recipe instead of the mixture's
    meta_args = argparse.Namespace(**vars(args), mode="fam", memory_blocks=0, mix={}, seq_blocks=[], repeat_len=0,
                                   min_gap=None, p_carry=0.0, rsp_warmup=0, distill=0.0, kd_topk=0, kd_passkey=False)
    meta = run_meta(meta_args, rt, base_fp)
    meta["training_command"] = "python -m training.curriculum train " + " ".join(sys.argv[2:])
    meta["data_recipe"] = {"curriculum": "passkey distance", "stages": args.stages, "advance": args.advance,
                           "window": args.window, "p_current": args.p_current, "filler": args.filler,
                           "loss": "answer digits only", "memory_blocks": 0, "rsp": False, "rpo": False,
                           "batch": args.batch, "random_offset": args.random_offset, "key_digits": args.key_digits,
                           "pre_max": args.pre_max, "replay_distances": args.replay_distances,
                           "readout": args.readout,
                           "p_replay": args.p_replay if args.replay_distances else 0.0}
    if args.resume and ckpt.is_file():
        c = load_checkpoint(ckpt, trainable, rt.device)
        opt.load_state_dict(c["optimizer"])
        step = c["step"]
        data.rng.setstate(c["data_rng"])
        sched.load_state_dict(c["schedule"])
        meta = c["meta"] | {"resumed_with": "python -m training.curriculum train " + " ".join(sys.argv[2:])}
    elif args.init_adapter is not None:
        meta["initialised_from"] = {"adapter": str(args.init_adapter),
                                    "step": init_from_adapter(rt.module, trainable, base_fp, args)}
    (args.run / "meta.json").write_text(json.dumps(meta, indent=1))

    def checkpoint_now() -> None:
        save_checkpoint(ckpt, trainable={n: p.detach().cpu() for n, p in trainable.items()},
                        optimizer=opt.state_dict(), carried=None, step=step, data_rng=data.rng.getstate(),
                        schedule=sched.state_dict(), meta=meta,
                        lora={n: (a.cpu(), b.cpu()) for n, (a, b) in lora_weights(rt.module).items()})

    log = open_log(args.run / "log.jsonl", step if args.resume and ckpt.is_file() else None)
    t_start = last_save = time.time()
    while step < args.steps and (time.time() - t_start) / 60 < args.minutes:
        t0 = time.time()
        replay = bool(args.replay_distances) and data.rng.random() < args.p_replay
        if replay:
            d, pre = data.rng.choice(args.replay_distances), 0
        else:
            d = sched.draw(data.rng)
            pre = data.rng.randint(0, args.pre_max) if args.pre_max else 0
        tokens, weights = to_batch([data.example(d, data.random_key(args.key_digits), args.filler, args.random_offset,
                                                 pre) for _ in range(args.batch)])
        loss, exact, gn, trained = train_step(rt, trainable, opt, tokens, weights, args, step,
                                              readout_from=pre if args.readout else None)
        step += 1
        advanced = not replay and sched.record(d, exact, step)
        rec = {"step": step, "distance": d, "pre": pre, "replay": replay, "max_distance": sched.current,
               "loss": round(loss, 4),
               "em": sum(exact) / len(exact), "grad_norm": round(gn, 4), "seconds": round(time.time() - t0, 2),
               "time": round(time.time(), 1)}
        if args.readout:
            rec["trained_loss"] = round(trained, 4)  # over the readouts at distances 1..d-1 and the question
        if advanced:
            rec["advanced_to"] = sched.current
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}")
        log.write(json.dumps(rec) + "\n")
        log.flush()
        print(json.dumps(rec), flush=True)
        if (time.time() - last_save) / 60 >= args.save_minutes:
            checkpoint_now()
            last_save = time.time()
    checkpoint_now()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("sanity", "train", "probe", "keyswap"):
        print(__doc__)
        raise SystemExit(2)
    if argv[0] == "sanity":
        sanity(sanity_args(argv[1:]))
    elif argv[0] == "probe":
        probe(argv[1:])
    elif argv[0] == "keyswap":
        keyswap(argv[1:])
    else:
        train(argv[1:])


if __name__ == "__main__":
    main()
