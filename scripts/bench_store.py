"""Benchmark the session store at the default model's state size: what it costs a server to load a session it has
never seen, and to commit one, from Redis and from the local data dir, side by side in one run.

A private `redis-server` is started on loopback (AOF on, `appendfsync everysec`, noeviction: as
docker/compose.cluster.yaml runs it). For each mode a session's state is made by ingesting enough tokens to fill
its window (its size no longer grows after that), then, --repeats times each:
  - load: a new store over the open backend (a server that has never seen the session: nothing of it cached in
    the process, its connection to Redis open) looks the session up and loads its state: read, HMAC check,
    decode. The local file is read twice over: from the OS page cache (a file this server wrote recently) and from
    disk (the file's pages dropped from the cache first with posix_fadvise DONTNEED, as after a restart);
  - transfer: the snapshot's bytes alone (Redis GET; the local file's read);
  - commit: take the lease, sign and write a new snapshot, move the head (local: temp file, fsync, rename).

With --replicas it also measures ingest throughput through real `fam-server` processes sharing that Redis: two
clients ingest --ingest-tokens tokens each into their own sessions at once, first into one server (torch threads =
all CPUs), then one client per server into two servers (threads split between them), and prints the aggregate
tokens/s of each.

    python scripts/bench_store.py --repeats 20
    python scripts/bench_store.py --replicas --ingest-tokens 2048 --out docs/bench_store.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import FamRuntime  # noqa: E402
from server import child  # noqa: E402
from server.child import free_port  # noqa: E402
from server.engine.redis_store import RedisBackend  # noqa: E402
from server.engine.store import LocalBackend, Session, SessionStore, new_session_id  # noqa: E402

SECRET = b"bench-store"
WORDS = ("river stone market window evening garden letter winter harbour candle mountain teacher story "
         "village morning silver bridge orchard lantern meadow").split()


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                             "127.0.0.1", "--dir", str(workdir), "--save", "", "--appendonly", "yes",
                             "--appendfsync", "everysec", "--maxmemory-policy", "noeviction"],
                            stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            redis.Redis.from_url(url).ping()
            return proc, url
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def full_state(rt: FamRuntime, mode: str):
    cfg = rt.fam_config
    n = cfg.block_size * (cfg.memory_blocks + 1) + 64  # a full window: the state is as large as it gets
    ids = (rt.encode(" ".join(WORDS)) * (n // 20 + 1))[:n]
    with torch.inference_mode():
        return rt.ingest(rt.new_state(mode=mode), ids)[0]


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure_store(rt: FamRuntime, state, backend, raw_read) -> dict[str, float]:
    store = SessionStore(rt, backend, SECRET, 2**34)
    s = Session(id=new_session_id(), owner="", mode=state.cfg.mode, created=int(time.time()), metadata={})
    s.set_state(state)
    store.add(s)
    blob_bytes = len(raw_read(store, s.id))

    def load() -> None:
        fresh = SessionStore(rt, backend, SECRET, 2**34)
        fresh.load(fresh.get(s.id, ""))

    cold = {}
    if isinstance(backend, LocalBackend):
        path = backend.dir / f"{s.id}.snap"

        def load_cold() -> None:
            drop_from_page_cache(path)
            load()

        cold = {"load_disk_ms": median_ms(load_cold, args.repeats)}

    def commit() -> None:
        assert store.acquire(s)
        s.set_state(state)
        store.persist(s)
        store.release(s)

    out = {"load_ms": median_ms(load, args.repeats), "transfer_ms": median_ms(lambda: raw_read(store, s.id),
                                                                              args.repeats),
           "commit_ms": median_ms(commit, args.repeats), "snapshot_bytes": blob_bytes, **cold}
    store.close()
    return out


def redis_read(store: SessionStore, sid: str) -> bytes:
    client = store.backend.client
    return client.get(client.hget(f"fam:{{{sid}}}:head", "blob"))


def local_read(store: SessionStore, sid: str) -> bytes:
    return (store.backend.dir / f"{sid}.snap").read_bytes()


def bench_load(url: str, workdir: Path) -> list[tuple[str, int, dict, dict]]:
    rt = FamRuntime.load(dtype=args.dtype, device="cpu")
    rows = []
    for mode in args.modes.split(","):
        state = full_state(rt, mode)
        local = measure_store(rt, state, LocalBackend(workdir / "sessions"), local_read)
        shared = measure_store(rt, state, RedisBackend(url, 10.0), redis_read)
        rows.append((mode, state.nbytes, local, shared))
    return rows


# ------------------------------------------------------------------------------------------------- replicas


def start_server(url: str, threads: int) -> tuple[subprocess.Popen, str]:
    return child.start(["--store", url, "--dtype", args.dtype],
                       {"FAM_SECRET": SECRET.decode(), "OMP_NUM_THREADS": str(threads)})


def document(n_tokens: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * i) % len(WORDS)] for i in range(n_tokens)) + "."


def ingest_all(bases: list[str]) -> tuple[float, int]:
    """Two clients, client i on bases[i % len(bases)], each ingesting into its own new session."""
    targets = [bases[i % len(bases)] for i in range(2)]
    sids = [httpx.post(f"{b}/v1/sessions").json()["id"] for b in targets]
    tokens: list[int] = []

    def one(base: str, sid: str, seed: int) -> None:
        r = httpx.post(f"{base}/v1/sessions/{sid}/ingest", json={"text": document(args.ingest_tokens, seed)},
                       timeout=3600)
        r.raise_for_status()
        tokens.append(r.json()["tokens"])

    threads = [threading.Thread(target=one, args=(b, s, i)) for i, (b, s) in enumerate(zip(targets, sids,
                                                                                           strict=True))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return sum(tokens) / wall, sum(tokens)


def bench_replicas(url: str) -> list[tuple[str, float, int]]:
    cpus = os.cpu_count() or 1
    rows = []
    for n in (1, 2):
        servers = [start_server(url, max(1, cpus // n)) for _ in range(n)]
        try:
            ingest_all([b for _, b in servers])  # warm-up: allocator pools, workspaces
            rate, total = ingest_all([b for _, b in servers])
        finally:
            for proc, _ in servers:
                child.stop(proc)
        rows.append((f"{n} server{'s' if n > 1 else ''}, {max(1, cpus // n)} thread(s) each", rate, total))
    return rows


def main() -> None:
    load_at_start = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="fam-bench-store-"))
    proc, url = start_redis(workdir)
    try:
        load_rows = bench_load(url, workdir)
        replica_rows = bench_replicas(url) if args.replicas else []
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)
    lines = report(load_rows, replica_rows, load_at_start)
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


def report(load_rows, replica_rows, load: float) -> list[str]:
    out = []
    add = out.append
    add(f"Benchmark of {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPUs, load average at start {load:.1f}; dtype "
          f"{args.dtype}; command: `python scripts/bench_store.py {' '.join(sys.argv[1:])}`; median of "
          f"{args.repeats}.")
    add("")
    add("| mode | snapshot | load, local disk | load, local page cache | load, Redis | Redis / disk "
          "| Redis / page cache | transfer, Redis | commit, local | commit, Redis |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, _, lo, re in load_rows:
        add(f"| {mode} | {lo['snapshot_bytes'] / 2**20:.1f} MiB | {lo['load_disk_ms']:.1f} ms "
              f"| {lo['load_ms']:.1f} ms | {re['load_ms']:.1f} ms | {re['load_ms'] / lo['load_disk_ms']:.2f}x "
              f"| {re['load_ms'] / lo['load_ms']:.2f}x | {re['transfer_ms']:.1f} ms | {lo['commit_ms']:.1f} ms "
              f"| {re['commit_ms']:.1f} ms |")
    if replica_rows:
        add("")
        add(f"Ingest through fam-server over one Redis: 2 clients x {args.ingest_tokens} tokens, each into its "
              "own session")
        add("")
        add("| servers | aggregate ingest tok/s | vs 1 server | tokens |")
        add("|---|---:|---:|---:|")
        for name, rate, total in replica_rows:
            add(f"| {name} | {rate:.0f} | {rate / replica_rows[0][1]:.2f}x | {total} |")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--modes", default="sink,fam", help="comma-separated session modes")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--replicas", action="store_true", help="also measure ingest through 1 vs 2 servers")
    p.add_argument("--ingest-tokens", type=int, default=2048, help="tokens per client in --replicas")
    p.add_argument("--out", type=Path, help="also write the report (markdown) there")
    args = p.parse_args()
    main()
