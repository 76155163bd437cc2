"""Real `fam-server` processes sharing one real Redis (started by the tests on loopback):

- failover: replica A is killed (SIGKILL) in the middle of a long ingest; the client's retry with the same
  Idempotency-Key goes to replica B, which waits out A's lease, resumes from A's last commit, and ends with the
  session an uninterrupted ingest gives;
- a whole client journey through nginx running the shipped docker/nginx.conf in front of two replicas, and every
  session answered the same by either replica directly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from clients.client import Client
from clients.errors import NotFoundError
from tests.server.test_restart import free_port, wait_ready

TEXT = "The keeper wrote about storms, ships and the harbour lights. " * 1500  # ~18k tokens
KEY = {"Idempotency-Key": "upload-1"}


def start_replica(model_dir: Path, redis_url: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server", "--model", str(model_dir), "--port", str(port), "--host", "127.0.0.1",
           "--store", redis_url, "--block-size", "16", "--memory-blocks", "1", "--fam-len", "4",
           "--dtype", "float32", "--device", "cpu", "--mode", "sink"]
    env = {**os.environ, "FAM_SECRET": "cluster-test", "FAM_LOG_LEVEL": "warning", "FAM_LEASE_SECONDS": "1",
           "FAM_CHECKPOINT_SECONDS": "0.05"}
    env.pop("FAM_API_KEYS", None)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture
def two_replicas(tiny_chat_dir, redis_url):
    procs, bases = [], []
    for _ in range(2):
        port = free_port()
        procs.append(start_replica(tiny_chat_dir, redis_url, port))
        bases.append(f"http://127.0.0.1:{port}")
    try:
        for base, proc in zip(bases, procs, strict=True):
            wait_ready(base, proc)
        yield procs, bases
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def sse_events(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: "):])


def next_token(base: str, sid: str) -> dict[str, float]:
    r = httpx.post(f"{base}/v1/completions", json={"prompt": " and", "session_id": sid, "max_tokens": 1,
                                                   "temperature": 0, "logprobs": 5}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["top_logprobs"][0]


def test_sigkill_mid_ingest_then_the_retry_resumes_on_the_other_replica(two_replicas):
    (proc_a, _), (a, b) = two_replicas
    sid = httpx.post(f"{a}/v1/sessions").json()["id"]
    with httpx.stream("POST", f"{a}/v1/sessions/{sid}/ingest?stream=true", json={"text": TEXT}, headers=KEY,
                      timeout=120) as r:
        assert r.status_code == 200
        for event in sse_events(r):
            total = event["tokens_total"]
            if event["tokens_done"] >= total // 4:
                proc_a.send_signal(signal.SIGKILL)
                break
    proc_a.wait(timeout=10)
    committed = httpx.get(f"{b}/v1/sessions/{sid}").json()["tokens"]
    assert 0 < committed < total  # A's last commit, in Redis

    with httpx.stream("POST", f"{b}/v1/sessions/{sid}/ingest?stream=true", json={"text": TEXT}, headers=KEY,
                      timeout=120) as r:
        assert r.status_code == 200
        events = list(sse_events(r))
    progress, final = events[:-1], events[-1]
    assert "error" not in final and final["id"] == sid
    opening = final["tokens"] - total  # the tokens that open the user turn (and the default system prompt)
    # B resumed at A's last commit: its first block ends within one block (16 tokens) of it
    assert committed - opening < progress[0]["tokens_done"] <= committed - opening + 16

    fresh = httpx.post(f"{b}/v1/sessions").json()["id"]
    whole = httpx.post(f"{b}/v1/sessions/{fresh}/ingest", json={"text": TEXT}, timeout=120).json()
    assert final["tokens"] == whole["tokens"]  # nothing ingested twice, nothing skipped
    got, want = next_token(b, sid), next_token(b, fresh)
    assert got.keys() == want.keys()
    assert all(abs(got[t] - want[t]) < 1e-4 for t in want)
    # the retry's result is stored with the session: a third attempt replays it
    again = httpx.post(f"{b}/v1/sessions/{sid}/ingest", json={"text": TEXT}, headers=KEY, timeout=120)
    assert again.headers.get("idempotent-replayed") == "true" and again.json()["tokens"] == final["tokens"]


def test_a_client_journey_through_nginx(two_replicas, nginx_proxy):
    _, bases = two_replicas
    proxy = nginx_proxy(bases)
    ask = [{"role": "user", "content": "What did the keeper write about?"}]
    with Client(proxy.base_url) as client:
        s = client.create_session(metadata={"book": "lighthouse"})
        seen = []
        s = client.ingest_text(s.id, TEXT[:4000], progress=seen.append)
        assert seen and seen[-1].tokens_done == seen[-1].tokens_total
        answer = client.chat(ask, session_id=s.id, max_tokens=8, temperature=0)
        streamed = "".join(client.chat(ask, session_id=s.id, max_tokens=8, temperature=0, stream=True))
        assert streamed == answer.text
        turn = client.chat(ask, session_id=s.id, max_tokens=4, temperature=0, commit=True)
        after_turn = client.get_session(s.id)
        assert after_turn.tokens > s.tokens
        fork = client.fork_session(s.id)
        imported = client.import_state(client.export_state(s.id))
        assert {x.id for x in client.list_sessions()} == {s.id, fork.id, imported.id}
        # any replica serves any session: each answers every session the same, and as the proxy did
        for base in bases:
            with Client(base) as direct:
                for sid in (s.id, fork.id, imported.id):
                    assert direct.get_session(sid).tokens == after_turn.tokens
                    same = direct.complete(" and", session_id=sid, max_tokens=4, temperature=0)
                    assert same.text == client.complete(" and", session_id=s.id, max_tokens=4, temperature=0).text
        assert client.delete_session(fork.id)
        with pytest.raises(NotFoundError):
            client.get_session(fork.id)
        assert turn.text
