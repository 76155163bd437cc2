"""Evaluate FAM adapters and baselines: PassKey accuracy against filler length, next-token accuracy on held-out books.

    python -m training.evaluate passkey --system fam-adapter --lengths 1024 4096 --keys 4
    python -m training.evaluate nexttoken --system full-base --excerpts 2
    python -m training.evaluate report

Systems (the base model is the default SmolLM2-135M-Instruct; B and m come from the adapter's fam_config):
  fam-adapter   the trained adapter (--adapter, default the bundled file), loaded as the server loads it
  bswa-adapter  the BSWA control adapter (--adapter ...-bswa.safetensors), if one was trained
  fam-base      untrained FAM (initial prompt, no LoRA)
  bswa-base, sink-base, full-base   the base weights in those modes (full: up to the model's 8k context)

Every measured cell (system, dtype, task, length, key index) is appended to runs/eval/cells.jsonl, so runs can be
split, interrupted and resumed (`--dtype float32` on a CPU without bf16 matmul units; the report shows such rows
with their dtype); keys are seeded by (length, index), identical across systems. `report` writes
docs/eval.md and docs/eval_passkey.png from all cells (`--cells` and `--out` for another set). PassKey: Landmark
format with the standard filler, the key at a seeded uniform depth, exact match of the key's tokens under teacher
forcing (equal to greedy decoding here).
Next-token: accuracy on held-out KJV books (training.data.HELD_OUT), excerpts of --excerpt-len tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from model.adapter import BUNDLED, load_adapter
from model.config import FamConfig
from model.loader import DEFAULT_MODEL_NAME
from model.runtime import FamRuntime
from training.data import DataMaker, prose_tokens, to_tensors
from training.depth import cell_dtype, dtype_name
from training.train import sequence_loss

ROOT = Path(__file__).resolve().parents[1]

CELLS = ROOT / "runs" / "eval" / "cells.jsonl"
SYSTEMS = ("fam-adapter", "bswa-adapter", "fam-base", "bswa-base", "sink-base", "full-base")
FULL_LIMIT = 8192


def load_system(system: str, adapter: Path, base_cfg: FamConfig, dtype: str = "bfloat16") -> FamRuntime:
    """Adapters bring their own FamConfig; the base-weight systems use the FAM adapter's B, m and F when its file
    exists (same windows as the adapter), else `base_cfg`."""
    if system.endswith("-adapter"):
        return FamRuntime.load(None, adapter=adapter, dtype=dtype)
    fam_adapter = BUNDLED[DEFAULT_MODEL_NAME]
    if fam_adapter.is_file():
        cfg = load_adapter(fam_adapter, DEFAULT_MODEL_NAME).fam_config()
        base_cfg = base_cfg.replace(block_size=cfg.block_size, memory_blocks=cfg.memory_blocks, fam_len=cfg.fam_len)
    return FamRuntime.load(None, fam=base_cfg.replace(mode=system.removesuffix("-base")), dtype=dtype)


def label(cell: dict) -> str:
    """A cell's row in the report: its system, with the dtype when it is not bfloat16."""
    dtype = cell_dtype(cell)
    return cell["system"] if dtype == "bfloat16" else f"{cell['system']} ({dtype})"


def done_cells(cells: Path) -> set[tuple]:
    if not cells.is_file():
        return set()
    return {(c["system"], cell_dtype(c), c["task"], c["length"], c["key"]) for c in map(json.loads, cells.open())}


def record(cells: Path, rec: dict) -> None:
    cells.parent.mkdir(parents=True, exist_ok=True)
    with cells.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


@torch.inference_mode()
def passkey(rt: FamRuntime, system: str, lengths: list[int], keys: int, batch: int, cells: Path = CELLS) -> None:
    dtype = dtype_name(rt)
    done = done_cells(cells)
    for filler in lengths:
        if system.startswith("full") and filler + 100 > FULL_LIMIT:
            continue
        todo = [i for i in range(keys) if (system, dtype, "passkey", filler, i) not in done]
        for start in range(0, len(todo), batch):
            idx = todo[start:start + batch]
            examples = []
            for i in idx:
                maker = DataMaker(rt.tokenizer, [], seed=filler * 1000 + i)
                examples.append(maker.passkey(filler + maker.passkey_overhead, "standard"))
            tokens, _ = to_tensors(examples)
            a = len(examples[0].answer)
            t0 = time.time()
            state, logits = rt.ingest(rt.new_state(batch=len(idx)), tokens[:, :-a])
            ok = torch.ones(len(idx), dtype=torch.bool)
            for j in range(a):
                ok &= logits.argmax(-1).cpu() == tokens[:, -a + j]
                if j < a - 1:
                    state, logits = rt.ingest(state, tokens[:, -a + j:-a + j + 1])
            dt = time.time() - t0
            for i, e, good in zip(idx, examples, ok.tolist(), strict=True):
                record(cells, {"system": system, "dtype": dtype, "task": "passkey", "length": filler, "key": i,
                        "correct": bool(good), "depth": round(e.depth, 3), "tokens": len(e.tokens),
                        "seconds": round(dt / len(idx), 1)})


@torch.inference_mode()
def nexttoken(rt: FamRuntime, system: str, excerpts: int, excerpt_len: int, skip: int, cells: Path = CELLS) -> None:
    dtype = dtype_name(rt)
    done = done_cells(cells)
    stream = prose_tokens(rt.tokenizer, held_out=True)
    for i in range(excerpts):
        if (system, dtype, "nexttoken", excerpt_len, i) in done:
            continue
        start = (i * 7919 * excerpt_len) % (len(stream) - excerpt_len)
        tokens = torch.tensor([stream[start:start + excerpt_len]])
        w_all = torch.ones_like(tokens, dtype=torch.float32)
        w_far = w_all.clone()
        w_far[:, :skip] = 0
        t0 = time.time()
        _, _, correct_far = sequence_loss(rt.module, rt.new_state(), tokens, w_far)
        record(cells, {"system": system, "dtype": dtype, "task": "nexttoken", "length": excerpt_len, "key": i,
                "skip": skip, "correct_far": int(correct_far), "n_far": int(w_far[:, :-1].sum()), "start": start,
                "seconds": round(time.time() - t0, 1)})


def report(cells_path: Path = CELLS, out: Path = ROOT / "docs" / "eval.md") -> None:
    """`out` (markdown) and, when there are PassKey cells, their plot beside it (<out stem>_passkey.png)."""
    cells = [json.loads(line) for line in cells_path.open()]
    pk: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    nt: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for c in cells:
        if c["task"] == "passkey":
            pk[label(c)][c["length"]].append(c["correct"])
        else:
            nt[label(c)].append((c["correct_far"], c["n_far"]))
    systems = [s for s in SYSTEMS if s in pk] + sorted(set(pk) - set(SYSTEMS))
    lengths = sorted({n for s in pk.values() for n in s})
    shown = cells_path.relative_to(ROOT) if cells_path.is_relative_to(ROOT) else cells_path
    lines = [f"# Evaluation (generated by training/evaluate.py report from {shown})"]
    if pk:
        lines += ["", "## PassKey exact match against filler length (cell: accuracy (correct/keys))", "",
                  "| system | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for s in systems:
        row = []
        for n in lengths:
            r = pk[s].get(n)
            row.append(f"{sum(r) / len(r):.2f} ({sum(r)}/{len(r)})" if r else "-")
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    if nt:
        skip = next(c["skip"] for c in cells if c["task"] == "nexttoken")
        length = next(c["length"] for c in cells if c["task"] == "nexttoken")
        lines += ["", f"## Next-token accuracy on held-out books (excerpts of {length} tokens, positions >= {skip})",
                  "", "| system | accuracy | tokens | excerpts |", "|---|---:|---:|---:|"]
        for s in [s for s in SYSTEMS if s in nt] + sorted(set(nt) - set(SYSTEMS)):
            c, n = map(sum, zip(*nt[s], strict=True))
            lines.append(f"| {s} | {c / n:.4f} | {n} | {len(nt[s])} |")
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not pk:
        return

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in systems:
        xs = [n for n in lengths if pk[s].get(n)]
        ax.plot(xs, [sum(pk[s][n]) / len(pk[s][n]) for n in xs], marker="o", label=s)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("filler tokens")
    ax.set_ylabel("PassKey exact match")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"PassKey, {DEFAULT_MODEL_NAME}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_name(out.stem + "_passkey.png"), dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=("passkey", "nexttoken", "report"))
    ap.add_argument("--system", choices=SYSTEMS)
    ap.add_argument("--adapter", type=Path, default=BUNDLED[DEFAULT_MODEL_NAME])
    ap.add_argument("--name", help="label of the system in the cells and the report (default: --system), e.g. to "
                                   "compare adapter checkpoints")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 262144])
    ap.add_argument("--keys", type=int, default=4, help="keys per length")
    ap.add_argument("--batch", type=int, default=4, help="keys run together")
    ap.add_argument("--excerpts", type=int, default=2)
    ap.add_argument("--excerpt-len", type=int, default=4096)
    ap.add_argument("--skip", type=int, default=1024, help="next-token accuracy counts positions from here")
    ap.add_argument("--block-size", type=int, default=256, help="base systems, when no adapter file exists")
    ap.add_argument("--memory-blocks", type=int, default=1, help="base systems, when no adapter file exists")
    ap.add_argument("--fam-len", type=int, default=32, help="base systems, when no adapter file exists")
    ap.add_argument("--fam-update-from", type=int, default=0, help="base systems: FamConfig.fam_update_from")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=("auto", "bfloat16", "float32"),
                    help="weights and activations (cells record it; a CPU without bf16 matmul units runs float32 "
                         "far faster)")
    ap.add_argument("--cells", type=Path, default=CELLS, help="the cells file this run appends to and reports from")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "eval.md", help="report: the markdown to write")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.task == "report":
        report(args.cells.resolve(), args.out)
        return
    if not args.system:
        ap.error("--system is required")
    base_cfg = FamConfig(block_size=args.block_size, memory_blocks=args.memory_blocks, fam_len=args.fam_len,
                         fam_update_from=args.fam_update_from)
    rt = load_system(args.system, args.adapter, base_cfg, args.dtype)
    print(json.dumps({"system": args.system, "fam_config": rt.fam_config.describe()}), flush=True)
    name = args.name or args.system
    if args.task == "passkey":
        passkey(rt, name, args.lengths, args.keys, args.batch, args.cells)
    else:
        nexttoken(rt, name, args.excerpts, args.excerpt_len, args.skip, args.cells)


if __name__ == "__main__":
    main()
