"""Crash safety: a server stopped without a graceful shutdown (or killed with SIGKILL) comes back with every
session as of its last completed operation, and the same next-token outputs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ASK = {"messages": [{"role": "user", "content": "What did the keeper write?"}], "max_tokens": 6, "temperature": 0}


def answer(client_or_base, sid: str) -> dict:
    body = {**ASK, "session_id": sid}
    if isinstance(client_or_base, str):
        r = httpx.post(f"{client_or_base}/v1/chat/completions", json=body, timeout=60)
    else:
        r = client_or_base.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_second_app_over_the_same_data_dir(make_client):
    first = make_client()  # never shut down: it is abandoned as a crashed process would be
    a = first.post("/v1/sessions", json={"metadata": {"n": 1}}).json()["id"]
    b = first.post("/v1/sessions", json={"mode": "bswa"}).json()["id"]
    first.post(f"/v1/sessions/{a}/ingest", json={"text": "The keeper wrote about storms. " * 5},
               headers={"Idempotency-Key": "k"})
    first.post(f"/v1/sessions/{b}/ingest", json={"text": "Ships and harbours. " * 7})
    first.post("/v1/chat/completions", json={**ASK, "session_id": b, "commit": True})
    before = {s["id"]: s for s in first.get("/v1/sessions").json()["data"]}
    answers = {sid: answer(first, sid) for sid in (a, b)}

    first.app.state.data_dir_lock.release()  # what the kernel does for a process that died
    second = make_client()
    after = {s["id"]: s for s in second.get("/v1/sessions").json()["data"]}
    assert after == before  # tokens, state bytes, mode, metadata, created
    assert {sid: answer(second, sid) for sid in (a, b)} == answers
    # idempotency keys survive too: the retried upload is not ingested again
    again = second.post(f"/v1/sessions/{a}/ingest", json={"text": "The keeper wrote about storms. " * 5},
                        headers={"Idempotency-Key": "k"})
    assert again.headers.get("idempotent-replayed") == "true" and again.json()["tokens"] == before[a]["tokens"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, data_dir: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server", "--model", str(model_dir), "--port", str(port), "--host", "127.0.0.1",
           "--data-dir", str(data_dir), "--block-size", "16", "--memory-blocks", "1", "--fam-len", "4",
           "--dtype", "float32", "--device", "cpu"]
    env = {**os.environ, "FAM_SECRET": "restart-test", "FAM_LOG_LEVEL": "warning"}
    env.pop("FAM_API_KEYS", None)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "server exited"
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("fam-server did not become ready")


def test_sigkill_and_restart(tmp_path, tiny_chat_dir):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(tiny_chat_dir, tmp_path / "data", port)
    try:
        wait_ready(base, proc)
        sid = httpx.post(f"{base}/v1/sessions").json()["id"]
        ingested = httpx.post(f"{base}/v1/sessions/{sid}/ingest", json={"text": "The keeper wrote. " * 20},
                              timeout=60).json()
        before = answer(base, sid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc = start_server(tiny_chat_dir, tmp_path / "data", port)
    try:
        wait_ready(base, proc)
        assert httpx.get(f"{base}/v1/sessions/{sid}").json()["tokens"] == ingested["tokens"]
        assert answer(base, sid) == before
    finally:
        proc.terminate()
        proc.wait(timeout=30)
