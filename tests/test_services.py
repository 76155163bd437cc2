"""The loopback Redis and nginx of tests/services.py work, and the shipped docker/nginx.conf does what the cluster
relies on: a session's requests stick to one replica, others spread, streamed responses are not buffered."""

from __future__ import annotations

import http.client
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis

from tests.services import NginxProcess, RedisProcess, free_port

Proxy = Callable[[list[str]], NginxProcess]


def test_redis_answers_ping_with_the_test_defaults(redis_url: str) -> None:
    assert redis_url.startswith("redis://127.0.0.1:") and redis_url.endswith("/0")
    client = redis.Redis.from_url(redis_url)
    assert client.ping()
    config = client.config_get("*")
    assert (config["save"], config["appendonly"], config["maxmemory-policy"]) == ("", "no", "noeviction")
    assert client.dbsize() == 0


def test_redis_config_is_applied_and_a_full_redis_refuses_writes(redis_factory: Callable[..., RedisProcess]) -> None:
    server = redis_factory(maxmemory="4mb")
    client = server.client()
    assert client.config_get("maxmemory") == {"maxmemory": str(4 * 1024 * 1024)}
    with pytest.raises(redis.exceptions.OutOfMemoryError):  # noeviction: nothing is dropped to make room
        for i in range(200):
            client.set(f"k{i}", b"x" * 64 * 1024)
    assert client.exists("k0") and client.get("k0") == b"x" * 64 * 1024


def test_redis_kill_and_stop(redis_factory: Callable[..., RedisProcess]) -> None:
    first, second = redis_factory(), redis_factory()
    assert first.url != second.url
    first.kill()
    assert first.proc.returncode is not None
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(first.url, socket_connect_timeout=1).ping()
    second.stop()
    assert second.proc.returncode == 0


# -- nginx in front of two tiny upstreams -------------------------------------------------------------------------


class Upstream(BaseHTTPRequestHandler):
    """Answers JSON naming itself, the path and the forwarded headers; /stream answers an SSE-like chunked
    stream whose second event waits for the test to have read the first."""

    protocol_version = "HTTP/1.1"  # keepalive and chunked, as nginx talks to the replicas
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms wait on each reply
    name = ""
    release = threading.Event()
    finished = threading.Event()

    def answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path == "/v1/stream":
            self.stream()
            return
        payload = json.dumps({"upstream": self.name, "method": self.command, "path": self.path,
                              "received": len(body), "headers": {k.lower(): v for k, v in self.headers.items()}})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload.encode())

    def stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        chunk(b"data: first\n\n")
        type(self).release.wait(timeout=10)
        chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        type(self).finished.set()

    do_GET = do_POST = do_DELETE = answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstreams() -> Iterator[list[str]]:
    """Two upstream base URLs, answering as "a" and "b"."""
    Upstream.release, Upstream.finished = threading.Event(), threading.Event()
    servers = []
    for name in ("a", "b"):
        handler = type(f"Upstream_{name}", (Upstream,), {"name": name})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
    Upstream.release.set()
    for server in servers:
        server.shutdown()
        server.server_close()


def call(proxy: NginxProcess, method: str, path: str, body: bytes | None = None) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        data = response.read()
        assert response.status == 200, (response.status, data[:300], proxy.error_log[-2000:])
        return json.loads(data)
    finally:
        conn.close()


def session_id() -> str:
    return "sess_" + uuid.uuid4().hex[:24]


def test_a_session_sticks_to_one_upstream_and_sessions_spread(nginx_proxy: Proxy, upstreams: list[str]) -> None:
    proxy = nginx_proxy(upstreams)
    assert proxy.base_url == f"http://127.0.0.1:{proxy.port}"
    owners = {}
    for _ in range(40):
        sid = session_id()
        seen = {call(proxy, "GET", f"/v1/sessions/{sid}")["upstream"],
                call(proxy, "POST", f"/v1/sessions/{sid}/ingest", b"text")["upstream"],
                call(proxy, "GET", f"/v1/sessions/{sid}/state")["upstream"],
                call(proxy, "POST", f"/v1/sessions/{sid}/fork")["upstream"]}
        assert len(seen) == 1, f"{sid} reached {seen}"
        owners[sid] = seen.pop()
    assert set(owners.values()) == {"a", "b"}, "40 sessions all hashed to one replica"
    for sid, owner in owners.items():  # and again, after the others: still the same replica
        assert call(proxy, "DELETE", f"/v1/sessions/{sid}")["upstream"] == owner


def test_requests_without_a_session_in_the_url_spread(nginx_proxy: Proxy, upstreams: list[str]) -> None:
    proxy = nginx_proxy(upstreams)
    for method, path in (("GET", "/health"), ("POST", "/v1/chat/completions"), ("POST", "/v1/sessions/import")):
        reached = {call(proxy, method, path, b"{}" if method == "POST" else None)["upstream"] for _ in range(40)}
        assert reached == {"a", "b"}, f"{method} {path} always reached {reached}"


def test_forwarded_headers_and_a_large_upload(nginx_proxy: Proxy, upstreams: list[str]) -> None:
    proxy = nginx_proxy(upstreams)
    body = b"x" * (3 * 1024 * 1024)
    answer = call(proxy, "POST", f"/v1/sessions/{session_id()}/ingest", body)
    assert answer["received"] == len(body)
    headers = answer["headers"]
    assert headers["host"] == f"127.0.0.1:{proxy.port}"
    assert headers["x-forwarded-for"] == "127.0.0.1" and headers["x-forwarded-proto"] == "http"


def test_a_body_over_64_mib_is_refused_by_nginx(nginx_proxy: Proxy, upstreams: list[str]) -> None:
    proxy = nginx_proxy(upstreams)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.putrequest("POST", f"/v1/sessions/{session_id()}/ingest")
    conn.putheader("Content-Length", str(64 * 1024 * 1024 + 1))  # refused on the header, before any body
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()


def test_a_streamed_response_is_not_buffered(nginx_proxy: Proxy, upstreams: list[str]) -> None:
    proxy = nginx_proxy(upstreams)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    conn.request("GET", "/v1/stream")
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    assert response.readline() == b"data: first\n"  # times out (5 s) if nginx holds it back
    assert not Upstream.finished.is_set(), "the first event arrived only after the upstream finished"
    Upstream.release.set()
    assert response.read() == b"\ndata: [DONE]\n\n"
    assert Upstream.finished.wait(timeout=5)
    conn.close()


def test_a_replica_that_is_down_is_skipped(nginx_proxy: Proxy, upstreams: list[str]) -> None:
    """Connection refused: nothing reached the replica, so nginx passes even a POST to the other one."""
    proxy = nginx_proxy([upstreams[0], f"http://127.0.0.1:{free_port()}"])
    for _ in range(20):
        assert call(proxy, "POST", f"/v1/sessions/{session_id()}/ingest", b"text")["upstream"] == "a"
