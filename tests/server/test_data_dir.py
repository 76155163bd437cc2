"""The server's own files in the data directory: the lock (two servers never share a data directory: the second
one refuses to start and names the holder) and the generated snapshot secret."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.data_dir import LOCK_NAME, DataDirLock, DataDirLocked, snapshot_secret
from server.settings import Settings

HOLD = """
import sys, time
from pathlib import Path
from server.data_dir import DataDirLock
lock = DataDirLock.acquire(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


def test_lock_names_its_holder_and_is_free_again_after_release(tmp_path):
    lock = DataDirLock.acquire(tmp_path / "data")
    record = json.loads((tmp_path / "data" / LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["started"]
    with pytest.raises(DataDirLocked) as caught:
        DataDirLock.acquire(tmp_path / "data")  # a second lock in the same process is refused too
    assert caught.value.holder == record
    message = str(caught.value)
    assert f"pid {os.getpid()}" in message and socket.gethostname() in message and str(tmp_path / "data") in message
    lock.release()
    assert not lock.held
    DataDirLock.acquire(tmp_path / "data").release()


def test_a_second_app_on_the_same_data_dir_does_not_start(make_client, tmp_path):
    first = make_client()
    with pytest.raises(DataDirLocked, match="in use by another fam-server"):
        TestClient(create_app(Settings(data_dir=tmp_path / "data", secret="test-secret"),
                              first.app.state.engine.rt)).__enter__()
    assert first.get("/v1/sessions").status_code == 200  # the first one is unaffected
    make_client(data_dir=tmp_path / "elsewhere")  # another directory is fine


def test_an_app_gives_the_lock_back_when_it_stops(tmp_path, tiny_runtime):
    settings = Settings(data_dir=tmp_path / "d2", secret="s")
    with TestClient(create_app(settings, tiny_runtime)):
        pass
    with TestClient(create_app(settings, tiny_runtime)) as again:
        assert again.get("/health").status_code == 200


def test_fam_server_refuses_a_data_dir_another_process_holds(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "data")], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        # the port is never opened: the lock is taken before listening (and before the model loads)
        port = _free_port()
        second = subprocess.run([sys.executable, "-m", "server", "--data-dir", str(tmp_path / "data"),
                                 "--port", str(port), "--model", str(tmp_path / "no-model-needed")],
                                env={**env, "FAM_LOG_LEVEL": "warning"}, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 1, second.stderr
        assert f"in use by another fam-server (pid {holder.pid} on host {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    # SIGKILL leaves no stale lock: the kernel dropped it with the process
    DataDirLock.acquire(tmp_path / "data").release()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_generated_secret_is_kept(tmp_path):
    first = snapshot_secret(tmp_path, None)
    assert len(first) == 64 and (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
    assert snapshot_secret(tmp_path, None) == first  # the same after a restart
    assert snapshot_secret(tmp_path, "given") == b"given"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]  # no temporary file left behind
