"""End-to-end fixtures: the real `fam-server`, started as a subprocess with the CPU Docker image's command line
(the CMD of docker/Dockerfile, with only the address and data directory changed, and flags added for the
tiny test model), on a free loopback port, with two API keys enabled.

The server is started once per test run and shared by the client and CLI tests; each test makes its own
sessions. The tiny chat model (random weights, the real tokenizer) answers with garbage text, fast.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
KEY, OTHER_KEY = "e2e-key-a", "e2e-key-b"
TINY_MODEL_FLAGS = ["--adapter", "none", "--dtype", "float32", "--device", "cpu",
                    "--block-size", "16", "--memory-blocks", "1", "--fam-len", "4"]
STARTUP_SECONDS = 120
DOCUMENT = (
    "The Harbour Bridge inspection of 2025 examined all 112 cable anchors. Corrosion was found on nine anchors "
    "of the east span, and all nine were repainted in June. The works cost 1.4 million euros.\n"
) * 6


def container_command() -> list[str]:
    """The exec-form CMD of docker/Dockerfile."""
    for line in (ROOT / "docker" / "Dockerfile").read_text().splitlines():
        if line.startswith("CMD "):
            return json.loads(line[len("CMD "):])
    raise AssertionError("docker/Dockerfile has no CMD")


def with_values(argv: list[str], values: Mapping[str, str]) -> list[str]:
    """`argv` with the value after each flag in `values` replaced (the flag must be present)."""
    out = list(argv)
    for flag, value in values.items():
        out[out.index(flag) + 1] = value
    return out


def script(name: str) -> str:
    """A console script of this environment (`fam-server`, `fam`), found next to the running Python."""
    path = Path(sys.executable).with_name(name)
    assert path.is_file(), f"{name} is not installed next to {sys.executable}: pip install -e ."
    return str(path)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without FAM_* variables (a developer's FAM_API_KEY must not leak in), plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("FAM_")}, **extra}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def server_url(tiny_chat_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("e2e-server")
    port = free_port()
    argv = with_values(container_command(), {"--host": "127.0.0.1", "--port": str(port),
                                             "--data-dir": str(folder / "data")})
    argv = [script(argv[0]), *argv[1:], "--model", str(tiny_chat_dir), *TINY_MODEL_FLAGS]
    log = folder / "server.log"
    env = clean_env(FAM_API_KEYS=f"{KEY},{OTHER_KEY}", FAM_LOG_LEVEL="warning")
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"fam-server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"fam-server was not ready after {STARTUP_SECONDS} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(autouse=True)
def no_client_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The clients read FAM_SERVER and FAM_API_KEY when not given a URL or key: tests give them explicitly."""
    monkeypatch.delenv("FAM_SERVER", raising=False)
    monkeypatch.delenv("FAM_API_KEY", raising=False)


@pytest.fixture(scope="session")
def api_key() -> str:
    """A key the server accepts; `other_key` is a second one (a different owner of sessions)."""
    return KEY


@pytest.fixture(scope="session")
def other_key() -> str:
    return OTHER_KEY


@pytest.fixture
def fam(server_url: str, api_key: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`fam(*args, key=api_key, server=server_url, stdin="")` runs the `fam` CLI with --server and --api-key
    (none when key is None) and returns the finished process (text stdout and stderr)."""

    def run(*args: str, key: str | None = api_key, server: str = server_url, stdin: str = ""):
        argv = [script("fam"), "--server", server, *(["--api-key", key] if key else []), *args]
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60, env=clean_env())

    return run


@pytest.fixture
def unused_url() -> str:
    """A loopback URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def document_text() -> str:
    return DOCUMENT


@pytest.fixture
def document(tmp_path: Path) -> Path:
    path = tmp_path / "report.txt"
    path.write_text(DOCUMENT)
    return path


@pytest.fixture
def make_pdf(tmp_path: Path, pdf_bytes) -> Callable[[list[str]], Path]:
    def make(pages: list[str]) -> Path:
        path = tmp_path / f"doc-{len(list(tmp_path.glob('*.pdf')))}.pdf"
        path.write_bytes(pdf_bytes(pages))
        return path

    return make
