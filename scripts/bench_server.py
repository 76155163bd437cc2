"""Benchmark fam-server on loopback: N sessions ingesting at once while another client streams answers.

For each N (default 1, 4, 16) a fresh `fam-server` process is started (so its memory is measured alone), then:
  - the answering client measures time to first token (TTFT) of short streamed chats with no other load;
  - N clients ingest a document of --ingest-tokens tokens each, concurrently, into their own sessions, while
    the answering client keeps streaming chats and records their TTFT;
  - aggregate ingest tokens/s = N x tokens / wall time of the ingest phase;
  - RSS growth per session (server process, from /proc, after a warm-up ingest) against `state_bytes`.

With --streams N (e.g. 8) it measures instead, on one server, the aggregate decode rate of streaming chats:
one stream alone, then N concurrent streams on N sessions (each holding a short document), each asking for
--stream-tokens tokens (ignore_eos); aggregate tok/s = completion tokens of all streams / wall time from the
first request sent to the last stream ended. The engine decodes concurrent streams in one batched pass per token.

Prints a markdown table. Short runs:
    python scripts/bench_server.py --sessions 1,4 --ingest-tokens 1024
    python scripts/bench_server.py --streams 8 --stream-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx

from server import child

QUESTION = [{"role": "user", "content": "Name three colours."}]
WORDS = ("river stone market window evening garden letter winter harbour candle mountain teacher story "
         "village morning silver bridge orchard lantern meadow").split()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def document(base: str, n_tokens: int, seed: int) -> str:
    """Text of about n_tokens tokens (checked with the server's tokenizer and trimmed)."""
    words = [WORDS[(seed * 7 + i * i) % len(WORDS)] for i in range(n_tokens)]
    text = " ".join(words) + "."
    count = httpx.post(f"{base}/tokenize", json={"text": text}, timeout=60).json()["count"]
    return " ".join(words[: max(1, len(words) * n_tokens // count)]) + "."


def start_server(args: argparse.Namespace, data_dir: str) -> tuple[subprocess.Popen, str]:
    flags = ["--data-dir", data_dir, "--dtype", args.dtype, "--device", args.device]
    if args.model:
        flags += ["--model", args.model]
    if args.mode:
        flags += ["--mode", args.mode]
    env = {"FAM_MAX_QUEUE": "256", **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    return child.start(flags, env)


def ttft(base: str, max_tokens: int) -> float:
    """Seconds from sending a streamed chat to its first content chunk."""
    body = {"messages": QUESTION, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as r:
        lines = r.iter_lines()
        for line in lines:
            if '"content"' in line and '"content": ""' not in line:
                first = time.perf_counter() - start
                for _ in lines:  # read the rest so the server finishes normally
                    pass
                return first
    raise RuntimeError("the stream produced no content")


def run_round(args: argparse.Namespace, n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="fam-bench-") as data_dir:
        proc, base = start_server(args, data_dir)
        try:
            idle = [ttft(base, args.answer_tokens) for _ in range(3)]
            warm = httpx.post(f"{base}/v1/sessions").json()["id"]  # first ingest: allocator pools, workspaces
            httpx.post(f"{base}/v1/sessions/{warm}/ingest", json={"text": document(base, 512, 99)}, timeout=600)
            httpx.delete(f"{base}/v1/sessions/{warm}")
            rss_before = rss_bytes(proc.pid)
            sids = [httpx.post(f"{base}/v1/sessions").json()["id"] for _ in range(n)]
            docs = [document(base, args.ingest_tokens, i) for i in range(n)]
            results: list[dict] = []
            loaded: list[float] = []
            done = threading.Event()

            def ingest(sid: str, text: str) -> None:
                r = httpx.post(f"{base}/v1/sessions/{sid}/ingest", json={"text": text}, timeout=3600)
                r.raise_for_status()
                results.append(r.json())

            def answer() -> None:
                while not done.is_set():
                    loaded.append(ttft(base, args.answer_tokens))

            threads = [threading.Thread(target=ingest, args=(s, d)) for s, d in zip(sids, docs, strict=True)]
            asker = threading.Thread(target=answer)
            start = time.perf_counter()
            for t in threads:
                t.start()
            asker.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            done.set()
            asker.join()
            rss_after = rss_bytes(proc.pid)
            tokens = sum(r["tokens"] for r in results)
            p95 = statistics.quantiles(loaded, n=20, method="inclusive")[-1] if len(loaded) > 1 else loaded[0]
            return {"sessions": n, "ingest_tok_s": tokens / wall, "wall_s": wall, "ttft_idle": statistics.median(idle),
                    "ttft_p50": statistics.median(loaded), "ttft_max": max(loaded), "answers": len(loaded),
                    "ttft_p95": p95,
                    "state_bytes": statistics.mean(r["state_bytes"] for r in results),
                    "rss_per_session": (rss_after - rss_before) / n}
        finally:
            child.stop(proc)


def stream_chat(base: str, sid: str, max_tokens: int) -> tuple[float, float, int]:
    """A streamed chat on a session -> (seconds to first content, seconds to the end, completion tokens)."""
    body = {"messages": QUESTION, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "session_id": sid, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=3600) as r:
        for line in r.iter_lines():
            if first is None and '"content"' in line and '"content": ""' not in line:
                first = time.perf_counter() - start
            if '"usage": {' in line:
                tokens = json.loads(line.removeprefix("data:").strip())["usage"]["completion_tokens"]
    assert first is not None and tokens, "the stream produced no content"
    return first, time.perf_counter() - start, tokens


def run_streams(args: argparse.Namespace) -> None:
    n = args.streams
    with tempfile.TemporaryDirectory(prefix="fam-bench-") as data_dir:
        proc, base = start_server(args, data_dir)
        try:
            sids = [httpx.post(f"{base}/v1/sessions").json()["id"] for _ in range(n)]
            for i, sid in enumerate(sids):  # documents of different lengths: blocks at different fills
                text = document(base, args.stream_doc_tokens + 37 * i, i)
                httpx.post(f"{base}/v1/sessions/{sid}/ingest", json={"text": text}, timeout=3600).raise_for_status()
            stream_chat(base, sids[0], 4)  # warm-up
            rows = []
            for k in (1, n):
                results: list[tuple[float, float, int]] = []

                def one(sid: str, out: list[tuple[float, float, int]] = results) -> None:
                    out.append(stream_chat(base, sid, args.stream_tokens))

                threads = [threading.Thread(target=one, args=(sid,)) for sid in sids[:k]]
                start = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - start
                tokens = sum(r[2] for r in results)
                rows.append((k, tokens / wall, statistics.median(r[0] for r in results), wall, tokens))
        finally:
            child.stop(proc)
    print(f"\nstreaming chats of {args.stream_tokens} tokens on sessions holding ~{args.stream_doc_tokens} tokens, "
          f"dtype {args.dtype}, {args.threads or os.cpu_count()} threads\n")
    print("| concurrent streams | aggregate tok/s | vs 1 stream | TTFT p50 s | wall s | tokens |")
    print("|---:|---:|---:|---:|---:|---:|")
    for k, rate, first, wall, tokens in rows:
        print(f"| {k} | {rate:.1f} | {rate / rows[0][1]:.2f}x | {first:.2f} | {wall:.1f} | {tokens} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", default="1,4,16", help="comma-separated session counts")
    p.add_argument("--ingest-tokens", type=int, default=4096, help="tokens each session ingests")
    p.add_argument("--answer-tokens", type=int, default=8, help="max_tokens of the answering client's chats")
    p.add_argument("--model", help="model for fam-server (default: the server's default model)")
    p.add_argument("--mode", help="session mode (default: the server's)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the server (default: torch's)")
    p.add_argument("--streams", type=int, default=0, help="measure N concurrent streaming chats vs one instead")
    p.add_argument("--stream-tokens", type=int, default=32, help="completion tokens per streamed chat")
    p.add_argument("--stream-doc-tokens", type=int, default=300, help="document tokens per streaming session")
    args = p.parse_args()
    if args.streams:
        run_streams(args)
        return
    rows = [run_round(args, int(n)) for n in args.sessions.split(",")]
    print(f"\n{args.ingest_tokens} tokens per session, answers of {args.answer_tokens} tokens, dtype {args.dtype}, "
          f"{os.cpu_count()} CPUs\n")
    print("| sessions ingesting | aggregate ingest tok/s | ingest wall s | TTFT idle s | TTFT under load p50 s "
          "| TTFT p95 s | TTFT max s | answers | state_bytes / session | RSS growth / session |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['sessions']} | {r['ingest_tok_s']:.0f} | {r['wall_s']:.1f} | {r['ttft_idle']:.2f} "
              f"| {r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} | {r['ttft_max']:.2f} | {r['answers']} "
              f"| {r['state_bytes'] / 2**20:.1f} MiB "
              f"| {r['rss_per_session'] / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()
