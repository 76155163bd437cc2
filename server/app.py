"""The FastAPI application: `create_app(settings, runtime=None)`.

Without a runtime the model loads in a background thread once the server is up, so `/health` answers 503
`{"status": "loading"}` until it is ready; tests pass a loaded runtime and get a ready app. That thread ends with
the load: see `start_engine`.

Start-up first takes the data directory's lock (`server.data_dir`), unless the caller already holds it
(`fam-server` takes it before it starts listening): a second server over the same directory refuses to start.
With a Redis store (`--store`) the sessions are not in the data directory and any number of servers share them:
no lock is taken.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from model import FamRuntime
from model.loader import cpu_has_amx
from server import errors, openapi
from server.data_dir import DataDirLock, snapshot_secret
from server.engine import Engine
from server.metrics import LatencyMiddleware, Metrics
from server.middleware import AuthMiddleware, BodyLimitMiddleware
from server.routes import completions, sessions, system
from server.settings import Settings

log = logging.getLogger(__name__)


def load_runtime(settings: Settings) -> FamRuntime:
    """The model as the settings ask for it. Explicit FAM settings override the adapter's / model's own."""
    rt = FamRuntime.load(source=settings.model, dtype=settings.dtype, device=settings.device,
                         adapter=settings.adapter, fam_overrides=settings.fam_overrides(),
                         decode_dtype=settings.decode_dtype)
    log.info("model %s on %s in %s (--dtype %s); a session decoding alone reads %s weights", rt.name, rt.device,
             str(rt.dtype).removeprefix("torch."), settings.dtype,
             str(rt.decode_dtype or rt.dtype).removeprefix("torch."))
    if rt.device.type == "cpu" and rt.dtype == torch.bfloat16 and cpu_has_amx() is False:
        log.warning("this CPU has no AMX, so its bfloat16 matmuls are slower than its float32 ones (2x to 8x): "
                    "--dtype auto or float32 ingests and decodes faster here, at twice the memory per session "
                    "(README, Limits)")
    return rt


def create_app(settings: Settings | None = None, runtime: FamRuntime | None = None, *,
               data_dir_lock: DataDirLock | None = None) -> FastAPI:
    """`data_dir_lock`: the lock of `settings.data_dir`, when the caller took it already (else start-up does)."""
    settings = settings or Settings()

    async def start_engine(app: FastAPI) -> None:
        # The load runs in a thread that ends with it, not in asyncio's thread pool, whose threads live on: torch
        # work in a thread starts an OpenMP team that lasts as long as the thread, and once libgomp manages more
        # threads than there are cores it stops spinning between parallel regions. A second, idle team beside
        # the model worker's cost the server a third of its ingest rate (scripts/bench_server.py --targets:
        # 0.62-0.73x the in-process rate).
        loop = asyncio.get_running_loop()
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="fam-load") as load:
                rt = runtime or await loop.run_in_executor(load, load_runtime, settings)
                secret = snapshot_secret(settings.data_dir,
                                         settings.secret.get_secret_value() if settings.secret else None)
                engine = await loop.run_in_executor(load, Engine, rt, settings.engine_config(secret))
        except Exception as e:  # anything the loader raises: /health reports it, /v1 answers 503 with it
            log.exception("the model failed to load")
            app.state.load_error = f"{type(e).__name__}: {e}"
            return
        engine.start()
        app.state.engine = engine
        log.info("model %s ready (%s, %s)", rt.name, rt.fam_config, rt.dtype)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_lock = data_dir_lock is None and settings.store is None
        if own_lock:
            app.state.data_dir_lock = DataDirLock.acquire(settings.data_dir)  # DataDirLocked: no start
        loading = asyncio.create_task(start_engine(app))
        if runtime is not None:
            await loading  # already loaded: only the engine to start
        try:
            yield
        finally:
            if not loading.done():
                await loading  # a load thread cannot be interrupted; let it finish, then stop cleanly
            if app.state.engine is not None:
                await app.state.engine.stop()
            if own_lock:
                app.state.data_dir_lock.release()

    app = FastAPI(title="fam-server", version="0.1.0", lifespan=lifespan)
    app.state.engine = None
    app.state.data_dir_lock = data_dir_lock
    app.state.load_error = None
    app.state.started = int(time.time())
    app.state.settings = settings
    app.state.metrics = Metrics(lambda: app.state.engine)

    errors.install(app)
    openapi.install(app)
    app.include_router(system.router)
    app.include_router(sessions.router)
    app.include_router(completions.router)
    if system.STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=system.STATIC_DIR), name="static")
    # the last added middleware runs first: latency around everything, then auth, then the body limit
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(AuthMiddleware, api_keys=settings.api_key_list)
    app.add_middleware(LatencyMiddleware, metrics=app.state.metrics)
    return app
