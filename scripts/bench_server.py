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

With --targets it measures the engine issue's four rate targets in one run, on one server, beside the in-process
references (`scripts/bench_model.py` workers: the runtime's own ingest at the same lengths, Hugging Face's
prefill at 2k), and writes the table to --out:
  - ingest through the server (text over HTTP, one session each) at --target-lengths against the runtime alone;
  - single-stream decode after an 8k-token document (decode rate = tokens after the first / time after the first);
  - --streams concurrent streaming chats on as many sessions against one alone (aggregate, prefill included);
  - time to first token of a short chat while another session ingests --load-tokens tokens, against idle, and
    that ingest's rate against the unloaded one at the longest target length.

With --tradeoff S1,S2,... it measures the trade the engine's `FAM_BULK_SECONDS_BUSY` sets (the seconds of ingest
per step while chats generate, which the engine turns into a slice of tokens from the passes it measures): per
value a fresh server, idle TTFT, one unloaded ingest of --load-tokens tokens, then
another such ingest while one client chats back to back (each chat --answer-tokens long), its TTFT p50 / p95
against idle and the ingest's rate against the unloaded one. A closed-loop chat client keeps the engine busy with
chats the whole time, so each value gives one point of the curve between the two targets.

Prints a markdown table. Short runs:
    python scripts/bench_server.py --sessions 1,4 --ingest-tokens 1024
    python scripts/bench_server.py --streams 8 --stream-tokens 32
    python scripts/bench_server.py --targets --threads 2 --out docs/bench_targets.md
    python scripts/bench_server.py --tradeoff 0.1,0.2,0.4 --threads 2 --load-tokens 32768 --out docs/bench_tradeoff.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from bench_model import run as in_process  # scripts/: one bench_model measurement in its own process
from prometheus_client.parser import text_string_to_metric_families

from model import loader
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


def start_server(args: argparse.Namespace, data_dir: str, env: dict[str, str] | None = None
                 ) -> tuple[subprocess.Popen, str]:
    flags = ["--data-dir", data_dir, "--dtype", args.dtype, "--decode-dtype", args.decode_dtype, "--device",
             args.device]
    if args.model:
        flags += ["--model", args.model]
    if args.mode:
        flags += ["--mode", args.mode]
    env = {"FAM_MAX_QUEUE": "256", **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}), **(env or {})}
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
            return {"sessions": n, "ingest_tok_s": tokens / wall, "wall_s": wall, "ttft_idle": statistics.median(idle),
                    "ttft_p50": statistics.median(loaded), "ttft_max": max(loaded), "answers": len(loaded),
                    "ttft_p95": p95(loaded),
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


def stream_sessions(base: str, n: int, doc_tokens: int) -> list[str]:
    """n sessions holding documents of different lengths (doc_tokens + 37 i tokens): blocks at different fills."""
    sids = [httpx.post(f"{base}/v1/sessions").json()["id"] for _ in range(n)]
    for i, sid in enumerate(sids):
        timed_ingest(base, sid, document(base, doc_tokens + 37 * i, i))
    return sids


def concurrent_chats(base: str, sids: list[str], max_tokens: int) -> tuple[list[tuple[float, float, int]], float]:
    """One streamed chat on each session, all at once -> (each chat's `stream_chat` result, wall seconds)."""
    results: list[tuple[float, float, int]] = []
    threads = [threading.Thread(target=lambda sid=sid: results.append(stream_chat(base, sid, max_tokens)))
               for sid in sids]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def run_streams(args: argparse.Namespace) -> None:
    n = args.streams
    with tempfile.TemporaryDirectory(prefix="fam-bench-") as data_dir:
        proc, base = start_server(args, data_dir)
        try:
            sids = stream_sessions(base, n, args.stream_doc_tokens)
            stream_chat(base, sids[0], 4)  # warm-up
            rows = []
            for k in (1, n):
                results, wall = concurrent_chats(base, sids[:k], args.stream_tokens)
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


def memory_bandwidth(threads: int) -> float:
    """Bytes/s this machine reads: the sum of a 1 GiB float32 tensor, best of 5."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(2**28)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def timed_ingest(base: str, sid: str, text: str) -> tuple[int, float]:
    start = time.perf_counter()
    r = httpx.post(f"{base}/v1/sessions/{sid}/ingest", json={"text": text}, timeout=7200)
    r.raise_for_status()
    return r.json()["tokens"], time.perf_counter() - start


def run_targets(args: argparse.Namespace) -> None:
    threads = args.threads or os.cpu_count() or 1
    lengths = [int(n) for n in args.target_lengths.split(",")]
    n8k = min(lengths, key=lambda n: abs(n - 8192))  # the decode measurement's document
    with tempfile.TemporaryDirectory(prefix="fam-bench-") as data_dir:
        proc, base = start_server(argparse.Namespace(**{**vars(args), "threads": threads}), data_dir)
        try:
            # the in-process references run in the mode the server's sessions get, while the server idles
            mode = httpx.get(f"{base}/v1/sessions/{new_session(base)}").json()["mode"]
            ref = {n: in_process(dict(kind=mode, dtype=args.dtype, n=n, decode=False, threads=threads))
                   for n in lengths}
            hf = in_process(dict(kind="hf", dtype=args.dtype, n=2048, decode=False, threads=threads))
            hf_rate = 2048 / hf["ingest_s"]
            bandwidth = memory_bandwidth(threads)
            # a decoded token reads every weight once (the lm_head included; alone, from the decode copy if the
            # server keeps one) and the whole state
            r8k = ref[n8k]
            weight_bytes = 4 if (args.dtype if args.row_dtype == "none" else args.row_dtype) == "float32" else 2
            token_bytes = weight_bytes * (r8k["nonemb_params"] + r8k["lm_head_params"]) + r8k["state_bytes"]
            warm = new_session(base)  # first ingest and chat: allocator pools, workspaces
            timed_ingest(base, warm, document(base, 600, 98))
            stream_chat(base, warm, 4)
            idle = [ttft(base, args.answer_tokens) for _ in range(5)]
            served = {}
            for n in lengths:
                sid = new_session(base)
                tokens, wall = timed_ingest(base, sid, document(base, n, n))
                served[n] = (tokens / wall, sid)
            first, total, tokens = stream_chat(base, served[n8k][1], args.stream_tokens)
            decode = (tokens - 1) / (total - first)
            sids = stream_sessions(base, args.streams, args.stream_doc_tokens)
            rates = []
            for k in (1, args.streams):
                results, wall = concurrent_chats(base, sids[:k], args.stream_tokens)
                rates.append(sum(r[2] for r in results) / wall)
            loaded, bulk_tokens, bulk_wall = loaded_ttfts(base, new_session(base), document(base, args.load_tokens, 7),
                                                          args.answer_tokens)
            slice_tokens = busy_slice(base)
        finally:
            child.stop(proc)
    loaded_p95 = p95(loaded)
    idle_p50, loaded_p50 = statistics.median(idle), statistics.median(loaded)
    bulk_rate = bulk_tokens / bulk_wall
    longest = max(lengths)
    lines = [f"Benchmark of {time.strftime('%Y-%m-%d')}, {threads} thread(s), {args.dtype} (--decode-dtype "
             f"{args.decode_dtype}: decode copy {args.row_dtype}), sessions in `{mode}` "
             f"mode (the server's default; the in-process runs alike), load average at start "
             f"{args.load_at_start:.1f}; command: `python scripts/bench_server.py {' '.join(sys.argv[1:])}`.", "",
             "| measurement | tok/s or s |", "|---|---:|"]
    for n in lengths:
        lines.append(f"| ingest {n} tokens: in-process runtime ({mode}) | {n / ref[n]['ingest_s']:.0f} |")
        lines.append(f"| ingest {n} tokens: through the server | {served[n][0]:.0f} |")
    lines += [f"| Hugging Face {args.dtype} prefill, 2048 tokens, in-process | {hf_rate:.0f} |",
              f"| single-stream decode after {n8k} tokens, through the server | {decode:.1f} |",
              f"| memory read rate, GB/s (sum of a 1 GiB tensor, {threads} thread(s)) | {bandwidth / 1e9:.1f} |",
              f"| decode roofline: that rate / {token_bytes / 1e6:.0f} MB read per token (weights + state), tok/s "
              f"| {bandwidth / token_bytes:.1f} |",
              f"| 1 streaming chat of {args.stream_tokens} tokens (aggregate) | {rates[0]:.1f} |",
              f"| {args.streams} concurrent streaming chats (aggregate) | {rates[1]:.1f} |",
              f"| TTFT idle, p50 s (5 chats) | {idle_p50:.3f} |",
              f"| TTFT while another session ingests {args.load_tokens} tokens: p50 / p95 s ({len(loaded)} chats) "
              f"| {loaded_p50:.3f} / {loaded_p95:.3f} |",
              f"| that ingest's rate under the chats | {bulk_rate:.0f} |",
              f"| its tokens per step while chats ran (sized to FAM_BULK_SECONDS_BUSY) | {slice_tokens} |", "",
              "| target | measured | met |", "|---|---|---|"]

    def row(name: str, value: float, goal: float, unit: str = "x") -> None:
        lines.append(f"| {name} | {value:.2f}{unit} | {'yes' if value >= goal else 'no'} |")

    row(f"{args.streams} streams >= 4x one stream", rates[1] / rates[0], 4.0)
    lines.append(f"| single-stream decode >= 28 tok/s (2 threads) | {decode:.1f} tok/s = "
                 f"{100 * decode * token_bytes / bandwidth:.0f}% of the roofline "
                 f"| {'yes' if decode >= 28 else 'no'} |")
    lines.append(f"| TTFT under ingest p50 <= 3x idle | {loaded_p50 / idle_p50:.2f}x "
                 f"| {'yes' if loaded_p50 <= 3 * idle_p50 else 'no'} |")
    lines.append(f"| TTFT under ingest p95 <= 5x idle | {loaded_p95 / idle_p50:.2f}x "
                 f"| {'yes' if loaded_p95 <= 5 * idle_p50 else 'no'} |")
    row(f"ingest under chats >= 0.8x unloaded ({longest} tokens)", bulk_rate / served[longest][0], 0.8)
    for n in lengths:
        row(f"server ingest at {n} >= 0.9x in-process", served[n][0] / (n / ref[n]["ingest_s"]), 0.9)
        row(f"server ingest at {n} >= 1.0x HF prefill at 2k", served[n][0] / hf_rate, 1.0)
    text_out = "\n".join(lines) + "\n"
    print(text_out)
    if args.out:
        Path(args.out).write_text(text_out)


def loaded_ttfts(base: str, sid: str, text: str, answer_tokens: int) -> tuple[list[float], int, float]:
    """TTFTs of back-to-back chats while `text` is ingested into session `sid`; the ingest's tokens and wall s."""
    loaded: list[float] = []
    bulk: dict = {}
    done = threading.Event()

    def ingest_bulk() -> None:
        bulk["tokens"], bulk["wall"] = timed_ingest(base, sid, text)
        done.set()

    worker = threading.Thread(target=ingest_bulk)
    worker.start()
    time.sleep(1.0)  # the ingest is running
    while not done.is_set():
        loaded.append(ttft(base, answer_tokens))
    worker.join()
    return loaded, bulk["tokens"], bulk["wall"]


def busy_slice(base: str) -> int:
    """The ingest tokens per step while chats run that the server came to (its /metrics)."""
    families = text_string_to_metric_families(httpx.get(f"{base}/metrics").text)
    gauge = next(f for f in families if f.name == "fam_ingest_busy_tokens")
    return int(gauge.samples[0].value)


def new_session(base: str) -> str:
    return httpx.post(f"{base}/v1/sessions").json()["id"]


def p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20, method="inclusive")[-1] if len(xs) > 1 else xs[0]


def run_tradeoff(args: argparse.Namespace) -> None:
    threads = args.threads or os.cpu_count() or 1
    rows = []
    for busy_seconds in args.tradeoff.split(","):
        with tempfile.TemporaryDirectory(prefix="fam-bench-") as data_dir:
            proc, base = start_server(argparse.Namespace(**{**vars(args), "threads": threads}), data_dir,
                                      {"FAM_BULK_SECONDS_BUSY": busy_seconds})
            try:
                warm = new_session(base)
                timed_ingest(base, warm, document(base, 600, 98))
                stream_chat(base, warm, 4)
                idle = [ttft(base, args.answer_tokens) for _ in range(5)]
                tokens, wall = timed_ingest(base, new_session(base), document(base, args.load_tokens, 7))
                loaded, l_tokens, l_wall = loaded_ttfts(base, new_session(base), document(base, args.load_tokens, 8),
                                                        args.answer_tokens)
                slice_tokens = busy_slice(base)
            finally:
                child.stop(proc)
        idle_p50 = statistics.median(idle)
        rows.append((busy_seconds, slice_tokens, idle_p50, statistics.median(loaded), p95(loaded), len(loaded),
                     tokens / wall, l_tokens / l_wall))
        print(rows[-1], flush=True)
    lines = [f"Benchmark of {time.strftime('%Y-%m-%d')}, {threads} thread(s), {args.dtype}, load average at start "
             f"{args.load_at_start:.1f}; command: `python scripts/bench_server.py {' '.join(sys.argv[1:])}`. Per "
             f"row a fresh server with that FAM_BULK_SECONDS_BUSY (slice: the ingest tokens per step it came to); "
             f"one client chats back to back ({args.answer_tokens}"
             f" tokens each) while another session ingests {args.load_tokens} tokens. Targets (engine issue): TTFT "
             "p50 <= 3x idle, p95 <= 5x idle, the ingest >= 0.8x its unloaded rate.", "",
             "| FAM_BULK_SECONDS_BUSY | slice | TTFT idle p50 s | TTFT under ingest p50 s (x idle) | p95 s (x idle) "
             "| chats | ingest unloaded tok/s | ingest under chats tok/s (x unloaded) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for sec, sl, idle_p50, lp50, lp95, n, un, under in rows:
        lines.append(f"| {sec} | {sl} | {idle_p50:.3f} | {lp50:.3f} ({lp50 / idle_p50:.2f}x) | {lp95:.3f} "
                     f"({lp95 / idle_p50:.2f}x) | {n} | {un:.0f} | {under:.0f} ({under / un:.2f}x) |")
    text_out = "\n".join(lines) + "\n"
    print(text_out)
    if args.out:
        Path(args.out).write_text(text_out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", default="1,4,16", help="comma-separated session counts")
    p.add_argument("--ingest-tokens", type=int, default=4096, help="tokens each session ingests")
    p.add_argument("--answer-tokens", type=int, default=8, help="max_tokens of the answering client's chats")
    p.add_argument("--model", help="model for fam-server (default: the server's default model)")
    p.add_argument("--mode", help="session mode (default: the server's)")
    p.add_argument("--dtype", default="auto", help="as fam-server's --dtype (auto: float32 on CPUs without AMX)")
    p.add_argument("--decode-dtype", default="auto", help="as fam-server's --decode-dtype (auto: a bfloat16 copy "
                   "of the weights for a session decoding alone when the model runs float32 on a CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the server (default: torch's)")
    p.add_argument("--streams", type=int, default=0, help="measure N concurrent streaming chats vs one instead")
    p.add_argument("--stream-tokens", type=int, default=32, help="completion tokens per streamed chat")
    p.add_argument("--stream-doc-tokens", type=int, default=300, help="document tokens per streaming session")
    p.add_argument("--targets", action="store_true", help="the engine issue's rate targets in one run (see above)")
    p.add_argument("--target-lengths", default="8192,65536", help="with --targets: ingest lengths")
    p.add_argument("--load-tokens", type=int, default=131072, help="with --targets: the ingest under the chats")
    p.add_argument("--tradeoff", help="comma-separated FAM_BULK_SECONDS_BUSY values: the TTFT / ingest trade")
    p.add_argument("--out", help="with --targets or --tradeoff: also write the table here")
    args = p.parse_args()
    args.load_at_start = os.getloadavg()[0]
    if args.dtype == "auto":  # the name the server will pick, so the in-process references run the same dtype
        args.dtype = str(loader.resolve_dtype("auto", loader.resolve_device(args.device))).removeprefix("torch.")
    decode = loader.resolve_decode_dtype(args.decode_dtype, loader.resolve_dtype(args.dtype),
                                         loader.resolve_device(args.device))
    # the server gets the flag as given ("auto" also turns on the one-row mv path where it pays); the copy's dtype
    # names the bytes a decoded token reads
    args.row_dtype = "none" if decode is None else str(decode).removeprefix("torch.")
    if args.tradeoff:
        run_tradeoff(args)
        return
    if args.targets:
        args.streams = args.streams or 8
        run_targets(args)
        return
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
