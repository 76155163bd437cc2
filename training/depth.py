"""Depth test: next-token accuracy over the W tokens that follow N ingested tokens of held-out text, N up to 1M.

    python -m training.depth run --system fam-adapter --max-depth 1048576
    python -m training.depth run --system sink-base
    python -m training.depth report

The text is the R manuals of Debian's r-doc-pdf (R-intro, R-lang, R-data, R-admin, R-FAQ, R-ints, R-exts, then
the 2,415-page reference manual; ~1.8M tokens of technical English the adapter never saw), extracted once with
pypdf and cached in runs/depth/.

Systems (default model, bf16 unless --dtype says otherwise; B, m and F are the bundled adapter's):
  fam-adapter   fam with the bundled adapter, as the server runs it
  sink-adapter  sink with the adapter's LoRA attached (what a default session runs while the adapter is loaded)
  bswa-adapter  bswa with the adapter's LoRA
  sink-base, bswa-base   the base weights

fam is measured in one pass over the stream: the scored windows are the logits of that same ingest, and the FAM
state itself is traced at every block (per-layer RMS of the feedback rows, and how far each block moves them), so a
drift shows where it starts and in which layers. The pass checkpoints its state (also at its end) and resumes, so a
deeper run continues a shallower one.

sink and bswa have a bounded receptive field: a token's output depends on the sinks and on the last L·m blocks
(each layer reaches m blocks further back), so their state at depth N is computed exactly from the sinks plus the
L·m + 1 blocks before N (`window_stream`; tests/training/test_depth.py checks it against the whole stream).
Every measured cell is appended to runs/depth/cells.jsonl; `report` writes docs/depth.md and docs/depth.png.

`--window W` scores W tokens after each depth (default 2,048; one window length per --runs folder). Two systems
disagree on some of the same tokens, so their gap in one window has a sampling noise: cells keep their hits per
256 tokens, and the report gives the standard deviation of the worst gap from them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import Tensor

from model.adapter import BUNDLED, load_adapter
from model.fam import FamLM
from model.loader import DEFAULT_MODEL_NAME
from model.runtime import FamRuntime

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "depth"
R_MANUALS = Path("/usr/share/R/doc/manual")
R_ORDER = ("R-intro", "R-lang", "R-data", "R-admin", "R-FAQ", "R-ints", "R-exts", "fullrefman")
DEPTHS = (2048, 4096, 8192, 12288, 16384, 24576, 32768, 49152, 65536, 98304, 131072, 196608, 262144, 393216, 524288,
          786432, 1048576)
WINDOW = 2048
SPAN = 256  # cells record their hits per SPAN scored tokens: the report's paired noise of a gap comes from them
SYSTEMS = ("fam-adapter", "sink-adapter", "bswa-adapter", "sink-base", "bswa-base")


# ------------------------------------------------------------------------------------------------ the text

def text_tokens(tokenizer, cache: Path = RUNS / "rdocs_tokens.json") -> list[int]:
    """The R manuals as one token stream (extracted and tokenized once, then cached)."""
    if cache.is_file():
        return json.loads(cache.read_text())
    from pypdf import PdfReader

    missing = [n for n in R_ORDER if not (R_MANUALS / f"{n}.pdf").is_file()]
    if missing:
        raise SystemExit(f"missing {missing} in {R_MANUALS}: apt-get install r-doc-pdf")
    parts = []
    for name in R_ORDER:
        t0 = time.time()
        pages = PdfReader(R_MANUALS / f"{name}.pdf").pages
        parts.append("\n".join(p.extract_text() or "" for p in pages))
        print(f"extracted {name}: {len(pages)} pages in {time.time() - t0:.0f} s", flush=True)
    ids = list(tokenizer.encode("\n\n".join(parts), add_special_tokens=False))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(ids))
    return ids


# ------------------------------------------------------------------------------------------------ measuring

def window_stream(m: FamLM, mode: str, depth: int, window: int = WINDOW, extra_blocks: int = 1
                  ) -> tuple[list[int], int]:
    """Which stream positions give a sink/bswa state equal to the whole stream's at `depth`: the sinks, then the
    L·m + `extra_blocks` blocks before `depth` (block-aligned, so blocks fall where they fall in the whole stream),
    then the scored window. Returns the index list (into the original stream) and the RoPE position of its first
    token (bswa keeps true positions; sink re-bases them anyway)."""
    cfg = m.fam_cfg.replace(mode=mode)
    B = cfg.block_size
    span = (m.arch.num_layers * cfg.memory_blocks + extra_blocks) * B
    start = max(0, (depth - span) // B * B)
    if start == 0:
        return list(range(depth + window)), 0
    sinks = cfg.n_sinks
    return list(range(sinks)) + list(range(start + sinks, depth + window)), (0 if sinks else start)


def window_logits(m: FamLM, mode: str, ids: Tensor, depth: int, window: int = WINDOW, extra_blocks: int = 1
                  ) -> Tensor:
    """Logits [window, vocab] at stream positions [depth, depth + window) of ids [N], from the shortened stream."""
    idx, position = window_stream(m, mode, depth, window, extra_blocks)
    short = ids[torch.tensor(idx, device=ids.device)]
    state, out = m.new_state(mode=mode, position=position), []
    for a, b in state.cuts(len(idx)):
        state, h = m.forward_chunk(state, short[None, a:b])
        if b > len(idx) - window:
            out.append(m.logits(h[0, max(0, len(idx) - window - a):]))
    return torch.cat(out)


def stream_logits(m: FamLM, mode: str, ids: Tensor, depth: int, window: int = WINDOW) -> Tensor:
    """Logits [window, vocab] at positions [depth, depth + window) of ids [N], ingesting the whole stream."""
    state, out = m.new_state(mode=mode), []
    for a, b in state.cuts(depth + window):
        state, h = m.forward_chunk(state, ids[None, a:b])
        if b > depth:
            out.append(m.logits(h[0, max(0, depth - a):]))
    return torch.cat(out)


def score(m: FamLM, h: Tensor, targets: Tensor) -> list[bool]:
    """Greedy next-token hits of hidden states h [1, T, d] against targets [T], token by token."""
    return (m.logits(h[0]).argmax(-1) == targets).tolist()


def window_cell(hits: list[bool]) -> dict:
    """A cell's score from its scored tokens' hits: the total, and the hits per SPAN tokens."""
    spans = [sum(hits[i:i + SPAN]) for i in range(0, len(hits), SPAN)]
    return {"hits": sum(hits), "n": len(hits), "accuracy": round(sum(hits) / len(hits), 4), "span_hits": spans}


@torch.inference_mode()
def run_window(rt: FamRuntime, mode: str, stream: list[int], depth: int, window: int) -> list[bool]:
    ids = torch.tensor(stream[:depth + window + 1], device=rt.device)
    pred = window_logits(rt.module, mode, ids, depth, window).argmax(-1)
    return (pred == ids[depth + 1:depth + window + 1]).tolist()


def trace_row(block: int, tokens: int, old: Tensor, new: Tensor, start: int) -> dict:
    """Per-layer RMS of the feedback rows and their relative movement in one update (layers >= start move)."""
    rms = new[0].float().pow(2).mean((-1, -2)).sqrt()
    move = (new[0] - old[0]).float().norm(dim=(-1, -2)) / old[0].float().norm(dim=(-1, -2)).clamp_min(1e-9)
    return {"block": block, "tokens": tokens, "rms": [round(x, 3) for x in rms.tolist()],
            "move": [round(x, 4) for x in move[start:].tolist()]}


@torch.inference_mode()
def run_stream(rt: FamRuntime, cell: dict, stream: list[int], depths: list[int], runs: Path, window: int) -> None:
    """One pass of fam over the stream up to the deepest window, scoring every window of `window` tokens and tracing
    the state. `cell`: what every cell of this system records besides its depth and score (`run`)."""
    m, B, system = rt.module, rt.fam_config.block_size, cell["system"]
    ckpt, trace = runs / f"{system}.state", runs / f"{system}.trace.jsonl"
    done = {c["depth"] for c in cells(runs) if c["system"] == system}
    todo = sorted(d for d in depths if d not in done)
    if not todo:
        return
    state, pos = rt.new_state(), 0
    if ckpt.is_file():
        state = rt.state_from_bytes(ckpt.read_bytes())[0]
        pos = int(state.n_tokens[0])
        print(f"{system}: resuming at {pos} tokens", flush=True)
        todo = [d for d in todo if d >= pos]
    if not todo:
        return
    end = todo[-1] + window
    ids = torch.tensor(stream[:end + 1], device=rt.device)
    windows: dict[int, list[bool]] = {d: [] for d in todo}
    t0, t_ckpt = time.time(), time.time()
    for a, b in ((pos + x, pos + y) for x, y in state.cuts(end - pos)):
        old = state.fam
        state, h = m.forward_chunk(state, ids[None, a:b])
        for d, acc in windows.items():
            lo, hi = max(a, d), min(b, d + window)
            if lo < hi:
                acc += score(m, h[:, lo - a:hi - a], ids[lo + 1:hi + 1])
                if hi == d + window:
                    scored = window_cell(acc)
                    record(runs, {**cell, "depth": d, **scored, "seconds": round(time.time() - t0)})
                    print(f"{system} depth {d}: {scored['accuracy']:.3f} ({(b - pos) / (time.time() - t0 + 1e-9):.0f} "
                          f"tok/s since start)", flush=True)
        if b % B == 0 and state.cfg.F:
            blk = b // B - 1
            if blk < 64 or blk % 8 == 0:
                with trace.open("a") as f:
                    f.write(json.dumps(trace_row(blk, b, old, state.fam, state.cfg.fam_update_from)) + "\n")
        if time.time() - t_ckpt > 300 and not any(d <= b < d + window for d in todo):  # never inside a window
            ckpt.write_bytes(rt.state_to_bytes(state))
            t_ckpt = time.time()
    ckpt.write_bytes(rt.state_to_bytes(state))  # a deeper run later resumes from here


def cells(runs: Path) -> list[dict]:
    path = runs / "cells.jsonl"
    return [json.loads(line) for line in path.open()] if path.is_file() else []


def record(runs: Path, rec: dict) -> None:
    with (runs / "cells.jsonl").open("a") as f:
        f.write(json.dumps(rec) + "\n")


def dtype_name(rt: FamRuntime) -> str:
    return str(rt.dtype).removeprefix("torch.")


def cell_window(cell: dict) -> int:
    """Scored tokens of a cell (cells from before --window scored WINDOW)."""
    return cell.get("window", WINDOW)


def paired_sd(a: dict, b: dict) -> float | None:
    """Standard deviation of the accuracy gap a - b between two cells of one window from its sampling noise: the
    spans' hit differences taken as independent draws (None for cells without span hits)."""
    if "span_hits" not in a or "span_hits" not in b:
        return None
    diffs = [x - y for x, y in zip(a["span_hits"], b["span_hits"], strict=True)]
    mean = sum(diffs) / len(diffs)
    var = sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1)
    return (var * len(diffs)) ** 0.5 / a["n"]


def cell_dtype(cell: dict) -> str:
    """The dtype a cell was measured in (cells written before the dtype was recorded were bfloat16)."""
    return cell.get("dtype", "bfloat16")


def load_system(system: str, adapter: Path, overrides: dict, dtype: str) -> tuple[FamRuntime, str]:
    mode, weights = system.split("-")
    if weights == "adapter":
        return FamRuntime.load(None, adapter=adapter, dtype=dtype, fam_overrides=overrides), mode
    cfg = load_adapter(adapter, DEFAULT_MODEL_NAME).fam_config()
    return FamRuntime.load(None, fam=cfg.replace(mode=mode, **overrides), dtype=dtype), mode


def parse_set(items: list[str]) -> dict:
    """["fam_norm=true", "fam_update_from=20"] -> FamConfig overrides (JSON values)."""
    return {k: json.loads(v) for k, v in (item.split("=", 1) for item in items)}


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    args.runs.mkdir(parents=True, exist_ok=True)  # a fam run writes its trace before its first cell
    overrides = parse_set(args.set)
    rt, mode = load_system(args.system, args.adapter, overrides, args.dtype)
    name = args.name or args.system
    found = cells(args.runs)
    mine = [c for c in found if c["system"] == name]
    other = {cell_dtype(c) for c in mine} - {dtype_name(rt)}
    if other:  # one system's cells, and the state a deeper run resumes from, stay in one dtype
        raise SystemExit(f"{args.runs} holds {name} cells in {other}, this run is {dtype_name(rt)}: "
                         "use --runs or --name")
    if {cell_window(c) for c in found} - {args.window}:  # a report compares windows of one length
        raise SystemExit(f"{args.runs} holds cells of another window than {args.window} tokens: use --runs")
    stream = text_tokens(rt.tokenizer)
    # a system run with another adapter than the bundled one names it in its cells (the report lists them)
    adapter = {} if args.adapter == BUNDLED[DEFAULT_MODEL_NAME] else {"adapter": str(args.adapter)}
    cell = {"system": name, "set": overrides, **adapter, "dtype": dtype_name(rt), "window": args.window}
    depths = [d for d in DEPTHS if d <= args.max_depth]
    assert depths[-1] + args.window < len(stream), f"the text has {len(stream)} tokens"
    if mode == "fam":
        return run_stream(rt, cell, stream, depths, args.runs, args.window)
    done = {c["depth"] for c in mine}
    for d in depths:
        if d in done:
            continue
        t0 = time.time()
        scored = window_cell(run_window(rt, mode, stream, d, args.window))
        record(args.runs, {**cell, "depth": d, **scored, "seconds": round(time.time() - t0)})
        print(f"{name} depth {d}: {scored['accuracy']:.3f}", flush=True)


# ------------------------------------------------------------------------------------------------ report

def report(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {}
    found = cells(args.runs)
    dtypes = sorted({cell_dtype(c) for c in found})
    windows = {cell_window(c) for c in found}
    if len(windows) != 1:
        raise SystemExit(f"{args.runs} holds cells of windows {sorted(windows)}: one report per window")
    window = windows.pop()
    for c in found:
        by.setdefault(c["system"], {})[c["depth"]] = c
    depths = sorted({d for s in by.values() for d in s})
    systems = [s for s in SYSTEMS if s in by] + sorted(s for s in by if s not in SYSTEMS)
    lines = ["# Depth test: next-token accuracy after N ingested tokens", "",
             f"Generated by `python -m training.depth report{args.flags}` from the cells.jsonl of those runs. "
             f"Each cell: greedy next-token accuracy over the {window} tokens that follow N tokens of the R "
             f"manuals (Debian r-doc-pdf, never seen in training), default model, {' and '.join(dtypes)}, the "
             "bundled adapter's B, m and F. Commands: `python -m training.depth run --system SYSTEM --max-depth "
             f"1048576{'' if dtypes == ['bfloat16'] else ' --dtype ' + '|'.join(dtypes)}"
             f"{'' if window == WINDOW else f' --window {window}'}"
             f"{'' if args.runs == RUNS else f' --runs {args.runs}'}` per system.", "",
             "| system | " + " | ".join(f"{d // 1024}k" for d in depths) + " |",
             "|---|" + "---:|" * len(depths)]
    for s in systems:
        lines.append(f"| {s} | " + " | ".join(f"{by[s][d]['accuracy']:.3f}" if d in by[s] else "-"
                                              for d in depths) + " |")
    variants = {s: next(iter(by[s].values())).get("set") for s in systems}
    if any(variants.values()):
        lines += ["", "Variants (FamConfig overrides of the system named before the last dash): "
                  + "; ".join(f"`{s}`: {v}" for s, v in variants.items() if v) + "."]
    adapters = {s: next(iter(by[s].values())).get("adapter") for s in systems}
    if any(adapters.values()):
        lines += ["", "Systems run with another adapter than the bundled one (`--adapter`): "
                  + "; ".join(f"`{s}`: {a}" for s, a in adapters.items() if a) + "."]
    shipped = load_adapter(BUNDLED[DEFAULT_MODEL_NAME], DEFAULT_MODEL_NAME).fam_config()
    lines += ["", f"The bundled adapter declares fam_gate = {shipped.fam_gate}. Target: fam >= sink - 0.01 at every "
              "depth. Gap of each fam system to each sink system (fam minus sink, over the depths both have); SD: "
              f"the sampling noise (one standard deviation) of the worst gap, from the two cells' hits per {SPAN} "
              "tokens:", "",
              "| fam system | against | depths | mean gap | worst gap | at | SD | met |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for f in (s for s in systems if s.startswith("fam")):
        for ref in (s for s in systems if s.startswith("sink")):
            common = [d for d in depths if d in by[f] and d in by[ref]]
            if not common:
                continue
            gaps = {d: by[f][d]["accuracy"] - by[ref][d]["accuracy"] for d in common}
            worst = min(gaps, key=gaps.get)
            mean = sum(gaps.values()) / len(gaps)
            sd = paired_sd(by[f][worst], by[ref][worst])
            lines.append(f"| {f} | {ref} | {len(common)} (to {common[-1] // 1024}k) | {mean:+.3f} | {gaps[worst]:+.3f}"
                         f" | {worst // 1024}k | {'-' if sd is None else f'{sd:.3f}'}"
                         f" | {'yes' if gaps[worst] >= -0.01 else 'no'} |")
    lines += trace_lines(args.runs)
    args.out.write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    for s in systems:
        ds = sorted(by[s])
        ax.plot(ds, [by[s][d]["accuracy"] for d in ds], marker="o", label=s)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens ingested before the scored window")
    ax.set_ylabel(f"next-token accuracy ({window} tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)


def trace_lines(runs: Path) -> list[str]:
    out = []
    for trace in sorted(runs.glob("*.trace.jsonl")):
        # a run that restarted without its state file traced its blocks again: the last trace of a block counts
        rows = list({r["block"]: r for r in map(json.loads, trace.open())}.values())
        if not rows:
            continue
        # past block 63 only every 8th block is traced (128, 136, ...): each wanted block shows the last one traced
        by_block = sorted(rows, key=lambda r: r["block"])
        pick = []
        for want in (0, 1, 3, 7, 15, 31, 47, 63, 127, 255, 511, 1023, 2047, 4095):
            r = next((r for r in reversed(by_block) if r["block"] <= want), None)
            if r is not None and r not in pick:
                pick.append(r)
        n_layers = len(pick[0]["rms"])
        start = n_layers - len(pick[0]["move"])
        show = [li for li in (0, start, start + 4, start + 8, n_layers - 2, n_layers - 1) if li < n_layers]
        out += ["", f"## FAM state of `{trace.name.removesuffix('.trace.jsonl')}`, block by block", "",
                "RMS of the feedback rows entering layer l, and (move) the relative change"
                " ||F_new - F_old|| / ||F_old|| of one update, averaged over the updating layers.", "",
                "| block | tokens | " + " | ".join(f"rms L{li}" for li in show) + " | mean move |",
                "|---:|---:|" + "---:|" * (len(show) + 1)]
        for r in pick:
            out.append(f"| {r['block']} | {r['tokens']} | " + " | ".join(f"{r['rms'][li]:.2f}" for li in show)
                       + f" | {sum(r['move']) / len(r['move']):.3f} |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--system", required=True)
    r.add_argument("--adapter", type=Path, default=BUNDLED[DEFAULT_MODEL_NAME])
    r.add_argument("--max-depth", type=int, default=DEPTHS[-1])
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--dtype", default="bfloat16", choices=("auto", "bfloat16", "float32"),
                   help="weights and state dtype (bfloat16, the default, is what docs/depth.md measured)")
    r.add_argument("--runs", type=Path, default=RUNS, help="folder of cells.jsonl, the states and the traces")
    r.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="FamConfig overrides, e.g. fam_norm=true")
    r.add_argument("--name", help="label of the measured system (default: --system)")
    r.add_argument("--window", type=int, default=WINDOW, help="scored tokens after each depth (one per --runs)")
    rep = sub.add_parser("report")
    rep.add_argument("--runs", type=Path, default=RUNS, help="folder of cells.jsonl and the state traces")
    rep.add_argument("--out", type=Path, default=ROOT / "docs" / "depth.md", help="markdown; the plot beside it")
    args = p.parse_args()
    if args.cmd == "report":
        args.flags = "".join(f" --{k} {v}" for k, v in (("runs", args.runs), ("out", args.out))
                             if v != rep.get_default(k))
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
