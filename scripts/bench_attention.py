"""Attention of R query rows over C keys, bf16: PyTorch's SDPA against `Attention.few_queries` (two matmuls per kv
head), the shapes of the default model (9 query heads, 3 kv heads, head_dim 64). It sets `FEW_QUERIES` in
model/fam.py: up to how many rows the matmul path runs. Usage:

    python scripts/bench_attention.py --threads 1
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F_

from model.fam import Attention

# decode (no mask: the plain pass; "bias": the decode buffer's additive mask over its padded slots), a completing
# token, chunks, a block
SHAPES = ((1, 545, "none"), (1, 600, "bias"), (33, 578, "bool"), (64, 640, "bool"), (128, 704, "bool"),
          (256, 800, "bool"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    arch = SimpleNamespace(hidden_size=576, head_dim=64, num_heads=9, num_kv_heads=3, qkv_bias=False, o_bias=False)
    attn = Attention(arch)
    g = torch.Generator().manual_seed(0)
    print(f"bf16, {args.threads} thread(s), mean of {args.repeats}")
    print("| query rows | keys | mask | SDPA us | few_queries us | max abs error vs fp32 SDPA: SDPA / few_queries |")
    print("|---:|---:|---|---:|---:|---|")
    for r, c, kind in SHAPES:
        q = torch.randn(1, 9, r, 64, generator=g).bfloat16()
        k, v = (torch.randn(1, 3, c, 64, generator=g).bfloat16() for _ in range(2))
        mask = torch.rand(r, c, generator=g) > 0.3
        mask[:, 0] = True
        if kind == "none":
            mask = None
        elif kind == "bias":  # the last 40 slots not yet written
            mask = torch.zeros(1, 1, 1, c).masked_fill_(torch.arange(c) >= c - 40, float("-inf")).bfloat16()

        def sdpa(q=q, k=k, v=v, mask=mask) -> torch.Tensor:
            return F_.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

        def few(q=q, k=k, v=v, mask=mask) -> torch.Tensor:
            return attn.few_queries(q, k, v, mask)

        times = []
        for fn in (sdpa, few):
            fn()
            t = time.perf_counter()
            for _ in range(args.repeats):
                fn()
            times.append((time.perf_counter() - t) / args.repeats * 1e6)
        ref_mask = mask.float() if kind == "bias" else mask
        ref = F_.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=ref_mask, enable_gqa=True)
        errs = [(fn().float() - ref).abs().max().item() for fn in (sdpa, few)]
        print(f"| {r} | {c} | {kind} | {times[0]:.0f} | {times[1]:.0f} | {errs[0]:.4f} / {errs[1]:.4f} |")


if __name__ == "__main__":
    main()
