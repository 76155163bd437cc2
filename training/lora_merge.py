"""How much merging the adapter's LoRA into bf16 weights changes the model (model/adapter.py merges it at load).

The reference is the base model in float32 with the bundled adapter's prompt and its LoRA as side paths
(y = W x + alpha/r · B (A x)). Against it, over the same text (--tokens tokens of README.md, cut into blocks as the
server does), per mode, the mean KL(reference || model) of the next-token distributions of:
  - no LoRA (float32, the adapter's prompt only): how much the LoRA changes the model at all;
  - bf16 with side paths (how the server ran the adapter before it merged it);
  - bf16 merged (as the server loads it now);
and the share of positions whose greedy token equals the reference's.

    python -m training.lora_merge --out docs/lora_merge.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from model import FamRuntime

ROOT = Path(__file__).resolve().parent.parent


def side_paths(rt: FamRuntime, adapter) -> None:
    scale = float(adapter.meta["lora"]["alpha"]) / float(adapter.meta["lora"]["r"])
    modules = dict(rt.module.named_modules())
    for name, (a, b) in adapter.lora.items():
        w = modules[name].weight
        a_t, b_t = a.to(w).t(), (scale * b.float()).to(w).t()
        modules[name].register_forward_hook(lambda m, args, out, a_t=a_t, b_t=b_t: out + (args[0] @ a_t) @ b_t)


def base_with(adapter, dtype: str, lora: bool) -> FamRuntime:
    rt = FamRuntime.load(None, fam=adapter.fam_config(), dtype=dtype)
    with torch.no_grad():
        rt.module.fam_prompt.copy_(adapter.prompt.to(rt.module.fam_prompt))
    if lora:
        side_paths(rt, adapter)
    rt.module.invalidate_cache()
    return rt


def logprobs(rt: FamRuntime, ids: list[int], mode: str) -> torch.Tensor:
    with torch.inference_mode():
        state, outs = rt.new_state(mode=mode), []
        for a, b in state.cuts(len(ids)):
            state, h = rt.module.forward_chunk(state, torch.tensor([ids[a:b]]))
            outs.append(rt.module.lm_head(h)[0].float())
    return torch.cat(outs).log_softmax(-1)


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p.exp() * (p - q)).sum(-1).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1536)
    p.add_argument("--modes", default="fam,sink")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    merged = FamRuntime.load(None, adapter="auto", dtype="bfloat16")
    adapter = merged.adapter
    ids = merged.encode((ROOT / "README.md").read_text())[:args.tokens]
    lines = [f"LoRA merge check of {time.strftime('%Y-%m-%d')}; command: `python -m training.lora_merge "
             f"{' '.join(sys.argv[1:])}`; {len(ids)} tokens of README.md; reference: float32 base + the adapter's "
             "prompt + its LoRA as side paths.", "",
             "| mode | KL, no LoRA (the LoRA's effect) | KL, bf16 side paths | KL, bf16 merged | greedy = reference, "
             "side paths | greedy = reference, merged |", "|---|---:|---:|---:|---:|---:|"]
    for mode in args.modes.split(","):
        ref = logprobs(base_with(adapter, "float32", lora=True), ids, mode)
        none = logprobs(base_with(adapter, "float32", lora=False), ids, mode)
        hooked = logprobs(base_with(adapter, "bfloat16", lora=True), ids, mode)
        got = logprobs(merged, ids, mode)
        agree = lambda x: float((x.argmax(-1) == ref.argmax(-1)).float().mean())  # noqa: B023
        lines.append(f"| {mode} | {kl(ref, none):.4f} | {kl(ref, hooked):.4f} | {kl(ref, got):.4f} "
                     f"| {agree(hooked):.3f} | {agree(got):.3f} |")
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
