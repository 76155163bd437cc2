"""Tables (and a plot) of the retrieval-curriculum runs, from their logs (training/curriculum.py).

    python -m training.curriculum_report --sanity NAME=LOG ... [--curriculum LOG] [--probe LOG] [--every 10]
        [--plot docs/retrieval_curriculum.png] > table.md

Prints markdown: per run, the mean answer loss per digit (nats; chance ln 10 = 2.30) and the exact match over each
window of `--every` steps; for a curriculum log also per distance (replay batches apart: `train --replay-distances`)
and the steps where the maximum advanced.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def windows(recs: list[dict], every: int) -> list[tuple[int, int, float, float]]:
    out = []
    for a in range(0, len(recs), every):
        w = recs[a:a + every]
        out.append((w[0]["step"], w[-1]["step"], sum(r["loss"] for r in w) / len(w), sum(r["em"] for r in w) / len(w)))
    return out


def sanity_table(runs: dict[str, list[dict]], every: int) -> list[str]:
    names = list(runs)
    lines = ["| steps | " + " | ".join(f"{n}: loss / EM" for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    cols = {n: windows(r, every) for n, r in runs.items()}
    for i in range(max(len(c) for c in cols.values())):
        cells = [f"{c[i][2]:.3f} / {c[i][3]:.2f}" if i < len(c) else "" for c in cols.values()]
        lines.append(f"| {i * every + 1}-{(i + 1) * every} | " + " | ".join(cells) + " |")
    lines += ["", "| run | steps | first step loss | min loss | last-10 mean loss | last-10 EM | "
                  "first step with loss < 0.05 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for n, r in runs.items():
        last = r[-10:]
        hit = next((x["step"] for x in r if x["loss"] < 0.05), None)
        lines.append(f"| {n} | {len(r)} | {r[0]['loss']:.3f} | {min(x['loss'] for x in r):.4f} | "
                     f"{sum(x['loss'] for x in last) / len(last):.3f} | {sum(x['em'] for x in last) / len(last):.2f} | "
                     f"{hit if hit is not None else 'never'} |")
    return lines


def curriculum_table(recs: list[dict], every: int) -> list[str]:
    lines = ["| steps | max distance | mean loss | mean EM | loss / EM per distance |", "|---|---:|---:|---:|---|"]
    for a in range(0, len(recs), every):
        w = recs[a:a + every]
        per: dict[tuple[bool, int], list[dict]] = {}
        for r in w:
            per.setdefault((r.get("replay", False), r["distance"]), []).append(r)
        cells = ", ".join(f"{'replay ' if replay else ''}d={d}: {sum(x['loss'] for x in v) / len(v):.2f} / "
                          f"{sum(x['em'] for x in v) / len(v):.2f}" for (replay, d), v in sorted(per.items()))
        lines.append(f"| {w[0]['step']}-{w[-1]['step']} | {w[-1]['max_distance']} | "
                     f"{sum(r['loss'] for r in w) / len(w):.3f} | {sum(r['em'] for r in w) / len(w):.2f} | {cells} |")
    adv = [(r["step"], r["advanced_to"]) for r in recs if "advanced_to" in r]
    lines += ["", "Advances of the maximum distance (step, new maximum): " + (", ".join(map(str, adv)) or "none")]
    return lines


def plot(runs: dict[str, list[dict]], curriculum: list[dict] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in runs.items():
        ax.plot([x["step"] for x in r], [x["loss"] for x in r], label=name, lw=1)
    if curriculum:
        ax.plot([x["step"] for x in curriculum], [x["loss"] for x in curriculum], label="curriculum (all d)", lw=1)
    ax.axhline(2.302585, color="grey", ls="--", lw=1, label="chance (ln 10)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("answer loss per digit (nats)")
    ax.set_title("PassKey through the FAM state, m = 0 (SmolLM2-135M, B = 64)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sanity", nargs="*", default=[], metavar="NAME=LOG")
    ap.add_argument("--curriculum", type=Path, default=None)
    ap.add_argument("--probe", type=Path, nargs="*", default=[])
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    runs = {s.split("=", 1)[0]: read(Path(s.split("=", 1)[1])) for s in args.sanity}
    lines: list[str] = []
    if runs:
        lines += sanity_table(runs, args.every) + [""]
    for p in args.probe:
        lines += ["| control | distance | loss | grad norm w.r.t. each block's input embeddings | w.r.t. the prompt |",
                  "|---|---:|---:|---|---:|"]
        for r in read(p):
            lines.append(f"| {r['control']} | {r['distance']} | {r['loss']:.3f} | {r['grad_norm_per_block']} | "
                         f"{r['grad_norm_prompt']} |")
        lines.append("")
    curriculum = read(args.curriculum) if args.curriculum else None
    if curriculum:
        lines += curriculum_table(curriculum, args.every) + [""]
    print("\n".join(lines))
    if args.plot:
        plot(runs, curriculum, args.plot)


if __name__ == "__main__":
    main()
