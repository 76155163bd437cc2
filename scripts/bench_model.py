"""Model benchmark: FAM / BSWA ingest and decode against Hugging Face transformers on the same weights.

Every measurement runs in a fresh subprocess (so peak RSS belongs to that measurement alone); the driver runs
them round-robin, repeated, so that a noisy machine slows every contender alike, and reports medians and
ratios. Writes a markdown table to stdout and to --out.

    python scripts/bench_model.py                       # the README table (about 30-60 min on 2 cores)
    python scripts/bench_model.py --lengths 2048 8192 --dtypes bfloat16 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DECODE_TOKENS = 32


def worker(spec: dict) -> dict:
    """One measurement in this process: spec = {kind: fam|bswa|hf, dtype, n, decode: bool}."""
    import torch

    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, str(ROOT))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (1, spec["n"]), generator=gen)
    out: dict = {}
    with torch.inference_mode():
        if spec["kind"] == "hf":
            from transformers import AutoModelForCausalLM, DynamicCache

            from model.loader import default_model_dir

            hf = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=getattr(torch, spec["dtype"]))
            hf(ids[:, :128])  # warm-up
            cache = DynamicCache(config=hf.config)
            t = time.perf_counter()
            logits = hf(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            out["ingest_s"] = time.perf_counter() - t
            if spec["decode"]:
                tok = logits[:, -1].argmax(-1, keepdim=True)
                t = time.perf_counter()
                for _ in range(DECODE_TOKENS):
                    logits = hf(tok, past_key_values=cache, use_cache=True).logits
                    tok = logits[:, -1].argmax(-1, keepdim=True)
                out["decode_s"] = time.perf_counter() - t
        else:
            from model import FamRuntime

            # as the server runs it: the bundled adapter (LoRA side paths) with its own layout, in the asked mode
            rt = FamRuntime.load(None, dtype=spec["dtype"], adapter="auto", fam_overrides={"mode": spec["kind"]})
            warm, _ = rt.module.ingest(rt.new_state(), ids[:, :2 * rt.fam_config.block_size + 7])  # every shape
            rt.module.ingest(warm, ids[:, :1])  # kind once: block passes, FAM updates, a partial chunk, decode
            t = time.perf_counter()
            state, h = rt.module.ingest(rt.new_state(), ids)
            out["ingest_s"] = time.perf_counter() - t
            out["state_bytes"] = state.nbytes
            if spec["decode"]:
                tok = rt.module.logits(h).argmax(-1, keepdim=True)
                t = time.perf_counter()
                for _ in range(DECODE_TOKENS):
                    state, h = rt.module.ingest(state, tok)
                    tok = rt.module.logits(h).argmax(-1, keepdim=True)
                out["decode_s"] = time.perf_counter() - t
            out["block"] = [rt.fam_config.block_size, rt.fam_config.memory_blocks, rt.fam_config.fam_len]
            out["nonemb_params"] = rt.module.arch.non_embedding_params()
            out["lm_head_params"] = rt.module.lm_head.weight.numel()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def matmul_rate(dtype: str, threads: int) -> float:
    """The machine's measured dense matmul rate (FLOP/s) at this dtype and thread count."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(2048, 2048, dtype=getattr(torch, dtype))
    b = torch.randn(2048, 2048, dtype=getattr(torch, dtype))
    a[:256, :256] @ b[:256, :256]  # warm-up
    t, n = time.perf_counter(), 0
    while n < 10 and (n == 0 or time.perf_counter() - t < 2):  # up to 10, within ~2 s (bf16 on AVX2: ~20 s each)
        a @ b
        n += 1
    return 2 * 2048**3 * n / (time.perf_counter() - t)


def run(spec: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"worker {spec} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--hf-max", type=int, default=8192, help="the base model's context limit")
    ap.add_argument("--float32-max", type=int, default=32768,
                    help="longest float32 run (float32 ingest is ~3x slower than bfloat16 on AMX CPUs)")
    ap.add_argument("--decode-at", type=int, nargs="+", default=[8192, 131072])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads per run (on a machine shared with other jobs, 1 avoids the thread-barrier "
                         "stalls that oversubscription inflicts on many small ops)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_model.md"))
    ap.add_argument("--cache", default=str(ROOT / "runs" / "bench_model.jsonl"),
                    help="every measurement is appended here; a rerun reuses what it finds (delete it to start over)")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    def lengths(dt: str) -> list[int]:
        return [n for n in args.lengths if dt != "float32" or n <= args.float32_max]

    specs = [dict(kind=k, dtype=dt, n=n, decode=n in args.decode_at, threads=args.threads)
             for dt in args.dtypes for n in lengths(dt) for k in ("fam", "bswa", "hf")
             if k != "hf" or n <= args.hf_max]
    cache = Path(args.cache)
    cached: dict[str, list[dict]] = {}
    if cache.is_file():
        for line in cache.read_text().splitlines():
            row = json.loads(line)
            cached.setdefault(json.dumps(row["spec"], sort_keys=True), []).append(row["result"])
    cache.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for r in range(args.repeats):  # round-robin: every contender sees the same machine weather
        for s in specs:
            key = json.dumps(s, sort_keys=True)
            if len(cached.get(key, [])) > r:
                res = cached[key][r]
            else:
                res = run(s)
                with cache.open("a") as f:
                    f.write(json.dumps({"spec": s, "result": res}) + "\n")
            results.setdefault(key, []).append(res)
            print(f"[{r + 1}/{args.repeats}] {s} -> {res}", file=sys.stderr, flush=True)

    def med(s: dict, field: str) -> float | None:
        vals = [x[field] for x in results.get(json.dumps(s, sort_keys=True), []) if field in x]
        return statistics.median(vals) if vals else None

    lines = [f"Benchmark of {date.today()} on {platform.machine()} ({platform.processor() or 'cpu'}), "
             f"{args.threads} thread(s), load average at start {os.getloadavg()[0]:.1f}; "
             f"command: `python scripts/bench_model.py {' '.join(sys.argv[1:])}`; median of {args.repeats}.", ""]
    nonemb = next(x["nonemb_params"] for v in results.values() for x in v if "nonemb_params" in x)
    block = next(x["block"] for v in results.values() for x in v if "block" in x)
    lines.append(f"FAM settings B={block[0]}, m={block[1]}, F={block[2]}; decode = {DECODE_TOKENS} greedy tokens.")
    lines.append("")
    lines.append("| dtype | tokens | fam ingest tok/s | bswa ingest tok/s | HF prefill tok/s | fam / HF | "
                 "fam % of matmul peak | fam peak RSS MB | HF peak RSS MB | state bytes |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for dt in args.dtypes:
        peak = matmul_rate(dt, args.threads)
        for n in lengths(dt):
            f_s, b_s, h_s = (med(dict(kind=k, dtype=dt, n=n, decode=n in args.decode_at, threads=args.threads),
                                 "ingest_s") for k in ("fam", "bswa", "hf"))
            fam_spec = dict(kind="fam", dtype=dt, n=n, decode=n in args.decode_at, threads=args.threads)
            hf_spec = dict(kind="hf", dtype=dt, n=n, decode=n in args.decode_at, threads=args.threads)
            rss_f, rss_h, sb = med(fam_spec, "peak_rss_mb"), med(hf_spec, "peak_rss_mb"), med(fam_spec, "state_bytes")
            fam_tps = n / f_s
            lines.append(
                f"| {dt} | {n} | {fam_tps:.0f} | {n / b_s:.0f} | {f'{n / h_s:.0f}' if h_s else '-'} | "
                f"{f'{h_s / f_s:.2f}' if h_s else '-'} | {100 * 2 * nonemb * fam_tps / peak:.0f}% | {rss_f:.0f} | "
                f"{f'{rss_h:.0f}' if rss_h else '-'} | {sb / 1e6:.1f} MB |")
    lines += ["", "| dtype | after tokens | fam decode tok/s | bswa decode tok/s | HF decode tok/s (KV cache) |",
              "|---|---|---|---|---|"]
    for dt in args.dtypes:
        for n in (n for n in args.decode_at if n in lengths(dt)):
            vals = [med(dict(kind=k, dtype=dt, n=n, decode=True, threads=args.threads), "decode_s")
                    for k in ("fam", "bswa", "hf")]
            lines.append(f"| {dt} | {n} | " + " | ".join(f"{DECODE_TOKENS / v:.1f}" if v else "-" for v in vals) + " |")
    for dt in args.dtypes:
        lines.append(f"\nMeasured {dt} matmul rate: {matmul_rate(dt, args.threads) / 1e9:.3g} GFLOP/s "
                     f"(2048x2048 mm); FLOPs per token counted as 2 x {nonemb / 1e6:.0f}M non-embedding parameters.")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
