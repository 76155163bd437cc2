"""`fam-server` as a child process on a free loopback port: for the benchmarks and evaluations that measure the
real server (scripts/bench_server.py, scripts/bench_store.py, training.chat_recall)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(flags: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """Run `fam-server --host 127.0.0.1 --port <free> *flags` and wait until `/health` answers 200 ->
    (process, base URL). `env` is added to this process's environment (less FAM_API_KEYS: no authentication),
    with FAM_LOG_LEVEL=warning unless it says otherwise."""
    port = free_port()
    full_env = {**os.environ, "FAM_LOG_LEVEL": "warning", **(env or {})}
    if "FAM_API_KEYS" not in (env or {}):
        full_env.pop("FAM_API_KEYS", None)
    proc = subprocess.Popen([sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), *flags],
                            env=full_env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fam-server exited during startup (status {proc.returncode})")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"fam-server did not become ready within {timeout:g} s")


def stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
