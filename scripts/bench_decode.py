"""Decode throughput of N sessions, in-process: what the engine's batched step buys over decoding one by one.

Each of N sessions holds a document of a different length (so their blocks are at different fills, as real
sessions are), then every variant decodes `--steps` tokens per session from those states, the variants taking
turns for `--rounds` rounds (the medians are printed, so a noisy machine hurts less):

  single      one session alone, `forward_chunk` (the path before batching)
  sequential  the N sessions one after another, `forward_chunk` each (with `--decode-dtype`, each one-row pass
              reads the model's row copies: what the engine runs for passes too small to batch)
  ragged      the N sessions in one `forward_many` pass per token: dense layers over all rows at once,
              attention per session over its own cache
  batched     the ragged pass with a persistent `DecodeBatch` (what the engine runs): the sessions' caches in one
              padded buffer per layer that each token is written into, one masked attention for all of them
  stacked     N copies of one state stacked into one batch (`FamState.stack` + `forward_chunk`): the bound that
              grouping by equal layout (or padding to one) could reach, since it needs no per-session attention

Every variant includes the lm_head and an argmax per token. Usage:
    python scripts/bench_decode.py --sessions 8 --steps 16 --rounds 3 --threads 2 [--dtype float32 --decode-dtype auto]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model import FamRuntime, FamState
from model.decode import DecodeBatch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--decode-dtype", default="none",
                    help="the one-row weight copies, as the server's flag (none: what the library loads by default)")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--doc-tokens", type=int, default=400, help="the first session's document; each next +37")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rt = FamRuntime.load(args.model, dtype=args.dtype, adapter="auto", decode_dtype=args.decode_dtype)
    m, n = rt.module, args.sessions
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        states = [rt.ingest(rt.new_state(), torch.randint(100, 20000, (args.doc_tokens + 37 * i,), generator=g)
                            .tolist())[0] for i in range(n)]

        def decode(state: FamState, h: torch.Tensor) -> tuple[FamState, torch.Tensor]:
            return m.forward_chunk(state, m.logits(h[:, -1]).argmax(-1, keepdim=True))

        def single() -> int:
            s, h = states[0], m.embed_tokens.weight[None, :1]  # any start; the argmax feeds the next token
            for _ in range(args.steps):
                s, h = decode(s, h)
            return args.steps

        def sequential() -> int:
            for s in states:
                h = m.embed_tokens.weight[None, :1]
                for _ in range(args.steps):
                    s, h = decode(s, h)
            return n * args.steps

        def ragged() -> int:
            st, toks = list(states), [torch.tensor([1])] * n
            for _ in range(args.steps):
                out = m.forward_many(st, toks)
                st = [s for s, _ in out]
                toks = list(m.logits(torch.cat([h[:, -1] for _, h in out])).argmax(-1, keepdim=True))
            return n * args.steps

        def batched() -> int:
            st, toks, batch = list(states), [torch.tensor([1])] * n, DecodeBatch()
            for _ in range(args.steps):
                out = m.forward_many(st, toks, decode=batch)
                st = [s for s, _ in out]
                toks = list(m.logits(torch.cat([h[:, -1] for _, h in out])).argmax(-1, keepdim=True))
            return n * args.steps

        def stacked() -> int:
            s, h = FamState.stack([states[0]] * n), m.embed_tokens.weight[None, :1].expand(n, 1, -1)
            for _ in range(args.steps):
                s, h = decode(s, h)
            return n * args.steps

        variants = {"single": single, "sequential": sequential, "ragged": ragged, "batched": batched,
                    "stacked": stacked}
        rates: dict[str, list[float]] = {k: [] for k in variants}
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for name, fn in variants.items():
                t = time.perf_counter()
                tokens = fn()
                rates[name].append(tokens / (time.perf_counter() - t))
    fills = sorted(s.n_block for s in states)
    copy = str(rt.decode_dtype).removeprefix("torch.") if rt.decode_dtype else "none"
    print(f"{rt.name}, {args.dtype} (one-row copies: {copy}), {args.threads} threads, {n} sessions "
          f"(block fills {fills}), {args.steps} tokens each, median of {args.rounds} rounds")
    print("| variant | tokens/s (all sessions) | vs single |")
    print("|---|---|---|")
    base = statistics.median(rates["single"])
    for name, r in rates.items():
        med = statistics.median(r)
        print(f"| {name} | {med:.1f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
