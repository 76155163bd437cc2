"""Where a training step's time goes, and what each cut buys: one run, the plain forward beside the step.

    python -m training.bench_step [--threads 1] [--blocks 6] [--rounds 2] [--out docs/training_step.md]

On the default model (the default --amp: bf16 weights and autocast on CPUs with AMX, float32 elsewhere; the
default FAM layout of training.finetune) and one sequence of `--blocks` blocks per example kind (prose, PassKey,
repeat: the default data mixture), it measures

- the plain forward rate: the student (LoRA attached) over the same tokens without autograd, hidden states only;
- the training step of each configuration below, split into teacher forward, student decoder forward, lm_head +
  loss/KL forward, backward (with checkpointing this includes recomputing the forward) and optimizer (clip, AdamW,
  zero_grad).

The step rate of the mixture is tokens / expected step time under the mixture's kind probabilities. The
configurations are measured alternately, round after round, best round per (configuration, kind), so that the load
of a shared machine hits them alike. On the shared 2-core build machine use --threads 1: with other jobs running,
2 OpenMP threads stall (the plain forward measured 40-100 tok/s on 2 threads against 400-670 on 1, alternated).
Writes the table to --out with the date and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import torch

from training import train
from training.data import DataMaker, prose_tokens, to_tensors
from training.finetune import DEFAULT_MIX, autocast, grad_from, parse_args, setup, step_loss
from training.train import start_state

ROOT = Path(__file__).resolve().parents[1]

# name -> (finetune flags on top of the defaults, fused head); "today" is the step the shipped adapter was trained with
CONFIGS = {
    "today (LoRA on all layers, full-vocab KD on every row, checkpointing, autograd head)":
        (["--lora-from", "0", "--kd-passkey", "--checkpoint"], False),
    "+ PassKey rows answer-only (no teacher, logits at the answer digits)":
        (["--lora-from", "0", "--checkpoint"], False),
    "+ LoRA on layers >= 12 only, layers 0-11 without autograd": (["--checkpoint"], False),
    "+ no checkpointing": ([], False),
    "+ fused lm_head/loss (HeadLoss): the defaults": ([], True),
    "+ top-32 KD": (["--kd-topk", "32"], True),
}
KINDS = {"prose": 0.4, "passkey": 0.5, "repeat": 0.1}  # DEFAULT_MIX, both PassKey fillers as one
PARTS = ("teacher forward (full attention, no grad)", "student decoder forward", "lm_head + loss/KL forward",
         "backward", "optimizer")


class Stopwatch:
    def __init__(self, device: torch.device):
        self.device, self.seconds = device, defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - t0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def examples(tokenizer, n_tokens: int, block: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, str]]:
    data = DataMaker(tokenizer, prose_tokens(tokenizer, held_out=False)[:300_000], seed=0)
    return {"prose": (*to_tensors([data.prose_lm(n_tokens)]), "prose"),
            "passkey": (*to_tensors([data.passkey(n_tokens, "prose", min_gap=min(2 * block, n_tokens // 2))]),
                        "passkey_prose"),
            "repeat": (*to_tensors([data.repeat(n_tokens, 128)]), "repeat")}


class Trainer:
    """One configuration: its own model (LoRA layout), optimizer and flags."""

    def __init__(self, flags: list[str], fused: bool, device: str):
        self.args = parse_args(["--run", "unused", "--device", device, *flags])
        self.fused = fused
        self.rt, _, self.trainable = setup(self.args)
        self.module, self.dev = self.rt.module, self.rt.device
        self.module.train()
        self.first = grad_from(self.module, self.trainable)
        self.opt = torch.optim.AdamW(list(self.trainable.values()), lr=1e-6, weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(0)

    def step(self, tokens: torch.Tensor, weights: torch.Tensor, kind: str) -> dict[str, float]:
        sw = Stopwatch(self.dev)
        train.FUSED_HEAD = self.fused
        tokens, weights = tokens.to(self.dev), weights.to(self.dev)
        t0 = time.perf_counter()
        state = start_state(self.module, 1, None, 0.0, rpo=True, gen=self.gen)
        with autocast(self.dev, self.args.amp), train.timed(sw):
            _, loss, _, _, _ = step_loss(self.module, state, tokens, weights, [kind], self.args, self.first, sw)
        with sw("backward"):
            loss.backward()
        with sw("optimizer"):
            torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        return {"total": time.perf_counter() - t0, **sw.seconds}

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor) -> float:
        tokens = tokens.to(self.dev)
        with autocast(self.dev, self.args.amp):
            t0 = time.perf_counter()
            state = self.module.new_state()
            for a, b in state.cuts(tokens.shape[1]):
                state, _ = self.module.forward_chunk(state, tokens[:, a:b])
            if self.dev.type == "cuda":
                torch.cuda.synchronize(self.dev)
            return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=6, help="sequence length in blocks (finetune draws 4-8)")
    ap.add_argument("--rounds", type=int, default=2, help="measured rounds after one warm-up round")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configs", nargs="+", default=None, help="a subset of the configurations, by index")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "training_step.md")
    ap.add_argument("--from-log", type=Path, default=None,
                    help="take the steps from the JSON lines a run printed (one cut short before its table); the plain "
                         "forward is then measured now, 3 times")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    assert set(KINDS) == {k.split("_")[0] for k in DEFAULT_MIX}, "the mixture changed: update KINDS"
    names = list(CONFIGS) if args.configs is None else [list(CONFIGS)[int(i)] for i in args.configs]
    logged = [json.loads(line) for line in args.from_log.open() if line.startswith("{")] if args.from_log else []
    if logged:
        names = [n for n in CONFIGS if any(r.get("config") == n for r in logged)]
    trainers = {n: Trainer(*CONFIGS[n], args.device) for n in (names[:1] if logged else names)}
    first = next(iter(trainers.values()))
    block = first.args.block_size
    n_tokens = args.blocks * block
    rows = examples(first.rt.tokenizer, n_tokens, block)
    best: dict[tuple[str, str], dict[str, float]] = {}
    fwd: list[float] = []
    for rec in (r for r in logged if "config" in r):
        key = (rec["config"], rec["kind"])
        if key not in best or rec["total"] < best[key]["total"]:
            best[key] = rec
    if logged:
        fwd = [first.forward(rows["prose"][0]) for _ in range(3)]
        args.rounds = max(r["round"] for r in logged if "config" in r)
    for tr in trainers.values() if not logged else ():  # warm-up: one block of each kind
        for tokens, weights, kind_name in rows.values():
            tr.step(tokens[:, :block], weights[:, :block], kind_name)
    for r in range(1, args.rounds + 1 if not logged else 1):
        fwd.append(first.forward(rows["prose"][0]))
        print(json.dumps({"round": r, "forward_s": round(fwd[-1], 2)}), flush=True)
        for name, tr in trainers.items():
            for kind, (tokens, weights, kind_name) in rows.items():
                rec = tr.step(tokens, weights, kind_name)
                print(json.dumps({"round": r, "config": name, "kind": kind, **{k: round(v, 2) for k, v in
                                                                              rec.items()}}), flush=True)
                if r and ((name, kind) not in best or rec["total"] < best[name, kind]["total"]):
                    best[name, kind] = rec
    fwd_rate = n_tokens / min(fwd)
    lines = ["# What a training step costs (generated by `python -m training.bench_step`)", "",
             f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {args.device}, {args.threads} threads, load average "
             f"{os.getloadavg()[0]:.1f} at the end (a shared 2-core machine: ratios within one run are what counts). "
             f"Command: `python -m training.bench_step {' '.join(sys.argv[1:])}`. Default model, --amp "
             f"{first.args.amp}, B={block}, m={first.args.memory_blocks}, F={first.args.fam_len}, fam_update_from="
             f"{first.args.fam_update_from}, LoRA r={first.args.lora_r}; one sequence of {args.blocks} blocks "
             f"({n_tokens} tokens) per kind, best of {args.rounds} rounds after a one-block warm-up, configurations "
             "alternated." + (f" The steps are those logged by such a run ({args.from_log.name}, cut short by its "
                              "timeout before it wrote this table: rows whose rounds are missing are best of fewer) "
                              "and the plain forward was measured when rendering it, so it is not side by side."
                              if logged else ""), "",
             f"**Plain forward** (the student, LoRA attached, no autograd, hidden states only): "
             f"**{fwd_rate:.0f} tok/s**.", "",
             "Step rate of the default mixture (40% prose, 50% PassKey, 10% repeat) = tokens / expected step time; "
             "parts are seconds per step, mixture-weighted; backward includes the checkpoint's recomputed forward "
             "where checkpointing is on.", "",
             "| configuration | step tok/s | vs today | forward / step | " + " | ".join(PARTS) + " | prose | "
             "PassKey | repeat |",
             "|---|---:|---:|---:|" + "---:|" * len(PARTS) + "---:|---:|---:|"]
    base_rate = None
    for name in names:
        mean = {p: sum(KINDS[k] * best[name, k].get(p, 0.0) for k in KINDS) for p in (*PARTS, "total")}
        rate = n_tokens / mean["total"]
        base_rate = base_rate or rate
        per_kind = [f"{n_tokens / best[name, k]['total']:.0f}" for k in KINDS]
        lines.append(f"| {name} | {rate:.0f} | {rate / base_rate:.2f}x | {fwd_rate / rate:.1f}x | "
                     + " | ".join(f"{mean[p]:.2f}" for p in PARTS) + " | " + " | ".join(per_kind) + " |")
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    lines += ["", "Per-kind columns: tok/s of a step on that kind alone." + ("" if logged else
              f" Peak RSS of the whole run (all {len(trainers)} models loaded): {rss:.1f} GiB."), ""]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
