"""A chat-level memory check through a real server: facts near the start of a document, asked after N tokens of
other text, per session mode.

A `fam-server` is started on loopback (default model, bundled adapter, default settings). For each mode and each
filler length N, a new session ingests a short note stating the facts, then N tokens of the R manuals (Debian
r-doc-pdf, text the model never saw in training; see `training.depth`), then every question is asked as a chat
(greedy, not committed, so each question sees the same session). An answer counts when it contains the expected
word. N = 0 is the control: the facts are still in the window, so it shows what the model answers when it can
see them.

    python -m training.chat_recall --filler 0 16384 --modes fam sink --out docs/chat_recall.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx

from model.loader import load_tokenizer, resolve_device, resolve_dtype, resolve_source
from server import child
from training.depth import text_tokens

NOTE = ("Notes from the harbour office. The keeper's cat is named Saffron. The vault code is 4719. Marta's boat is "
        "painted teal. The archive password is heron. The ferry leaves at seven.")
QUESTIONS = [("What is the keeper's cat named?", "saffron"), ("What is the vault code?", "4719"),
             ("What colour is Marta's boat painted?", "teal"), ("What is the archive password?", "heron"),
             ("When does the ferry leave?", "seven")]


def trial(base: str, mode: str, filler: str) -> tuple[int, list[str]]:
    sid = httpx.post(f"{base}/v1/sessions", json={"mode": mode}).json()["id"]
    httpx.post(f"{base}/v1/sessions/{sid}/ingest", json={"text": NOTE}, timeout=600).raise_for_status()
    if filler:
        httpx.post(f"{base}/v1/sessions/{sid}/ingest", json={"text": filler}, timeout=3600).raise_for_status()
    tokens = httpx.get(f"{base}/v1/sessions/{sid}").json()["tokens"]
    answers = []
    for question, _ in QUESTIONS:
        r = httpx.post(f"{base}/v1/chat/completions", timeout=600, json={
            "session_id": sid, "messages": [{"role": "user", "content": question}], "max_tokens": 24,
            "temperature": 0})
        r.raise_for_status()
        answers.append(r.json()["choices"][0]["message"]["content"].strip().replace("\n", " ").replace("|", "/"))
    httpx.delete(f"{base}/v1/sessions/{sid}")
    return tokens, answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--filler", type=int, nargs="+", default=[0, 16384], help="tokens of other text after the note")
    ap.add_argument("--modes", nargs="+", default=["fam", "sink"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", type=Path, default=Path("runs/chat_recall/data"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    folder, _ = resolve_source(None)
    tokenizer = load_tokenizer(folder)
    stream = text_tokens(tokenizer)
    fillers = {n: tokenizer.decode(stream[:n]) if n else "" for n in args.filler}
    proc, base = child.start(["--data-dir", str(args.data_dir)], {"OMP_NUM_THREADS": str(args.threads)})
    rows = []
    try:
        for n in args.filler:
            for mode in args.modes:
                t0 = time.monotonic()
                tokens, answers = trial(base, mode, fillers[n])
                right = [want in a.lower() for a, (_, want) in zip(answers, QUESTIONS, strict=True)]
                rows.append((n, mode, tokens, right, answers))
                print(f"filler {n}, {mode}: {sum(right)}/{len(right)} in {time.monotonic() - t0:.0f} s", flush=True)
    finally:
        child.stop(proc)
    dtype = str(resolve_dtype("auto", resolve_device("auto"))).removeprefix("torch.")  # what the server's auto picks
    lines = [f"Chat recall through fam-server, {time.strftime('%Y-%m-%d')}; command: `python -m training.chat_recall "
             f"{' '.join(sys.argv[1:])}`. Default model, bundled adapter, {dtype}, default settings; greedy answers of "
             "at most 24 tokens, not committed.", "", f"Note ingested first: \"{NOTE}\"", "",
             "| filler tokens | mode | session tokens | correct | " + " | ".join(q for q, _ in QUESTIONS) + " |",
             "|---:|---|---:|---:|" + "---|" * len(QUESTIONS)]
    for n, mode, tokens, right, answers in rows:
        cells = " | ".join(("**yes** " if ok else "no ") + f"`{a[:60]}`" for ok, a in zip(right, answers,
                                                                                         strict=True))
        lines.append(f"| {n} | {mode} | {tokens} | {sum(right)}/{len(right)} | {cells} |")
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
