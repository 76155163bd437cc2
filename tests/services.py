"""Real Redis and nginx processes on loopback for tests, without pytest (the fixtures are in tests/conftest.py).

`start_redis(workdir, **config)` runs /usr/bin/redis-server on a free 127.0.0.1 port; `start_nginx(workdir,
upstreams)` runs nginx with the shipped docker/nginx.conf, rewritten only where it must be to run on loopback
out of `workdir`: the listen port, the upstream's servers, the pid and log files and nginx's temp directories.
Everything else (the session hash, buffering, timeouts) is the shipped config, so the tests exercise it.
`parse_nginx` / `dump_nginx` are the small nginx config reader and writer both use.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "docker" / "nginx.conf"
REDIS_SERVER = "/usr/bin/redis-server"
NGINX_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def _wait(ready, proc: subprocess.Popen, what: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            if ready():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            _stop(proc, kill=True)
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s:\n{_tail(log)}")
        time.sleep(0.05)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"


def _stop(proc: subprocess.Popen, kill: bool = False) -> None:
    if proc.poll() is None:
        proc.kill() if kill else proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class _Process:
    proc: subprocess.Popen

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM), waiting for the process to exit."""
        _stop(self.proc)

    def kill(self) -> None:
        """SIGKILL: the process dies without cleaning up (for crash tests)."""
        _stop(self.proc, kill=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- Redis -------------------------------------------------------------------------------------------------------


class RedisProcess(_Process):
    def __init__(self, proc: subprocess.Popen, port: int, workdir: Path, log: Path) -> None:
        self.proc, self.port, self.workdir, self.log = proc, port, workdir, log
        self.url = f"redis://127.0.0.1:{port}/0"

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)


def start_redis(workdir: Path, **config: str | int) -> RedisProcess:
    """redis-server on a free 127.0.0.1 port, no persistence and `noeviction` unless `config` says otherwise.

    Each keyword is a redis.conf directive (underscores for dashes): `start_redis(d, maxmemory="4mb")`. Returns
    once PING answers; stop() / kill() or use it as a context manager.
    """
    import redis

    workdir.mkdir(parents=True, exist_ok=True)
    settings: dict[str, str] = {"save": "", "appendonly": "no", "dir": str(workdir), "maxmemory-policy": "noeviction"}
    settings.update({k.replace("_", "-"): str(v) for k, v in config.items()})
    for attempt in range(3):  # the port can be taken between free_port() and redis binding it
        port = free_port()
        log = workdir / f"redis-{port}.log"
        argv = [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(port), "--daemonize", "no", "--logfile", str(log)]
        for key, value in settings.items():
            argv += [f"--{key}", *value.split(" ")] if value else [f"--{key}", ""]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=workdir)
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, socket_timeout=1)
        try:
            _wait(client.ping, proc, "redis-server", log, timeout=10)
        except RuntimeError:
            if attempt < 2 and "Address already in use" in _tail(log):
                continue
            raise
        finally:
            client.close()
        return RedisProcess(proc, port, workdir, log)
    raise AssertionError("unreachable")


# -- nginx config reader / writer --------------------------------------------------------------------------------


@dataclass
class Directive:
    """One nginx directive: `name args...;` or `name args... { block }`. `raw` keeps each argument as written
    (quotes included) so that writing it back changes nothing; `args` are the unquoted values."""

    name: str
    args: list[str]
    raw: list[str] = field(default_factory=list)
    block: list[Directive] | None = None

    def __post_init__(self) -> None:
        if not self.raw:
            self.raw = list(self.args)

    def find(self, name: str) -> list[Directive]:
        return [d for d in self.block or [] if d.name == name]

    def one(self, name: str) -> Directive:
        found = self.find(name)
        assert len(found) == 1, f"expected one `{name}` in `{self.name}`, found {len(found)}"
        return found[0]


def _tokens(text: str) -> list[tuple[str, str]]:
    """(value, raw) per token, with `{`, `}` and `;` as tokens of their own; comments dropped. As nginx reads
    it: `#` starts a comment only where a token could start, and `${` inside a word does not open a block."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif ch in "{};":
            out.append((ch, ch))
            i += 1
        elif ch in "\"'":
            j, value = i + 1, []
            while j < n and text[j] != ch:
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                value.append(text[j])
                j += 1
            if j >= n:
                raise ValueError(f"unterminated quote at offset {i}")
            out.append(("".join(value), text[i : j + 1]))
            i = j + 1
        else:
            j = i
            while j < n:
                c = text[j]
                if c == "\\":  # an escaped character belongs to the word
                    j += 2
                elif c == "{" and text[j - 1] == "$" and j > i:  # ${name}
                    j += 1
                elif c.isspace() or c in ";{":
                    break
                else:
                    j += 1
            out.append((text[i:j], text[i:j]))
            i = j
    return out


def parse_nginx(text: str) -> Directive:
    """The whole file as the block of a root directive named `main`."""
    tokens = _tokens(text)
    pos = 0

    def block(closing: bool) -> list[Directive]:
        nonlocal pos
        items: list[Directive] = []
        while pos < len(tokens):
            value, raw = tokens[pos]
            if value == "}" and raw == "}":
                if not closing:
                    raise ValueError("unexpected `}`")
                pos += 1
                return items
            words: list[tuple[str, str]] = []
            while pos < len(tokens) and tokens[pos][1] not in ("{", ";", "}"):
                words.append(tokens[pos])
                pos += 1
            if pos >= len(tokens) or tokens[pos][1] == "}" or not words:
                raise ValueError(f"directive {words} not ended by `;` or a block")
            name, args = words[0][0], words[1:]
            end = tokens[pos][1]
            pos += 1
            body = block(closing=True) if end == "{" else None
            items.append(Directive(name, [v for v, _ in args], [r for _, r in args], body))
        if closing:
            raise ValueError("missing `}`")
        return items

    return Directive("main", [], [], block(closing=False))


def dump_nginx(root: Directive) -> str:
    def lines(items: list[Directive], depth: int) -> list[str]:
        out, pad = [], "    " * depth
        for d in items:
            head = " ".join([d.name, *d.raw])
            if d.block is None:
                out.append(f"{pad}{head};")
            else:
                out += [f"{pad}{head} {{", *lines(d.block, depth + 1), f"{pad}}}"]
        return out

    return "\n".join(lines(root.block or [], 0)) + "\n"


# -- nginx -------------------------------------------------------------------------------------------------------


def loopback_nginx_conf(conf: str, port: int, upstreams: list[str], workdir: Path, as_root: bool) -> str:
    """The shipped config with only what must change to run it unprivileged on 127.0.0.1 out of workdir.

    Fails (AssertionError) when the shipped config no longer has the shape this rewrite expects: one http
    block, one upstream with servers, one server listening on one port, and pid / error_log / access_log.
    """
    root = parse_nginx(conf)
    main = root.block
    assert main is not None
    http = root.one("http")

    def replace(items: list[Directive], name: str, args: list[str]) -> None:
        found = [i for i, d in enumerate(items) if d.name == name]
        assert len(found) == 1, f"nginx.conf: expected one `{name}` to rewrite, found {len(found)}"
        items[found[0]] = Directive(name, args)

    replace(main, "pid", [str(workdir / "nginx.pid")])
    replace(main, "error_log", [str(workdir / "error.log"), "info"])
    assert http.block is not None
    replace(http.block, "access_log", [str(workdir / "access.log")])

    upstream = http.one("upstream")
    assert upstream.block is not None
    servers = [i for i, d in enumerate(upstream.block) if d.name == "server"]
    assert servers, "nginx.conf: the upstream has no `server` to rewrite"
    assert servers == list(range(servers[0], servers[-1] + 1)), "nginx.conf: the upstream's servers are not together"
    upstream.block[servers[0] : servers[-1] + 1] = [Directive("server", [u]) for u in upstreams]

    server = http.one("server")
    assert server.block is not None
    replace(server.block, "listen", [f"127.0.0.1:{port}"])

    for kind in NGINX_TEMP_PATHS:
        assert not http.find(f"{kind}_temp_path"), f"nginx.conf sets {kind}_temp_path: rewrite it instead"
        (workdir / f"{kind}_temp").mkdir(exist_ok=True)
        http.block.insert(0, Directive(f"{kind}_temp_path", [str(workdir / f"{kind}_temp")]))

    assert not root.find("user"), "nginx.conf must not set `user` (it only works when nginx starts as root)"
    if as_root:  # a root master would drop its workers to an unprivileged user that cannot enter workdir
        main.insert(0, Directive("user", ["root"]))
    return dump_nginx(root)


class NginxProcess(_Process):
    def __init__(self, proc: subprocess.Popen, port: int, workdir: Path, conf: Path) -> None:
        self.proc, self.port, self.workdir, self.conf = proc, port, workdir, conf
        self.base_url = f"http://127.0.0.1:{port}"

    @property
    def error_log(self) -> str:
        return _tail(self.workdir / "error.log")


def start_nginx(workdir: Path, upstreams: list[str], conf: Path = NGINX_CONF) -> NginxProcess:
    """nginx running the shipped config (see loopback_nginx_conf) in front of `upstreams` ("127.0.0.1:PORT")."""
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        port = free_port()
        path = workdir / "nginx.conf"
        path.write_text(loopback_nginx_conf(conf.read_text(), port, upstreams, workdir, os.geteuid() == 0))
        log = workdir / "error.log"
        argv = [binary, "-p", str(workdir), "-e", str(log), "-c", str(path), "-g", "daemon off;"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=workdir)

        def accepts(port: int = port) -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True

        try:
            _wait(accepts, proc, "nginx", log, timeout=10)
        except RuntimeError:
            if attempt < 2 and "Address already in use" in _tail(log):
                continue
            raise
        return NginxProcess(proc, port, workdir, path)
    raise AssertionError("unreachable")
